"""Pixel-level checks of generated images that need no feature network.

- **High-frequency energy ratio** (``hf_ratio``): the mean squared discrete Laplacian
  (``4 x[i,j] - x[i-1,j] - x[i+1,j] - x[i,j-1] - x[i,j+1]``, valid positions only) of the samples,
  divided by the same statistic of real images. 1.0 means as much pixel-to-pixel variation as the
  real data; isolated bright or dark pixels (salt-and-pepper speckle) each add up to ``5 * 2^2`` to the
  sum, so speckle shows as a ratio well above 1, over-smoothed samples as a ratio below 1. A classifier's
  features are built to ignore exactly this kind of noise, which is why a feature FID barely moves.
- **Pixel Fréchet distance** (``pixel_fd``): the Fréchet distance (:func:`~distillpp.metrics.frechet_distance`)
  between Gaussian fits of ``pool x pool``-average-pooled pixels of the samples and of the real images.
  For the Fashion-MNIST zoo (28x28 content, ``pool=2``) that is 196 dimensions: a covariance estimated
  from 5-10k samples is stable (tens of samples per dimension), pooling 2x2 keeps the mid frequencies
  where speckle and blur show, and it costs one ``196 x 196`` eigendecomposition.

Both clamp samples to [-1, 1] first (the range the data lie in, as :func:`~distillpp.metrics.classifier_outputs`
does) and replace NaN/Inf by 0, and both can look at a centre crop only (``crop=28`` drops the
zoo's 2-pixel padding, which is constant -1 in real images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .fid import feature_statistics, frechet_distance

__all__ = ["center_crop", "high_frequency_energy", "pixel_features", "PixelReference", "pixel_metrics"]

_LAPLACIAN = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def _as_images(images: Any, name: str = "images") -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"{name} must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return torch.nan_to_num(x.detach().float().cpu(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)


def center_crop(images: torch.Tensor, crop: int | None) -> torch.Tensor:
    """The central ``crop x crop`` pixels of ``[N, C, H, W]`` images (``None``: unchanged).

    Args:
        images: ``[N, C, H, W]``.
        crop: side of the crop, at most ``min(H, W)``.
    """
    if crop is None:
        return images
    h, w = images.shape[-2:]
    if not isinstance(crop, int) or isinstance(crop, bool) or not 1 <= crop <= min(h, w):
        raise ValueError(f"crop must be an integer in [1, {min(h, w)}] for {h}x{w} images, got {crop!r}")
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[..., top : top + crop, left : left + crop]


def high_frequency_energy(images: Any, crop: int | None = None, batch_size: int = 4096) -> float:
    """Mean over images and valid pixels of the squared discrete Laplacian (see the module docstring).

    Args:
        images: ``[N, C, H, W]`` in [-1, 1] (clamped; NaN/Inf zeroed).
        crop: centre crop side (``None``: the whole image); must leave at least 3x3 pixels.
        batch_size: images per convolution.
    """
    x = center_crop(_as_images(images), crop)
    if min(x.shape[-2:]) < 3:
        raise ValueError(f"images need at least 3x3 pixels for a Laplacian, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    kernel = _LAPLACIAN.to(x.dtype).expand(c, 1, 3, 3)
    total, count = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        lap = torch.nn.functional.conv2d(x[start : start + batch_size], kernel, groups=c)
        total += float(lap.double().pow(2).sum())
        count += lap.numel()
    return total / count


def pixel_features(images: Any, crop: int | None = None, pool: int = 2) -> torch.Tensor:
    """``[N, C * (side / pool)^2]`` average-pooled pixels of the (cropped) images, in float64.

    Args:
        images: ``[N, C, H, W]`` in [-1, 1] (clamped; NaN/Inf zeroed).
        crop: centre crop side (``None``: the whole image).
        pool: average-pooling window and stride (1: raw pixels).
    """
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
        raise ValueError(f"pool must be a positive integer, got {pool!r}")
    x = center_crop(_as_images(images), crop)
    if pool > min(x.shape[-2:]):
        raise ValueError(f"pool={pool} is larger than the {tuple(x.shape[-2:])} images")
    if pool > 1:
        x = torch.nn.functional.avg_pool2d(x, pool)
    return x.flatten(1).double()


@dataclass
class PixelReference:
    """Real-image statistics that :func:`pixel_metrics` compares samples with.

    Args:
        hf_energy: :func:`high_frequency_energy` of the real images.
        mu, sigma: Gaussian fit of their :func:`pixel_features`.
        crop, pool: the settings both sides are measured with.
    """

    hf_energy: float
    mu: np.ndarray = field(repr=False)
    sigma: np.ndarray = field(repr=False)
    crop: int | None = None
    pool: int = 2

    @classmethod
    def from_images(cls, images: Any, crop: int | None = None, pool: int = 2) -> "PixelReference":
        """Statistics of real ``images`` (e.g. the Fashion-MNIST test set with ``crop=28``).

        Args:
            images: ``[N, C, H, W]`` real images in [-1, 1], ``N >= 2``.
            crop: centre crop side (``None``: the whole image).
            pool: average-pooling window of the pixel Fréchet distance.
        """
        hf = high_frequency_energy(images, crop)
        if hf <= 0:
            raise ValueError("the real images have no high-frequency energy (constant images?): the ratio is undefined")
        mu, sigma = feature_statistics(pixel_features(images, crop, pool).numpy())
        return cls(hf, mu, sigma, crop, pool)


def pixel_metrics(images: Any, reference: PixelReference) -> dict[str, float]:
    """``{"hf_ratio", "pixel_fd"}`` of generated ``images`` against real-image ``reference`` statistics.

    Args:
        images: ``[N, C, H, W]`` samples in [-1, 1] (clamped; NaN/Inf zeroed), ``N >= 2``, the same size as
            the reference images.
        reference: from :meth:`PixelReference.from_images`.
    """
    feats = pixel_features(images, reference.crop, reference.pool).numpy()
    if feats.shape[1] != reference.mu.shape[0]:
        raise ValueError(f"images give {feats.shape[1]} pixel features but the reference has {reference.mu.shape[0]} "
                         "(different image size, crop or pool)")
    mu, sigma = feature_statistics(feats)
    return {
        "hf_ratio": high_frequency_energy(images, reference.crop) / reference.hf_energy,
        "pixel_fd": frechet_distance(mu, sigma, reference.mu, reference.sigma),
    }
