"""Teacher guidance (Distillation++, Park, Lee & Ye, ICCV 2025): the method in one file.

At a guided step ``i`` the student's clean estimate ``x0_s`` is re-noised to a teacher
level ``sigma'``, the teacher denoises it, and the two estimates are fused:

1. ``sigma'`` from the renoise schedule: ``next`` (``sigma_{i+1}``, the paper's ``s = t - dt``),
   ``same`` (``sigma_i``) or ``random`` (a teacher timestep drawn uniformly from ``(0, t_i]``).
   Guiding the last step, where ``sigma_{i+1} = 0``, uses the smallest positive sigma of the grid.
2. ``x' = x0_s + sigma' * n`` with ``n`` fresh noise (``random``), the student's own direction
   ``d = (x_i - x0_s) / sigma_i`` (``deterministic``), or ``hybrid``:
   ``n = sqrt(1 - noise_mix) * d + sqrt(noise_mix) * z``.
3. ``x0_t = teacher(x', sigma')``, with ``samples`` draws averaged in one batched forward.
4. ``space="x0"``: ``x0 = (1 - lam) x0_s + lam x0_t``; ``space="eps"``: ``eps = eps_s + lam (eps_t - eps_s)``
   with ``eps_t = (x' - x0_t) / sigma'``, ``x0 = x_i - sigma_i eps``.

For LCM students the reference code fuses eps before LCM's boundary condition; we fuse the
denoiser's eps after it. The two differ by ``c_skip(t)``, which is below 1e-7 at every
timestep LCM and DMD2 guide (t >= 249), so the difference is below float32 resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch

from .denoisers import append_dims, repeat_cond
from .samplers import randn_like
from .schedules import sigma_to_flow_time

__all__ = ["TeacherGuidance", "GuidanceInfo", "NonFiniteError", "RENOISE", "NOISE", "SPACE"]

RENOISE = ("next", "same", "random")
NOISE = ("random", "deterministic", "hybrid")
SPACE = ("x0", "eps")

Strength = Union[float, Sequence[float], Callable[[int, float], float]]


class NonFiniteError(FloatingPointError):
    """A model returned NaN or Inf during guided sampling."""


@dataclass
class GuidanceInfo:
    """Per-step diagnostics passed to the sampler callback under ``"guidance"``.

    Attributes:
        step: step index ``i``.
        sigma: the student's noise level ``sigma_i``.
        sigma_teacher: the teacher's level ``sigma'`` (``[batch]``).
        strength: ``lam`` at this step.
        x0_student, x0_teacher, x0: the student estimate, the (averaged) teacher estimate, the fused one.
        correction: RMS of ``x0 - x0_student`` per sample (``[batch]``): how much the teacher moved it.
    """

    step: int
    sigma: float
    sigma_teacher: torch.Tensor
    strength: float
    x0_student: torch.Tensor
    x0_teacher: torch.Tensor
    x0: torch.Tensor
    correction: torch.Tensor


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _check_strength(value: float, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"strength{where} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise ValueError(f"strength{where} must be in [0, 1], got {v}")
    return v


@dataclass
class TeacherGuidance:
    """The knobs of teacher-guided sampling (SPEC section 4).

    Args:
        strength: ``lam``: a constant in [0, 1], a list with one value per guided step, or a callable
            ``strength(i, sigma_i) -> float``. 0 gives output bit-identical to the plain sampler.
        steps: how many leading sampler steps are guided (0 = none).
        renoise: teacher level: ``"next"`` (default, the paper's ``s = t - dt``), ``"same"``, ``"random"``.
        noise: re-noising direction: ``"random"`` (default), ``"deterministic"``, ``"hybrid"``.
        space: fusion space, ``"x0"`` (the paper) or ``"eps"`` (reference code for LCM/DMD2).
        teacher_cfg: teacher CFG scale, passed to the teacher as ``cfg_scale=`` (see ``CFGDenoiser``);
            ``None`` leaves the teacher's own default.
        samples: ``K`` teacher re-noise draws averaged in one batched forward (not in the paper).
        noise_mix: weight of fresh noise in ``hybrid`` noise, in [0, 1].
    """

    strength: Strength = 0.1
    steps: int = 1
    renoise: str = "next"
    noise: str = "random"
    space: str = "x0"
    teacher_cfg: float | None = None
    samples: int = 1
    noise_mix: float = 0.5

    def __post_init__(self) -> None:
        _check_choice("renoise", self.renoise, RENOISE)
        _check_choice("noise", self.noise, NOISE)
        _check_choice("space", self.space, SPACE)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")
        if not 0.0 <= float(self.noise_mix) <= 1.0:
            raise ValueError(f"noise_mix must be in [0, 1], got {self.noise_mix}")
        if self.teacher_cfg is not None and not math.isfinite(float(self.teacher_cfg)):
            raise ValueError(f"teacher_cfg must be a finite number or None, got {self.teacher_cfg}")
        if isinstance(self.strength, (int, float)):
            _check_strength(self.strength, "")
        elif not callable(self.strength):
            values = list(self.strength)
            for k, v in enumerate(values):
                _check_strength(v, f"[{k}]")

    def strengths(self, sigmas: torch.Tensor) -> list[float]:
        """``lam`` of each guided step for this grid; validates against the number of steps."""
        n = len(sigmas) - 1
        if self.steps > n:
            raise ValueError(f"steps must be in [0, {n}] (the number of sampler steps), got {self.steps}")
        if isinstance(self.strength, (int, float)):
            return [float(self.strength)] * self.steps
        if callable(self.strength):
            return [_check_strength(self.strength(i, float(sigmas[i])), f"({i}, sigma)") for i in range(self.steps)]
        values = list(self.strength)
        if len(values) < self.steps:
            raise ValueError(f"strength has {len(values)} values but steps={self.steps} are guided")
        return [float(v) for v in values[: self.steps]]

    def bind(
        self,
        teacher: Callable[..., torch.Tensor],
        sigmas: torch.Tensor,
        generator: torch.Generator | None = None,
        teacher_args: dict[str, Any] | None = None,
    ) -> "_Guide":
        """The per-run guide a sampler calls at each step (validated, nothing run yet)."""
        return _Guide(self, teacher, sigmas, self.strengths(sigmas), generator, teacher_args or {})


@dataclass
class _Guide:
    cfg: TeacherGuidance
    teacher: Callable[..., torch.Tensor]
    sigmas: torch.Tensor
    lams: list[float]
    generator: torch.Generator | None
    teacher_args: dict[str, Any]
    _checked_shape: bool = field(default=False, repr=False)

    def teacher_sigma(self, i: int, batch: int, device: torch.device) -> torch.Tensor:
        """``sigma'`` for each of ``batch`` re-noised samples, in the grid's dtype."""
        sigma = self.sigmas[i]
        if self.cfg.renoise == "same":
            level = sigma
        elif self.cfg.renoise == "next":
            level = self.sigmas[i + 1]
            if level <= 0:
                level = self.sigmas[self.sigmas > 0].min()
        else:
            u = torch.rand(batch, generator=self.generator, device=self._gen_device(device), dtype=torch.float64)
            u = u.to(device)
            schedule = getattr(self.teacher, "schedule", None)
            if schedule is not None and hasattr(schedule, "sigma_to_t"):
                # Uniform over the teacher's integer timesteps in (0, t_i].
                table = schedule.sigmas.to(device)
                t_i = int(schedule.sigma_to_t(sigma.reshape(1).to(device), quantize=True).item())
                t = (u * t_i).floor().long() + 1
                return table[t.clamp(max=t_i)].to(self.sigmas.dtype)
            # No timestep table: uniform in flow time s = sigma / (1 + sigma) over (0, s_i].
            s = u * float(sigma_to_flow_time(sigma.double()))
            return (s / (1 - s)).to(self.sigmas.dtype)
        return torch.full((batch,), float(level), device=device, dtype=self.sigmas.dtype)

    def _gen_device(self, device: torch.device) -> torch.device:
        return self.generator.device if self.generator is not None else device

    def _noise(self, x0_rep: torch.Tensor, d_rep: torch.Tensor) -> torch.Tensor:
        if self.cfg.noise == "deterministic":
            return d_rep
        z = randn_like(x0_rep, self.generator)
        if self.cfg.noise == "random":
            return z
        mix = float(self.cfg.noise_mix)
        return math.sqrt(1 - mix) * d_rep + math.sqrt(mix) * z

    def __call__(self, i: int, x: torch.Tensor, x0_s: torch.Tensor) -> tuple[torch.Tensor, GuidanceInfo | None]:
        if i >= len(self.lams) or self.lams[i] == 0.0:
            return x0_s, None
        lam = self.lams[i]
        sigma = float(self.sigmas[i])
        k, b = self.cfg.samples, x.shape[0]
        _check_finite(x0_s, "student", i, sigma)

        d = (x - x0_s) / sigma
        x0_rep = x0_s.repeat(k, *([1] * (x.ndim - 1)))
        d_rep = d.repeat(k, *([1] * (x.ndim - 1)))
        sigma_t = self.teacher_sigma(i, k * b, x.device)
        x_t = x0_rep + append_dims(sigma_t, x.ndim).to(x.dtype) * self._noise(x0_rep, d_rep)

        args = repeat_cond(self.teacher_args, k)
        if self.cfg.teacher_cfg is not None:
            args = {**args, "cfg_scale": self.cfg.teacher_cfg}
        # sigma stays in the grid's dtype: a bf16 sigma would send a discrete teacher to a neighbouring t.
        out = self.teacher(x_t, sigma_t, **args).to(x.dtype)
        if not self._checked_shape:
            if tuple(out.shape) != tuple(x_t.shape):
                raise ValueError(
                    f"teacher output shape {tuple(out.shape)} differs from the student's {tuple(x_t.shape)}; "
                    "teacher and student must work on the same sample shape (latent channels, size)"
                )
            self._checked_shape = True
        _check_finite(out, "teacher", i, sigma, sigma_t)

        x0_t = out.reshape(k, *x.shape).mean(0)
        if self.cfg.space == "x0":
            x0 = (1 - lam) * x0_s + lam * x0_t
        else:
            eps_t = ((x_t - out) / append_dims(sigma_t, x.ndim).to(x.dtype)).reshape(k, *x.shape).mean(0)
            eps = d + lam * (eps_t - d)
            x0 = x - sigma * eps
        correction = (x0 - x0_s).flatten(1).pow(2).mean(1).sqrt()
        info = GuidanceInfo(i, sigma, sigma_t.reshape(k, b)[0], lam, x0_s, x0_t, x0, correction)
        return x0, info


def _check_finite(t: torch.Tensor, who: str, i: int, sigma: float, sigma_t: torch.Tensor | None = None) -> None:
    if not torch.isfinite(t).all():
        at = f"step {i} (sigma={sigma:.6g}"
        if sigma_t is not None:
            at += f", teacher sigma={float(sigma_t.min()):.6g}..{float(sigma_t.max()):.6g}"
        raise NonFiniteError(
            f"the {who} returned NaN or Inf at {at}); check its dtype (fp16 overflow), weights and conditioning"
        )
