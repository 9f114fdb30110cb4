"""An analytic test bed: exact denoisers for Gaussian mixtures, and biased "students".

For ``p(x0) = sum_k w_k N(mu_k, s_k^2 I)`` the noisy marginal at ``sigma`` is
``sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)`` and the posterior mean (the ideal denoiser) is
closed-form: ``E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))`` with
responsibilities ``r_k``. This gives an exact teacher at every sigma, conditional or not, and a
ground-truth distribution to measure samplers against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoisers import append_dims

__all__ = ["GaussianMixture", "GaussianMixtureDenoiser", "energy_distance", "sliced_wasserstein", "mode_weights"]


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture in ``D`` dimensions.

    Args:
        means: ``[K, D]`` component means.
        stds: ``[K]`` component standard deviations.
        weights: ``[K]`` mixture weights (normalised here).
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "means", self.means.double())
        object.__setattr__(self, "stds", self.stds.double().expand(self.means.shape[0]).clone())
        w = self.weights.double()
        object.__setattr__(self, "weights", w / w.sum())

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.2, weights: torch.Tensor | None = None):
        """``k`` equal components on a circle: a common 2-D benchmark."""
        angle = torch.arange(k, dtype=torch.float64) * (2 * torch.pi / k)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return cls(means, torch.full((k,), std), torch.ones(k) if weights is None else weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None):
        """``n`` exact samples (and their component labels); ``labels`` fixes the components."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * eps, labels


class GaussianMixtureDenoiser:
    """The exact posterior-mean denoiser of a :class:`GaussianMixture`.

    Call as ``D(x, sigma)`` (unconditional) or ``D(x, sigma, labels=y)`` (conditional on component
    ``y``; ``y = -1`` means unconditional, so CFG's null label works). Computes in float64 and
    returns ``x``'s dtype.
    """

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture

    def log_responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        m = self.mixture
        var = m.stds[None, :] ** 2 + sigma.double()[:, None] ** 2  # [B, K]
        sq = ((x.double()[:, None, :] - m.means[None]) ** 2).sum(-1)  # [B, K]
        logp = m.weights.log()[None] - 0.5 * sq / var - 0.5 * m.dim * var.log()
        return logp - logp.logsumexp(dim=1, keepdim=True)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        m = self.mixture
        xd, sd = x.double(), sigma.double()
        logr = self.log_responsibilities(x, sigma)
        if labels is not None:
            labels = labels.to(x.device).long()
            onehot = torch.nn.functional.one_hot(labels.clamp(min=0), m.means.shape[0]).bool()
            forced = torch.where(onehot, 0.0, -torch.inf).double()
            logr = torch.where(append_dims(labels >= 0, 2), forced, logr)
        r = logr.exp()  # [B, K]
        shrink = (m.stds[None] ** 2 / (m.stds[None] ** 2 + sd[:, None] ** 2))  # [B, K]
        comp = m.means[None] + shrink[..., None] * (xd[:, None, :] - m.means[None])  # [B, K, D]
        return (r[..., None] * comp).sum(1).to(x.dtype)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance ``2 E|a-b| - E|a-a'| - E|b-b'|`` (Szekely & Rizzo); 0 iff equal laws."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (len(a) * (len(a) - 1))
    bb = torch.cdist(b, b).sum() / (len(b) * (len(b) - 1))
    return float(2 * ab - aa - bb)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance over random directions (equal sample counts)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a[:n] @ dirs).sort(dim=0)
    pb, _ = (b[:n] @ dirs).sort(dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_weights(x: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """Fraction of samples nearest to each component mean (how the mass is split among modes)."""
    nearest = torch.cdist(x.double(), mixture.means).argmin(dim=1)
    return torch.bincount(nearest, minlength=mixture.means.shape[0]).double() / len(x)
