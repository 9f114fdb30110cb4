"""Samplers: small pure functions over an explicit descending ``sigmas`` tensor ending in 0.

Each has the k-diffusion signature
``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, guide=None, ...)``.
Every model evaluation is written in (x0, d) form: ``x0 = model(x, sigma)``, the noise direction
``d = (x - x0) / sigma``, then the solver's update from ``x0`` and ``d``. With no guide (and
``cfgpp=False``) each sampler reproduces the matching diffusers scheduler.

Teacher guidance, the rule for every sampler (one-stage, multistage or multistep):

1. Every model evaluation whose x0 enters the update of a guided step ``i`` is guided, at its own
   (stage) sigma: the sampler calls ``guide(i, x_stage, x0_stage, sigma_stage)`` and the guided x0
   replaces the student's in the update. So the x0 that advances the state is always one the teacher
   corrected; a multistep solver that reuses earlier x0s (DPM-Solver++(2M), say) reuses the guided
   ones. Each stage uses the step's strength ``lam_i`` and costs one teacher forward
   (``dpmpp_2s_ancestral``: two per guided step, one on its last step, which is a single Euler stage).
2. Re-noise levels of every stage of step ``i``: ``next`` is the grid's next sigma ``sigma_{i+1}``
   (never above a stage's sigma: DPM-Solver++(2S)'s midpoint lies between ``sigma_i`` and
   ``sigma_{i+1}``), ``same`` the stage's own sigma, ``random`` a level drawn from ``(0, sigma_stage]``.
   On the last step ``next`` uses the smallest positive sigma of the grid. (For the midpoint we also
   tried re-noising the first stage to the midpoint and the second to ``sigma_down``; on the exact
   Gaussian-mixture test bed both helped less than ``sigma_{i+1}``.)
3. The direction stays the student's: ``d`` is never recomputed from the guided x0. Where an update uses
   the current state ``x`` itself (data-prediction solvers such as DPM-Solver++), it uses
   ``x_hat = x0 + sigma * d``, the state the guided estimate implies along the student's own direction
   (``x`` itself when the step is not guided).

CFG++ (Chung et al. 2024, ``cfgpp=True``): the student is a :class:`~distillpp.CFGDenoiser`; x0 is its CFG
estimate and ``d = (x - x0_uncond) / sigma`` the unconditional direction; rule 3's ``x_hat`` applies.

``generator`` is one ``torch.Generator``, a list with one per image (every draw of image ``b`` then comes
from ``generator[b]``, so a sample does not depend on its batch companions), or ``None``.

``callback`` is called once per step, with the step's first evaluation (k-diffusion's convention).

The sampling loops never read a tensor back to the host: the grid is read once per run
(``sigmas.tolist()``), and sigmas are handed to models in the grid's dtype (see :func:`_batch_sigma`).
A CPU generator with an accelerator sample still copies each draw to the device (diffusers'
convention), which synchronises; a generator on the sample's device does not.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence, Union

import torch
from tqdm.auto import trange

__all__ = [
    "SAMPLERS",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_ddim",
    "sample_consistency",
    "sample_dpmpp_2s_ancestral",
    "sample_tcd",
    "get_ancestral_step",
    "tcd_sigma_s",
    "randn_like",
    "random_tensor",
]

Guide = Callable[..., tuple]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def random_tensor(shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype,
                  uniform: bool = False) -> torch.Tensor:
    """Gaussian (or uniform) noise drawn on the generator's device, then moved (diffusers ``randn_tensor``).

    With a list of generators (one per image of a batch of ``B``), the leading dimension is ``K * B`` rows
    laid out as ``K`` repeats of the batch (``Tensor.repeat``'s layout) and image ``b``'s ``K`` rows come
    from ``generator[b]``, so each image's draws are those of a batch-1 run with its own generator.
    """
    draw = torch.rand if uniform else torch.randn
    shape = tuple(shape)
    if generator is None:
        return draw(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return draw(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    b = len(generator)
    if shape[0] % b:
        raise ValueError(f"generator has {b} generators but the draw has {shape[0]} rows (not a multiple)")
    k = shape[0] // b
    rows = [draw((k, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
    return torch.stack(rows, 1).reshape(shape)


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Gaussian noise shaped like ``x`` (see :func:`random_tensor` for lists of generators)."""
    if generator is None:
        return torch.randn_like(x)
    return random_tensor(x.shape, generator, x.device, x.dtype)


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of an ancestral step (k-diffusion); DDIM's eta gives the same split."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def _batch_sigma(sigma: float, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sigma`` repeated over ``x``'s batch in the grid's dtype (``like``), never ``x``'s.

    k-diffusion's ``sigma * x.new_ones(...)`` rounds sigma to a bf16/fp16 sample's dtype, and a
    discrete denoiser then looks up the wrong timestep (bf16 sends DMD2's 749 to 750). Denoiser
    outputs are cast back to ``x``'s dtype, so a float32 sigma never promotes the sample.
    """
    return torch.full((x.shape[0],), sigma, dtype=like.dtype, device=x.device)


def _denoise(model, x, sigma, i, sigmas, extra_args, guide, cfgpp):
    """One evaluation at ``sigma``: the (guided) x0, the direction ``d``, ``x_hat`` (rule 3), guide info."""
    s = _batch_sigma(sigma, x, sigmas)
    if cfgpp:
        x0_s, x0_u = (t.to(x.dtype) for t in model(x, s, return_uncond=True, **extra_args))
    else:
        x0_s = x0_u = model(x, s, **extra_args).to(x.dtype)
    d = (x - x0_u) / sigma
    x0, info = (x0_s, None) if guide is None else guide(i, x, x0_s, sigma)
    # x itself while x0 and d are the student's own (the plain solver's arithmetic, bit for bit).
    x_hat = x if x0 is x0_s and x0_u is x0_s else x0 + sigma * d
    return x0, d, x_hat, x0_s, info


def _step(model, x, sigmas, grid, i, extra_args, guide, callback, cfgpp):
    """The first evaluation of step ``i`` (reported to ``callback``); see :func:`_denoise`."""
    x0, d, x_hat, x0_s, info = _denoise(model, x, grid[i], i, sigmas, extra_args, guide, cfgpp)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": x0,
                  "student_denoised": x0_s, "guidance": info})
    return x0, d, x_hat


def _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, eta, s_noise, cfgpp):
    extra_args = extra_args or {}
    grid = sigmas.tolist()  # the one host read of the run
    for i in trange(len(grid) - 1, disable=disable, desc="sampling"):
        x0, d, _ = _step(model, x, sigmas, grid, i, extra_args, guide, callback, cfgpp)
        sigma_down, sigma_up = get_ancestral_step(grid[i], grid[i + 1], eta)
        # Euler step to sigma_down with the student's direction, then fresh noise up to sigma_next.
        x = x0 + sigma_down * d
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, guide=None,
                 cfgpp=False):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, 0.0, 1.0, cfgpp)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                           guide=None, eta=1.0, s_noise=1.0, cfgpp=False):
    """Euler ancestral sampling (k-diffusion; diffusers ``EulerAncestralDiscreteScheduler``)."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, eta, s_noise, cfgpp)


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, guide=None,
                eta=0.0, cfgpp=False):
    """DDIM (Song et al. 2021). In VE coordinates DDIM(eta) is the ancestral Euler step with that eta."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, generator, guide, eta, 1.0, cfgpp)


@torch.no_grad()
def sample_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                       guide=None):
    """Multistep consistency sampling (LCM, DMD2): predict x0, re-noise with fresh noise to the next sigma."""
    extra_args = extra_args or {}
    grid = sigmas.tolist()
    for i in trange(len(grid) - 1, disable=disable, desc="sampling"):
        x0, _, _ = _step(model, x, sigmas, grid, i, extra_args, guide, callback, False)
        sigma_next = grid[i + 1]
        x = x0 + sigma_next * randn_like(x0, generator) if sigma_next > 0 else x0
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None,
                              guide=None, eta=1.0, s_noise=1.0, cfgpp=False):
    """DPM-Solver++(2S) ancestral (Lu et al. 2022; k-diffusion). Both stages are guided (module docstring)."""
    extra_args = extra_args or {}
    grid = sigmas.tolist()
    for i in trange(len(grid) - 1, disable=disable, desc="sampling"):
        sigma = grid[i]
        sigma_down, sigma_up = get_ancestral_step(sigma, grid[i + 1], eta)
        if sigma_down == 0:
            x0, d, _ = _step(model, x, sigmas, grid, i, extra_args, guide, callback, cfgpp)
            x = x0 + sigma_down * d  # Euler step to 0.
        else:
            # DPM-Solver++(2S): midpoint in log-sigma, second model evaluation there.
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            sigma_s = math.exp(-(t + 0.5 * h))
            x0, d, x_hat = _step(model, x, sigmas, grid, i, extra_args, guide, callback, cfgpp)
            x_2 = (sigma_s / sigma) * x_hat - math.expm1(-0.5 * h) * x0
            x0_2, _, _, _, _ = _denoise(model, x_2, sigma_s, i, sigmas, extra_args, guide, False)  # guided too
            x = (sigma_down / sigma) * x_hat - math.expm1(-h) * x0_2
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def tcd_sigma_s(schedule: Any, sigmas: torch.Tensor, gamma: float) -> list[float]:
    """TCD's intermediate level of every step, as host floats.

    With a discrete ``schedule``: ``sigma(floor((1 - gamma) * t_next))`` with ``t_next`` the training
    timestep of the next grid sigma (0 after the last step) and the product rounded in float32, as
    diffusers' ``TCDScheduler`` does. Without one (continuous models): the same rule in flow time
    ``s = sigma / (1 + sigma)``, ``s_s = (1 - gamma) * s_next``, so the last step ends at sigma 0.

    Args:
        schedule: the student's :class:`~distillpp.DiscreteVPSchedule`, or ``None``.
        sigmas: the grid.
        gamma: TCD's stochasticity (diffusers' ``eta``), in [0, 1].
    """
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    gamma = float(gamma)
    if schedule is None:
        s_next = [s / (1 + s) for s in sigmas[1:].tolist()]
        return [(1 - gamma) * s / (1 - (1 - gamma) * s) for s in s_next]
    if not hasattr(schedule, "sigma_to_t"):
        raise ValueError(f"schedule must be a DiscreteVPSchedule or None, got {type(schedule).__name__}")
    t_next = schedule.sigma_to_t(sigmas[1:].detach().cpu(), quantize=True).long()
    t_s = torch.floor((1 - gamma) * t_next).long()
    return schedule.sigmas[t_s].tolist()


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None, guide=None,
               schedule=None, gamma=0.3, cfgpp=False):
    """TCD's strategic stochastic sampling (Zheng et al. 2024; diffusers ``TCDScheduler``).

    Each step predicts x0, moves deterministically to ``sigma_s = sigma(floor((1 - gamma) t_next))``
    along the student's direction and adds fresh noise up to the next sigma. The last step stops at
    ``sigma(t=0)`` like the scheduler and returns that sample in VP scaling, ``x_s / sqrt(1 + sigma_s^2)``,
    which is what ``TCDScheduler`` hands to the VAE (without a schedule the last step ends at sigma 0).

    Args:
        schedule: the student's :class:`~distillpp.DiscreteVPSchedule` (``distillpp.sample`` defaults it to
            the student's ``schedule``); ``None`` applies TCD's rule in flow time (see :func:`tcd_sigma_s`).
        gamma: stochasticity in [0, 1] (diffusers' ``eta``; 0 is deterministic). The TCD paper's default 0.3.
        cfgpp: take the direction from the unconditional prediction (CFG++).
    """
    extra_args = extra_args or {}
    grid = sigmas.tolist()
    levels = tcd_sigma_s(schedule, sigmas, gamma)
    n = len(grid) - 1
    for i in trange(n, disable=disable, desc="sampling"):
        x0, d, _ = _step(model, x, sigmas, grid, i, extra_args, guide, callback, cfgpp)
        sigma_s = levels[i]
        x = x0 + sigma_s * d
        if i == n - 1:
            x = x / math.sqrt(1 + sigma_s**2)
        elif gamma > 0:
            x = x + randn_like(x, generator) * math.sqrt(max(grid[i + 1] ** 2 - sigma_s**2, 0.0))
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "consistency": sample_consistency,
    "ddim": sample_ddim,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "tcd": sample_tcd,
}
