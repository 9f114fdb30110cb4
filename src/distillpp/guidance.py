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
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from .denoisers import append_dims, repeat_cond
from .samplers import random_tensor, randn_like

__all__ = ["TeacherGuidance", "GuidanceInfo", "NonFiniteError", "RENOISE", "NOISE", "SPACE", "as_number", "as_count"]

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


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def as_number(value: Any, name: str) -> float:
    """``value`` as a float when it is a real number (Python, numpy or 0-d tensor scalar), else a ValueError.

    Strings and booleans are refused rather than converted, so ``strength="1"`` is not read as a list
    of characters or as 1.0 by accident.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    elif hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar or 0-d array
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def as_count(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` (Python or numpy/0-d tensor integer), else a ValueError naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    elif hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "shape", None) == () \
            and getattr(value.dtype, "kind", "") in "iu":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_strength(value: Any, where: str) -> float:
    v = as_number(value, f"strength{where}")
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise ValueError(f"strength{where} must be in [0, 1], got {v}")
    return v


@dataclass(frozen=True, init=False)
class TeacherGuidance:
    """The knobs of teacher-guided sampling; the one representation used by the API, pipelines and CLI.

    Immutable: derive variants with ``dataclasses.replace(g, strength=0.2)``.

    Args:
        strength: ``lam``: a constant in [0, 1], a sequence with one value per guided step, or a callable
            ``strength(i, sigma_i) -> float``. 0 gives output bit-identical to the plain sampler.
        guided_steps: how many leading sampler steps are guided (0 = none). ``steps=`` is accepted as
            an alias (the name used in the paper-era API).
        renoise: teacher level: ``"next"`` (default, the paper's ``s = t - dt``), ``"same"``, ``"random"``.
        noise: re-noising direction: ``"random"`` (default), ``"deterministic"``, ``"hybrid"``.
        space: fusion space, ``"x0"`` (the paper) or ``"eps"`` (reference code for LCM/DMD2).
        teacher_cfg: teacher CFG scale, passed to the teacher as ``cfg_scale=`` (see ``CFGDenoiser``);
            ``None`` leaves the teacher's own default.
        samples: ``K`` teacher re-noise draws averaged in one batched forward (not in the paper).
        noise_mix: weight of fresh noise in ``hybrid`` noise, in [0, 1].

    Raises:
        ValueError: any knob outside its range, naming it.
    """

    strength: Strength = 0.1
    guided_steps: int = 1
    renoise: str = "next"
    noise: str = "random"
    space: str = "x0"
    teacher_cfg: float | None = None
    samples: int = 1
    noise_mix: float = 0.5

    def __init__(
        self,
        strength: Strength = 0.1,
        guided_steps: int | None = None,
        renoise: str = "next",
        noise: str = "random",
        space: str = "x0",
        teacher_cfg: float | None = None,
        samples: int = 1,
        noise_mix: float = 0.5,
        *,
        steps: int | None = None,
    ):
        if steps is not None and guided_steps is not None and steps != guided_steps:
            raise ValueError(f"give guided_steps or its alias steps, not both (got {guided_steps!r} and {steps!r})")
        count = guided_steps if guided_steps is not None else (steps if steps is not None else 1)
        if isinstance(strength, str):
            raise ValueError(f"strength must be a number in [0, 1], a sequence of them or a callable, got {strength!r}")
        if callable(strength):
            pass
        elif isinstance(strength, (list, tuple)) or (
            isinstance(strength, torch.Tensor) and strength.ndim == 1
        ) or (hasattr(strength, "ndim") and getattr(strength, "ndim", 0) == 1):
            strength = tuple(_check_strength(v, f"[{k}]") for k, v in enumerate(strength))
        else:
            strength = _check_strength(strength, "")
        set_ = object.__setattr__
        set_(self, "strength", strength)
        set_(self, "guided_steps", as_count(count, "guided_steps", 0))
        set_(self, "renoise", _check_choice("renoise", renoise, RENOISE))
        set_(self, "noise", _check_choice("noise", noise, NOISE))
        set_(self, "space", _check_choice("space", space, SPACE))
        if teacher_cfg is not None:
            teacher_cfg = as_number(teacher_cfg, "teacher_cfg")
            if not math.isfinite(teacher_cfg):
                raise ValueError(f"teacher_cfg must be a finite number or None, got {teacher_cfg}")
        set_(self, "teacher_cfg", teacher_cfg)
        set_(self, "samples", as_count(samples, "samples", 1))
        mix = as_number(noise_mix, "noise_mix")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"noise_mix must be in [0, 1], got {mix}")
        set_(self, "noise_mix", mix)

    @property
    def steps(self) -> int:
        """Alias of :attr:`guided_steps`."""
        return self.guided_steps

    def strengths(self, sigmas: torch.Tensor) -> list[float]:
        """``lam`` of each guided step for this grid; validates against the number of steps."""
        n = len(sigmas) - 1
        k = self.guided_steps
        if k > n:
            raise ValueError(f"guided_steps must be in [0, {n}] (the number of sampler steps), got {k}")
        if isinstance(self.strength, float):
            return [self.strength] * k
        if callable(self.strength):
            return [_check_strength(self.strength(i, float(sigmas[i])), f"({i}, sigma)") for i in range(k)]
        if len(self.strength) < k:
            raise ValueError(f"strength has {len(self.strength)} values but guided_steps={k} are guided")
        return list(self.strength[:k])

    def teacher_calls(self, sigmas: torch.Tensor) -> int:
        """Guided steps on this grid that run the teacher: a step whose strength is 0 skips it (the guide
        returns the student's estimate), so strengths ``(0, lam)`` cost one call. Validates like
        :meth:`strengths`."""
        return sum(1 for lam in self.strengths(sigmas) if lam != 0)

    def bind(
        self,
        teacher: Callable[..., torch.Tensor],
        sigmas: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        teacher_args: dict[str, Any] | None = None,
        teacher_schedule: Any = None,
        device: torch.device | str | None = None,
    ) -> "_Guide":
        """The per-run guide a sampler calls at each step (validated and prepared, nothing run yet).

        Args:
            teacher: teacher denoiser ``D(x, sigma, **teacher_args) -> x0``.
            sigmas: the run's grid (read once, here; a host grid costs no device read).
            generator: one generator, one per image (see :func:`distillpp.samplers.random_tensor`) or ``None``.
            teacher_args: the teacher's conditioning.
            teacher_schedule: the teacher's :class:`~distillpp.DiscreteVPSchedule`; ``renoise="random"``
                then draws among its integer timesteps. ``None``: uniform in flow time.
            device: the sample's device, where the teacher's timestep table is copied before the
                loop (default: ``sigmas``'s).
        """
        return _Guide(self, teacher, sigmas, generator, teacher_args or {}, teacher_schedule, device)


class _Guide:
    """The per-run guide: ``guide(i, x, x0_s, sigma=None) -> (x0, GuidanceInfo | None)``.

    Everything the loop needs is prepared here once per run (host floats for the grid and the
    strengths, the teacher's timestep table on the device), so a guided step never reads a tensor back
    to the host. Non-finite outputs are recorded as device flags; :meth:`raise_if_non_finite` reads
    them once after the run and names the first bad evaluation.
    """

    def __init__(self, cfg: TeacherGuidance, teacher: Callable[..., torch.Tensor], sigmas: torch.Tensor,
                 generator: Any, teacher_args: dict[str, Any], teacher_schedule: Any = None,
                 device: torch.device | str | None = None):
        self.cfg, self.teacher, self.generator, self.teacher_args = cfg, teacher, generator, teacher_args
        self.grid = sigmas.tolist()
        self.dtype = sigmas.dtype
        self.device = torch.device(device) if device is not None else sigmas.device
        self.lams = cfg.strengths(torch.tensor(self.grid, dtype=torch.float64))
        self.min_positive = min(s for s in self.grid if s > 0)
        self.schedule = teacher_schedule if hasattr(teacher_schedule, "sigma_to_t") else None
        if self.schedule is not None:
            table = self.schedule.sigmas
            self._tables = {self.device: table.to(self.device)}  # per device: one copy, not one per step
            self._log_table = table.clamp(min=1e-10).log().numpy()
        self._checked_shape = False
        self._finite: list[tuple] = []

    def _teacher_t(self, sigma: float) -> int:
        """The teacher's nearest timestep in log-sigma (as ``sigma_to_t(quantize=True)``), on the host."""
        return int(np.abs(self._log_table - math.log(max(sigma, 1e-10))).argmin())

    def teacher_sigma(self, i: int, batch: int, device: torch.device, sigma: float | None = None) -> torch.Tensor:
        """``sigma'`` of each of ``batch`` re-noised samples of step ``i`` (stage ``sigma``), in the grid's dtype."""
        sigma = self.grid[i] if sigma is None else sigma
        if self.cfg.renoise == "same":
            level = sigma
        elif self.cfg.renoise == "next":
            level = self.grid[i + 1] if self.grid[i + 1] > 0 else self.min_positive
        else:
            u = random_tensor((batch,), self.generator, device, torch.float64, uniform=True)
            if self.schedule is not None:
                # Uniform over the teacher's integer timesteps in (0, t_i].
                t_i = self._teacher_t(sigma)
                t = (u * t_i).floor().long() + 1
                if device not in self._tables:
                    self._tables[device] = self._tables[self.device].to(device)
                return self._tables[device][t.clamp(max=t_i)].to(self.dtype)
            # No timestep table: uniform in flow time s = sigma / (1 + sigma) over (0, s_i].
            s = u * (sigma / (1 + sigma))
            return (s / (1 - s)).to(self.dtype)
        return torch.full((batch,), level, device=device, dtype=self.dtype)

    def _noise(self, x0_rep: torch.Tensor, d_rep: torch.Tensor) -> torch.Tensor:
        if self.cfg.noise == "deterministic":
            return d_rep
        z = randn_like(x0_rep, self.generator)
        if self.cfg.noise == "random":
            return z
        mix = float(self.cfg.noise_mix)
        return math.sqrt(1 - mix) * d_rep + math.sqrt(mix) * z

    def _watch(self, t: torch.Tensor, who: str, i: int, sigma: float, sigma_t: Any = None) -> None:
        """Record (on ``t``'s device, no host read) whether ``t`` is finite."""
        self._finite.append((torch.isfinite(t).all(), who, i, sigma, sigma_t))

    def raise_if_non_finite(self) -> None:
        """Raise :class:`NonFiniteError` naming the first evaluation that returned NaN/Inf (one host read)."""
        if not self._finite:
            return
        checks, self._finite = self._finite, []
        device = checks[0][0].device
        flags = torch.stack([c[0].to(device) for c in checks]).tolist()
        for ok, (_, who, i, sigma, sigma_t) in zip(flags, checks):
            if not ok:
                at = f"step {i} (sigma={sigma:.6g}"
                if sigma_t is not None:
                    at += f", teacher sigma={float(sigma_t.min()):.6g}..{float(sigma_t.max()):.6g}"
                raise NonFiniteError(f"the {who} returned NaN or Inf at {at}); check its dtype (fp16 overflow), "
                                     "weights and conditioning")

    def __call__(self, i: int, x: torch.Tensor, x0_s: torch.Tensor,
                 sigma: float | None = None) -> tuple[torch.Tensor, GuidanceInfo | None]:
        """Guide the student's ``x0_s`` of step ``i``, evaluated at ``x`` and ``sigma`` (default: ``sigma_i``).

        A multistage sampler calls it once per stage with the stage's sigma (the rule is in
        :mod:`distillpp.samplers`).
        """
        if i >= len(self.lams) or self.lams[i] == 0.0:
            return x0_s, None
        lam = self.lams[i]
        sigma = self.grid[i] if sigma is None else sigma
        k, b = self.cfg.samples, x.shape[0]
        self._watch(x0_s, "student", i, sigma)

        d = (x - x0_s) / sigma
        x0_rep = x0_s.repeat(k, *([1] * (x.ndim - 1)))
        d_rep = d.repeat(k, *([1] * (x.ndim - 1)))
        sigma_t = self.teacher_sigma(i, k * b, x.device, sigma)
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
        self._watch(out, "teacher", i, sigma, sigma_t)

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
