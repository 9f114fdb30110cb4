"""Scoring generated images with a classifier: FID on its penultimate features, precision/recall,
class consistency, and mean/std over sampling seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .fid import feature_statistics, frechet_distance
from .precision_recall import knn_radii, manifold_coverage

__all__ = [
    "classifier_outputs",
    "class_consistency",
    "RealFeatures",
    "evaluate_samples",
    "mean_std",
    "summarize",
    "format_mean_std",
]


def _first_param(module: Any) -> torch.Tensor | None:
    try:
        return next(module.parameters())
    except (StopIteration, AttributeError, TypeError):
        return None


def _module_device(module: Any) -> torch.device:
    p = _first_param(module)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def classifier_outputs(
    classifier: Any, images: torch.Tensor, batch_size: int = 1000, device: Any = None, with_logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Penultimate features and logits of ``images`` (CPU float32 tensors).

    Args:
        classifier: module with ``features(x)`` (penultimate activations) and ``forward(x)`` (logits),
            taking images in [-1, 1]; samples are clamped to that range first.
        images: ``[N, C, H, W]``.
        batch_size: images per forward.
        device: where to run (default: the classifier's device).
        with_logits: also return logits (else ``None``). A classifier with a ``head`` module gets its
            logits as ``head(features)`` in the same pass.
    """
    device = torch.device(device) if device is not None else _module_device(classifier)
    p = _first_param(classifier)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    # A classifier whose logits are ``head(features)`` (the zoo's) needs one pass, not two.
    head = getattr(classifier, "head", None)
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device=device, dtype=dtype).clamp(-1, 1)
        f = classifier.features(x)
        feats.append(f.float().flatten(1).cpu())
        if with_logits:
            logits.append((head(f) if isinstance(head, torch.nn.Module) else classifier(x)).float().cpu())
    return torch.cat(feats), torch.cat(logits) if with_logits else None


def class_consistency(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for.

    Args:
        logits: ``[N, num_classes]`` logits, or ``[N]`` predicted classes.
        labels: ``[N]`` requested classes.
    """
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    pred = logits.argmax(dim=1) if logits.ndim == 2 else logits
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} differ in shape")
    return float((pred.cpu() == labels.cpu()).float().mean())


@dataclass
class RealFeatures:
    """Reference statistics of the real set: features, their Gaussian fit, and k-NN radii (cached).

    Args:
        features: ``[N, dim]`` float32 features of real images.
    """

    features: torch.Tensor
    mu: np.ndarray = field(init=False, repr=False)
    sigma: np.ndarray = field(init=False, repr=False)
    _radii: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.features = torch.as_tensor(self.features).float().cpu()
        self.mu, self.sigma = feature_statistics(self.features)

    @classmethod
    def from_images(cls, classifier: Any, images: torch.Tensor, batch_size: int = 1000, device: Any = None):
        """Features of real ``images`` (e.g. the 10k Fashion-MNIST test set)."""
        return cls(classifier_outputs(classifier, images, batch_size, device, with_logits=False)[0])

    def radii(self, k: int, device: Any = None, chunk_size: int = 2048) -> torch.Tensor:
        key = (k, str(device))
        if key not in self._radii:
            self._radii[key] = knn_radii(self.features, k, chunk_size, device=device)
        return self._radii[key]


def evaluate_samples(
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: Any,
    real: RealFeatures | None = None,
    k: int = 3,
    batch_size: int = 1000,
    device: Any = None,
    chunk_size: int = 2048,
    with_precision_recall: bool = True,
) -> dict[str, float]:
    """All metrics of one set of generated images.

    Args:
        images: ``[N, C, H, W]`` samples in [-1, 1] (clamped).
        labels: ``[N]`` classes they were generated for.
        classifier: feature network (see :func:`classifier_outputs`).
        real: test-set reference; ``None`` gives class consistency only.
        k: neighbourhood size of precision/recall.
        batch_size: classifier batch.
        device: where distances are computed (default: the classifier's device).
        chunk_size: distance-matrix rows per chunk.
        with_precision_recall: also compute precision and recall (needs ``real``).

    Returns:
        ``class_consistency``, and with ``real``: ``fid``, ``precision``, ``recall``; plus ``num_samples``
        and ``nonfinite`` (samples with NaN/Inf, which are zeroed before scoring).
    """
    images = images.float()
    bad = ~torch.isfinite(images.flatten(1)).all(1)
    if bad.any():
        images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0)
    feats, logits = classifier_outputs(classifier, images, batch_size, device)
    out: dict[str, float] = {
        "num_samples": int(images.shape[0]),
        "nonfinite": int(bad.sum()),
        "class_consistency": class_consistency(logits, labels),
    }
    if real is not None:
        mu, sigma = feature_statistics(feats)
        out["fid"] = frechet_distance(mu, sigma, real.mu, real.sigma)
        if with_precision_recall and images.shape[0] > k:
            device = torch.device(device) if device is not None else _module_device(classifier)
            real_f = real.features.to(device)
            fake_f = feats.to(device)
            fake_r = knn_radii(fake_f, k, chunk_size)
            real_r = real.radii(k, device, chunk_size)
            out["precision"] = float(manifold_coverage(fake_f, real_f, real_r, chunk_size).float().mean())
            out["recall"] = float(manifold_coverage(real_f, fake_f, fake_r, chunk_size).float().mean())
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of finite values.

    Returns ``(nan, nan)`` for no values.
    """
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(runs: Sequence[Mapping[str, float]], keys: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Mean/std over seeds of each metric: ``{metric: {"mean", "std", "n"}}``.

    Args:
        runs: one metrics dict per seed (as :func:`evaluate_samples` returns).
        keys: metrics to summarize (default: every key present in all runs).
    """
    if keys is None:
        keys = [k for k in (runs[0] if runs else {}) if all(k in r for r in runs)]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        m, s = mean_std(vals)
        out[k] = {"mean": m, "std": s, "n": len(vals)}
    return out


def format_mean_std(stat: Mapping[str, float] | None, digits: int = 2, scale: float = 1.0) -> str:
    """``"mean ± std"`` of a :func:`summarize` entry (``"–"`` when missing)."""
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "–"
    m, s = stat["mean"] * scale, stat["std"] * scale
    if stat.get("n", 1) > 1:
        return f"{m:.{digits}f} ± {s:.{digits}f}"
    return f"{m:.{digits}f}"
