"""Frechet distance between Gaussian fits of feature sets (Heusel et al. 2017, "GANs trained by a
two time-scale update rule"), in float64.

The trace term ``tr((S1 S2)^(1/2))`` is computed as ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``: the
two matrices are similar, and ``A S2 A`` is symmetric positive semi-definite, so one symmetric
eigendecomposition gives it without the complex round-off of a general ``sqrtm``. It needs numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features"]


def _as_2d_float64(features: Any, name: str) -> np.ndarray:
    if hasattr(features, "detach"):
        features = features.detach().cpu().numpy()
    a = np.asarray(features, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_samples, dim], got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N - 1``) covariance of ``[N, dim]`` features, in float64.

    Args:
        features: array or tensor of shape ``[N, dim]``.
    """
    a = _as_2d_float64(features, "features")
    return a.mean(axis=0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` for two Gaussians.

    Args:
        mu1, mu2: means, shape ``[dim]``.
        sigma1, sigma2: covariances, shape ``[dim, dim]`` (symmetric positive semi-definite).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"shapes must be mu [dim] and sigma [dim, dim] on both sides, got {mu1.shape}, {s1.shape}, "
            f"{mu2.shape}, {s2.shape}"
        )
    a = _sqrt_psd(s1)
    inner = a @ s2 @ a
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)


def fid_from_features(features_a: Any, features_b: Any) -> float:
    """FID between two ``[N, dim]`` feature sets (each fitted by a Gaussian).

    Args:
        features_a, features_b: arrays or tensors, e.g. classifier penultimate features of generated
            and real images. The sets may differ in size; small sets bias FID upwards.
    """
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
