"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric
for assessing generative models").

Each feature set defines a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour in the same set. Precision is the fraction of
generated samples inside the real manifold, recall the fraction of real samples inside the generated
one. Distances are computed in row chunks so 10k x 10k sets fit on a GPU or CPU without forming the
full matrix.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def _as_tensor(features: Any, device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(features)
    if t.ndim != 2:
        raise ValueError(f"features must be 2-D [num_samples, dim], got shape {tuple(t.shape)}")
    return t.to(device=device or t.device, dtype=dtype)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a - b||^2 through one matrix product; clamp the round-off below 0.
    d2 = a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]
    return d2.clamp_(min=0).sqrt_()


def knn_radii(
    features: Any, k: int = 3, chunk_size: int = 2048, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Distance from each point to its ``k``-th nearest neighbour in the same set (itself excluded).

    Args:
        features: ``[N, dim]`` array or tensor, ``N > k``.
        k: neighbourhood size (the paper uses 3).
        chunk_size: rows of the distance matrix formed at a time.
        device, dtype: where and in which precision to compute.
    """
    x = _as_tensor(features, device, dtype)
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}] (fewer than the number of samples), got {k}")
    out = []
    for start in range(0, x.shape[0], chunk_size):
        d = _distances(x[start : start + chunk_size], x)
        # The k+1 smallest include the point itself at distance 0.
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def manifold_coverage(
    query: Any,
    reference: Any,
    radii: torch.Tensor,
    chunk_size: int = 2048,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Boolean ``[num_query]``: whether each query lies within ``radii[j]`` of some reference point ``j``.

    Args:
        query: ``[M, dim]`` features.
        reference: ``[N, dim]`` features defining the manifold.
        radii: ``[N]`` ball radii (see :func:`knn_radii`).
        chunk_size, device, dtype: as in :func:`knn_radii`.
    """
    q = _as_tensor(query, device, dtype)
    ref = _as_tensor(reference, device, dtype)
    r = radii.to(device=ref.device, dtype=dtype)
    if q.shape[1] != ref.shape[1]:
        raise ValueError(f"query and reference feature dims differ: {q.shape[1]} vs {ref.shape[1]}")
    if r.shape != (ref.shape[0],):
        raise ValueError(f"radii must have shape [{ref.shape[0]}], got {tuple(r.shape)}")
    out = []
    for start in range(0, q.shape[0], chunk_size):
        d = _distances(q[start : start + chunk_size], ref)
        out.append((d <= r[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(
    real: Any,
    fake: Any,
    k: int = 3,
    chunk_size: int = 2048,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    real_radii: torch.Tensor | None = None,
) -> dict[str, float]:
    """Improved precision and recall of ``fake`` against ``real`` features.

    Args:
        real: ``[N, dim]`` real features.
        fake: ``[M, dim]`` generated features.
        k: nearest-neighbour size of the manifolds (3 in the paper).
        chunk_size: rows of each distance matrix formed at a time.
        device, dtype: where and in which precision to compute (default: the inputs' device, float32).
        real_radii: precomputed :func:`knn_radii` of ``real`` (reuse it across many fake sets).

    Returns:
        ``{"precision": ..., "recall": ...}``, each in [0, 1].
    """
    real_t = _as_tensor(real, device, dtype)
    fake_t = _as_tensor(fake, real_t.device, dtype)
    if real_radii is None:
        real_radii = knn_radii(real_t, k, chunk_size, dtype=dtype)
    fake_radii = knn_radii(fake_t, k, chunk_size, dtype=dtype)
    precision = manifold_coverage(fake_t, real_t, real_radii, chunk_size, dtype=dtype).float().mean()
    recall = manifold_coverage(real_t, fake_t, fake_radii, chunk_size, dtype=dtype).float().mean()
    return {"precision": float(precision), "recall": float(recall)}
