"""The ComfyUI-independent half of the node pack: plain tensors and distillpp, no ``comfy`` import.

ComfyUI's models are denoisers in their own coordinates (``BaseModel.apply_model(x, sigma) -> x0``):
eps/v models already use distillpp's VE contract (``x = x0 + sigma * eps``, ComfyUI's ``EPS`` family
divides by ``sqrt(1 + sigma^2)`` inside), flow models (ComfyUI's ``CONST``: FLUX, SD3) use
``x = (1 - s) x0 + s eps`` with ``sigma = s``, the flow time. This module holds the change of
variables between the two (README, "Flow time ... sigma = 1e8"), the node inputs' parsing, the
sigma presets (the library's own grids) and the two ways a teacher enters a ComfyUI run:

- :func:`run_sampler`: a whole run through :func:`distillpp.sample` (the pack's SAMPLER node), so a
  workflow reproduces the library exactly, student noise direction included;
- :class:`StepGuide`: one guided step at a time, for ComfyUI's own samplers, which only see the
  guider's (fused) x0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

import distillpp
from distillpp.guidance import NOISE, RENOISE, SPACE, TeacherGuidance
from distillpp.schedules import (
    FLOW_SIGMA_MAX,
    DiscreteVPSchedule,
    ddim_sigmas,
    euler_sigmas,
    flow_sigmas,
    flow_time_to_sigma,
    lcm_sigmas,
    tcd_sigmas,
    timestep_sigmas,
)

__all__ = [
    "KINDS",
    "RENOISE",
    "NOISE",
    "SPACE",
    "PRESETS",
    "parse_floats",
    "parse_ints",
    "make_guidance",
    "sigmas_to_ve",
    "x_to_ve",
    "x_from_ve",
    "VEDenoiser",
    "schedule_from_comfy",
    "preset_sigmas",
    "check_flow_fusion",
    "step_index",
    "StepGuide",
    "run_sampler",
    "FLOW_SIGMA_MAX",
]

# "ve": ComfyUI's EPS family (eps, v, x0, LCM model sampling): its x and sigma are distillpp's.
# "flow": ComfyUI's CONST family: x = (1 - s) x0 + s eps, sigma = s in [0, 1].
KINDS = ("ve", "flow")

# Preset name -> what it reproduces (the library's grid functions; see preset_sigmas).
PRESETS: dict[str, str] = {
    "lightning": "SDXL-Lightning: Euler, trailing timesteps (euler_sigmas, timestep_spacing='trailing')",
    "lcm": "LCM / LCM-LoRA: LCMScheduler's timesteps from the 50-step grid (lcm_sigmas)",
    "dmd2": "DMD2: explicit timesteps, 999,749,499,249 by default (timestep_sigmas)",
    "turbo": "SD/SDXL-Turbo: Euler ancestral, trailing timesteps (euler_sigmas, 'trailing')",
    "hyper-sd": "Hyper-SD n-step LoRAs: DDIM, trailing timesteps, last step to sigma 0 (ddim_sigmas)",
    "tcd": "TCD / Hyper-SD unified LoRA: TCDScheduler's timesteps (tcd_sigmas); sample with 'tcd'",
    "flux-schnell": "FLUX.1-schnell: FlowMatchEulerDiscreteScheduler, shift 1 (flow_sigmas), in flow time",
}


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in KINDS)}; got {kind!r}")
    return kind


def parse_floats(text: str, name: str) -> tuple[float, ...] | None:
    """A comma/space separated list of numbers from a STRING widget; ``None`` when empty.

    Args:
        text: e.g. ``"0.05, 0.02"``.
        name: the input's name, for the error message.
    """
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string of comma-separated numbers, got {type(text).__name__}")
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        return None
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite numbers, got {text!r}")
    return values


def parse_ints(text: str, name: str) -> tuple[int, ...] | None:
    """A comma/space separated list of integers (e.g. DMD2 timesteps); ``None`` when empty.

    Args:
        text: e.g. ``"999, 749, 499, 249"``.
        name: the input's name, for the error message.
    """
    values = parse_floats(text, name)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        raise ValueError(f"{name} must be integers, got {text!r}")
    return tuple(int(v) for v in values)


def make_guidance(
    strength: float,
    guided_steps: int,
    renoise: str,
    noise: str,
    space: str,
    teacher_cfg: float,
    samples: int = 1,
    strength_list: str = "",
    noise_mix: float = 0.5,
) -> TeacherGuidance:
    """The guider node's widgets as a :class:`distillpp.TeacherGuidance` (every check is the library's).

    Args:
        strength: ``lam`` of every guided step (used when ``strength_list`` is empty).
        guided_steps: how many leading steps are guided.
        renoise, noise, space: as in :class:`distillpp.TeacherGuidance`.
        teacher_cfg: the teacher's CFG scale (1 runs only its conditional branch).
        samples: K teacher re-noise draws averaged per guided step.
        strength_list: one ``lam`` per guided step, e.g. ``"0.05, 0.02"``; overrides ``strength``.
        noise_mix: weight of fresh noise for ``noise="hybrid"``.

    Raises:
        ValueError: naming the first invalid input.
    """
    values = parse_floats(strength_list, "strength_list")
    if values is not None and len(values) < guided_steps:
        raise ValueError(f"strength_list has {len(values)} values but guided_steps={guided_steps}")
    return TeacherGuidance(strength=values if values is not None else strength, guided_steps=guided_steps,
                           renoise=renoise, noise=noise, space=space, teacher_cfg=teacher_cfg, samples=samples,
                           noise_mix=noise_mix)


def sigmas_to_ve(sigmas: torch.Tensor, kind: str) -> torch.Tensor:
    """ComfyUI sigmas as VE sigmas: unchanged for ``ve``; flow time ``s -> s / (1 - s)`` (s = 1 -> 1e8).

    Float32 flow times are converted in float64 and returned in float32, so ``s = 0.25`` gives
    exactly ``flow_time_to_sigma``'s value, as the library's own flow grids do.

    Args:
        sigmas: a ComfyUI ``SIGMAS`` tensor.
        kind: ``"ve"`` or ``"flow"``.
    """
    if _check_kind(kind) == "ve":
        return sigmas
    if float(sigmas.max()) > 1 or float(sigmas.min()) < 0:
        raise ValueError(f"flow sigmas must be flow times in [0, 1], got {sigmas.tolist()}")
    return flow_time_to_sigma(sigmas.detach().cpu().double().numpy()).to(torch.float32).to(sigmas.device)


def _flow_scale(sigma_ve: torch.Tensor, ndim: int) -> torch.Tensor:
    """``1 + sigma`` per sample, right-padded to ``ndim``: x_ve = x_flow * (1 + sigma)."""
    s = sigma_ve.to(torch.float32).reshape(-1)
    return (1 + s).reshape(s.shape + (1,) * (ndim - 1))


def x_to_ve(x: torch.Tensor, sigma_ve: torch.Tensor, kind: str) -> torch.Tensor:
    """A ComfyUI sample at VE level ``sigma_ve`` in VE coordinates (flow: ``x / (1 - s) = x (1 + sigma)``).

    Args:
        x: ``[batch, ...]`` sample in ComfyUI's coordinates.
        sigma_ve: ``[batch]`` VE sigmas of the sample.
        kind: ``"ve"`` (returned unchanged) or ``"flow"``.
    """
    if _check_kind(kind) == "ve":
        return x
    return x.float() * _flow_scale(sigma_ve, x.ndim)


def x_from_ve(x: torch.Tensor, sigma_ve: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`x_to_ve`.

    Args:
        x: ``[batch, ...]`` sample in VE coordinates.
        sigma_ve: ``[batch]`` VE sigmas of the sample.
        kind: ``"ve"`` or ``"flow"``.
    """
    if _check_kind(kind) == "ve":
        return x
    return x.float() / _flow_scale(sigma_ve, x.ndim)


