"""Samplers: small pure functions over an explicit descending ``sigmas`` tensor ending in 0.

Each has the k-diffusion signature
``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, guide=None, ...)``.
Every step is written in (x0, d) form: ``x0 = model(x, sigma)``, the noise direction
``d = (x - x0) / sigma``, then the solver's update from ``x0`` and ``d``. ``guide`` (built by
:class:`distillpp.TeacherGuidance`) may replace the student's ``x0`` by a teacher-corrected one;
the solver keeps the student's ``d`` (SPEC section 4, step 6). With no guide the update is the
plain solver's, and it reproduces the matching diffusers scheduler.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import trange

__all__ = [
    "SAMPLERS",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_ddim",
    "sample_consistency",
    "sample_dpmpp_2s_ancestral",
    "get_ancestral_step",
    "randn_like",
]

Guide = Callable[..., torch.Tensor]


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise shaped like ``x``, drawn on the generator's device (diffusers ``randn_tensor``)."""
    if generator is None:
        return torch.randn_like(x)
    gen_device = generator.device
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
    return noise.to(x.device)


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of an ancestral step (k-diffusion); DDIM's eta gives the same split."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def _batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sigma`` repeated over ``x``'s batch in the grid's dtype (``like``), never ``x``'s.

    k-diffusion's ``sigma * x.new_ones(...)`` rounds sigma to a bf16/fp16 sample's dtype, and a
    discrete denoiser then looks up the wrong timestep (bf16 sends DMD2's 749 to 750). Denoiser
    outputs are cast back to ``x``'s dtype, so a float32 sigma never promotes the sample.
    """
    return torch.as_tensor(sigma, dtype=like.dtype, device=x.device).reshape(1).repeat(x.shape[0])


def _student_step(
    model: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    i: int,
    extra_args: dict,
    guide: Guide | None,
    callback: Callable | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student x0, its direction ``d``, and the guided x0 where ``guide`` says so."""
    sigma = sigmas[i]
    x0_s = model(x, _batch_sigma(sigma, x, sigmas), **extra_args).to(x.dtype)
    d = (x - x0_s) / sigma
    info = None
    x0 = x0_s
    if guide is not None:
        x0, info = guide(i, x, x0_s)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigmas[i + 1], "denoised": x0,
                  "student_denoised": x0_s, "guidance": info})
    return x0, d


def _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, eta, s_noise):
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="sampling"):
        x0, d = _student_step(model, x, sigmas, i, extra_args, guide, callback)
        sigma_down, sigma_up = get_ancestral_step(float(sigmas[i]), float(sigmas[i + 1]), eta)
        # Euler step to sigma_down with the student's direction, then fresh noise up to sigma_next.
        x = x0 + sigma_down * d
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, guide=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, 0.0, 1.0)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                           guide=None, eta=1.0, s_noise=1.0):
    """Euler ancestral sampling (k-diffusion; diffusers ``EulerAncestralDiscreteScheduler``)."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, eta, s_noise)


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, guide=None,
                eta=0.0):
    """DDIM (Song et al. 2021). In VE coordinates DDIM(eta) is the ancestral Euler step with that eta."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, eta, 1.0)


@torch.no_grad()
def sample_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                       guide=None):
    """Multistep consistency sampling (LCM, DMD2): predict x0, re-noise with fresh noise to the next sigma."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="sampling"):
        x0, _ = _student_step(model, x, sigmas, i, extra_args, guide, callback)
        sigma_next = float(sigmas[i + 1])
        x = x0 + sigma_next * randn_like(x0, generator) if sigma_next > 0 else x0
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                              guide=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) ancestral (Lu et al. 2022; k-diffusion). The guide corrects the first-stage x0."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="sampling"):
        x0, d = _student_step(model, x, sigmas, i, extra_args, guide, callback)
        sigma = float(sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigma, float(sigmas[i + 1]), eta)
        if sigma_down == 0:
            x = x0 + sigma_down * d  # Euler step to 0.
        else:
            # DPM-Solver++(2S): midpoint in log-sigma, second model evaluation there.
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            sigma_s = math.exp(-s)
            x_2 = (sigma_s / sigma) * x - math.expm1(-0.5 * h) * x0
            x0_2 = model(x_2, _batch_sigma(sigma_s, x, sigmas), **extra_args).to(x.dtype)
            x = (sigma_down / sigma) * x - math.expm1(-h) * x0_2
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "consistency": sample_consistency,
    "ddim": sample_ddim,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
}