class VEDenoiser:
    """A denoiser in ComfyUI's coordinates, ``fn(x, sigma, **kw) -> x0``, as a distillpp VE denoiser.

    For ``flow`` it is :class:`distillpp.FlowDenoiser`'s change of variables with a network that
    already returns x0 (ComfyUI's ``CONST.calculate_denoised``): ``s = sigma / (1 + sigma)``,
    ``x_flow = x / (1 + sigma)``, in float32 (a 1e8 sigma overflows fp16). x0 is the same in both
    coordinate systems, so the output needs no conversion.

    Args:
        fn: ``fn(x, sigma, **kw)`` with ``sigma`` a ``[batch]`` tensor in ComfyUI's coordinates.
        kind: ``"ve"`` or ``"flow"``.
        schedule: a discrete model's noise table, declared as ``schedule`` like distillpp's own
            denoisers do: ``renoise="random"`` then draws the teacher's integer timesteps.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], kind: str, schedule: DiscreteVPSchedule | None = None):
        self.fn = fn
        self.kind = _check_kind(kind)
        self.schedule = schedule

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.kind == "ve":
            return self.fn(x, sigma, **kw)
        sigma = sigma.to(torch.float32)
        s = (sigma / (1 + sigma)).to(torch.float32)
        return self.fn(x_from_ve(x, sigma, "flow"), s, **kw).to(x.dtype)


def schedule_from_comfy(
    num_timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    zsnr: bool = False,
    model_sigmas: torch.Tensor | None = None,
) -> DiscreteVPSchedule:
    """The library's noise table for a ComfyUI ``ModelSamplingDiscrete`` (its stored parameters).

    ComfyUI's ``"linear"`` beta schedule is diffusers' ``scaled_linear``; it keeps ``num_timesteps``,
    ``linear_start``, ``linear_end`` and ``zsnr`` but not the schedule's name, so ``model_sigmas``
    (its table, when it has one entry per timestep) is compared against ours and a cosine or custom
    table is refused instead of silently getting another model's grid.

    Args:
        num_timesteps, linear_start, linear_end, zsnr: the ``ModelSamplingDiscrete``'s attributes.
        model_sigmas: its ``sigmas`` table, or ``None`` to skip the comparison.

    Raises:
        ValueError: zero-terminal-SNR models (infinite sigma_max) or a table that is not scaled-linear.
    """
    if zsnr:
        raise ValueError("zero-terminal-SNR models (zsnr=True) have an infinite sigma_max; no preset grid fits")
    schedule = DiscreteVPSchedule.from_betas(num_train_timesteps=int(num_timesteps), beta_start=float(linear_start),
                                             beta_end=float(linear_end), beta_schedule="scaled_linear")
    if model_sigmas is not None and model_sigmas.numel() == schedule.num_train_timesteps:
        ours = schedule.sigmas.to(torch.float32)
        if not torch.allclose(model_sigmas.detach().cpu().float(), ours, rtol=1e-4, atol=0):
            raise ValueError("the model's noise table is not the scaled-linear one of its linear_start/linear_end; "
                             "the presets only cover SD1.x/SD2/SDXL-style schedules")
    return schedule


def preset_sigmas(
    preset: str,
    steps: int,
    schedule: DiscreteVPSchedule | None = None,
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """A preset's sigma grid in ComfyUI's coordinates: VE sigmas, or flow times for ``flux-schnell``.

    Each is the library's grid for that student (``distillpp.schedules``), which equals the diffusers
    scheduler the student was released with.

    Args:
        preset: a key of :data:`PRESETS`.
        steps: number of sampling steps (ignored by ``dmd2`` when ``timesteps`` are given).
        schedule: the model's noise table (required except for ``flux-schnell``).
        timesteps: ``dmd2``'s explicit timesteps (default ``999, 749, 499, 249``).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(repr(p) for p in PRESETS)}; got {preset!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if preset == "flux-schnell":
        return flow_sigmas(steps, shift=1.0, return_flow_times=True)
    if schedule is None:
        raise ValueError(f"schedule is required for preset {preset!r} (a discrete eps/v model's noise table)")
    if preset in ("lightning", "turbo"):
        return euler_sigmas(schedule, steps, timestep_spacing="trailing")
    if preset == "lcm":
        return lcm_sigmas(schedule, steps)
    if preset == "hyper-sd":
        return ddim_sigmas(schedule, steps, timestep_spacing="trailing")
    if preset == "tcd":
        return tcd_sigmas(schedule, steps)
    T = schedule.num_train_timesteps
    if timesteps is None:
        timesteps = [T - 1 - k * (T // steps) for k in range(steps)]  # 999, 749, 499, 249 for 4 steps
    return timestep_sigmas(schedule, timesteps)


def check_flow_fusion(guidance: TeacherGuidance | None, sigmas: torch.Tensor, kind: str) -> None:
    """Refuse ``space="eps"`` on a flow run that starts at flow time 1.

    eps-space fusion sets ``x0 = x0_s - sigma * lam * (eps_t - d)``; at flow time 1 (VE sigma 1e8) any
    teacher-student difference in eps is multiplied by 1e8 and the sample is destroyed. The x0 space
    (the paper's) has no such factor.

    Args:
        guidance: the knobs (``None``: nothing to check).
        sigmas: the run's sigmas in ComfyUI's coordinates.
        kind: the student's coordinates.
    """
    if guidance is None or guidance.space != "eps" or guidance.guided_steps == 0 or _check_kind(kind) != "flow":
        return
    if float(sigmas[0]) >= 1.0:
        raise ValueError("space: 'eps' fusion at flow time 1 (VE sigma 1e8) multiplies the teacher-student eps "
                         "difference by 1e8; use space='x0' for flow students")


def step_index(sigma: float, sigmas: Sequence[float]) -> int | None:
    """Index ``i`` with ``sigmas[i] == sigma`` (relative 1e-5, for a sigma rounded to the sample's dtype).

    Args:
        sigma: the model call's sigma.
        sigmas: the run's grid (its final 0 is never a step).
    """
    for i, s in enumerate(sigmas[:-1]):
        if math.isclose(sigma, s, rel_tol=1e-5, abs_tol=0.0):
            return i
    return None


class StepGuide:
    """Teacher guidance for ComfyUI's own samplers: fuse the teacher into the student's x0, step by step.

    A ComfyUI sampler only receives the guider's x0, so an Euler-type sampler then steps along
    ``(x - x0_fused) / sigma`` instead of the student's own direction (the SAMPLER node of this
    pack keeps it). The first model call at grid sigma ``sigmas[i]``, ``i < guided_steps``, is
    guided; later calls at the same sigma (second-order stages) are not.

    Args:
        guidance: the knobs.
        teacher: VE denoiser (see :class:`VEDenoiser`).
        sigmas: the run's sigmas in ComfyUI's coordinates.
        kind: the student's coordinates, ``"ve"`` or ``"flow"``.
        generator: for the re-noising draws.
    """

    def __init__(self, guidance: TeacherGuidance, teacher: Callable[..., torch.Tensor], sigmas: torch.Tensor,
                 kind: str, generator: torch.Generator | None = None):
        self.kind = _check_kind(kind)
        check_flow_fusion(guidance, sigmas, kind)
        self.sigmas = [float(s) for s in sigmas]
        self.sigmas_ve = sigmas_to_ve(sigmas.detach().cpu().float(), kind)
        self.guide = guidance.bind(teacher, self.sigmas_ve, generator, {})
        self.done: set[int] = set()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, x0_student: torch.Tensor) -> torch.Tensor:
        """The guided x0 for the call at ``(x, sigma)``; ``x0_student`` when this call is not guided."""
        i = step_index(float(sigma.reshape(-1)[0]), self.sigmas)
        if i is None or i in self.done or i >= len(self.guide.lams):
            return x0_student
        self.done.add(i)
        sigma_ve = self.sigmas_ve[i].to(x.device)
        x_ve = x_to_ve(x, sigma_ve.expand(x.shape[0]), self.kind)
        x0, _ = self.guide(i, x_ve, x0_student.to(x_ve.dtype))
        return x0.to(x0_student.dtype)

    def finish(self) -> None:
        """After the run: raise :class:`distillpp.NonFiniteError` if a guided call saw NaN/Inf.

        The guide keeps its finiteness flags on the device and is read once per run (no per-step sync).
        """
        self.guide.raise_if_non_finite()


def run_sampler(
    sampler: str,
    student: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    kind: str,
    teacher: Callable[..., torch.Tensor] | None = None,
    guidance: TeacherGuidance | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, int], None] | None = None,
    disable: bool = True,
    **sampler_kwargs: Any,
) -> torch.Tensor:
    """One :func:`distillpp.sample` run on a sample and sigmas in ComfyUI's coordinates.

    Args:
        sampler: a key of ``distillpp.SAMPLERS``.
        student, teacher: VE denoisers (:class:`VEDenoiser`); ``teacher=None`` samples the student alone.
        x: the noised start in ComfyUI's coordinates (after ``model_sampling.noise_scaling``).
        sigmas: the run's sigmas in ComfyUI's coordinates.
        kind: ``"ve"`` or ``"flow"`` (the student's).
        guidance: the knobs (``None``: no teacher).
        generator: every random draw (sampler noise and re-noising).
        callback: ComfyUI-style ``callback(i, x0, x, total_steps)``, ``x`` in ComfyUI's coordinates.
        disable: hide the progress bar.
        **sampler_kwargs: solver knobs (``eta``).

    Returns:
        The sample at ``sigmas[-1] = 0`` (the same in both coordinate systems).
    """
    check_flow_fusion(guidance if teacher is not None else None, sigmas, kind)
    sigmas_ve = sigmas_to_ve(sigmas.detach().cpu().float(), kind).to(x.device)
    x_ve = x_to_ve(x, sigmas_ve[0].expand(x.shape[0]), kind)
    total = len(sigmas) - 1
    lib_callback = None
    if callback is not None:
        def lib_callback(d: dict) -> None:
            callback(d["i"], d["denoised"], x_from_ve(d["x"], d["sigma"].reshape(1).expand(d["x"].shape[0]), kind),
                     total)
    out = distillpp.sample(student, x_ve, sigmas_ve, sampler=sampler, teacher=teacher, guidance=guidance,
                           generator=generator, callback=lib_callback, disable=disable, **sampler_kwargs)
    return out

