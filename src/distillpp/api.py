"""``distillpp.sample``: one entry point over every sampler, with or without a teacher."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Sequence

import torch

from .denoisers import CFGDenoiser
from .guidance import NonFiniteError, TeacherGuidance, as_number
from .samplers import SAMPLERS

__all__ = ["sample", "check_sigmas", "check_sampler_options"]


def check_sigmas(sigmas: Any) -> torch.Tensor:
    """Validate a sigma grid: a 1-D tensor, strictly descending, positive, ending in exactly 0."""
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"sigmas must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.dtype not in (torch.float32, torch.float64):
        # A bf16/fp16 grid rounds the sigmas themselves, and a discrete model then looks up a
        # neighbouring timestep (LCM's 759 becomes 758); samples may be half precision, sigmas not.
        raise ValueError(
            f"sigmas must be float32 or float64, got {sigmas.dtype}; keep the grid in float32 and cast x instead"
        )
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError("sigmas must be finite")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must end in 0, got last value {float(sigmas[-1])}")
    if not (sigmas[:-1] > 0).all():
        raise ValueError("sigmas must be positive before the final 0")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}")
    return sigmas


# Keyword arguments every sampler takes from sample() itself; the rest of its signature are solver knobs.
_SAMPLE_ARGS = ("model", "x", "sigmas", "extra_args", "callback", "disable", "generator", "guide")


def check_sampler_options(sampler: str, options: dict[str, Any]) -> None:
    """Refuse solver knobs ``sampler`` does not take, and a NaN, infinite or negative ``eta`` / ``s_noise``.

    Other knobs are checked by their sampler.

    Args:
        sampler: a key of :data:`distillpp.samplers.SAMPLERS`.
        options: the ``**sampler_kwargs`` given to :func:`sample`.
    """
    accepted = [n for n in inspect.signature(SAMPLERS[sampler]).parameters if n not in _SAMPLE_ARGS]
    for name, value in options.items():
        if name not in accepted:
            raise ValueError(
                f"sampler {sampler!r} takes no option {name!r}; its options: {', '.join(accepted) or 'none'}"
            )
        if name in ("eta", "s_noise"):  # a NaN or negative one gives NaN samples with no error
            v = as_number(value, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_teacher_cfg(teacher: Any, guidance: TeacherGuidance, teacher_args: Any) -> None:
    """A CFG teacher asked for a scale != 1 without ``cond``/``uncond`` would silently run conditional-only."""
    if not isinstance(teacher, CFGDenoiser):
        return
    scale = guidance.teacher_cfg if guidance.teacher_cfg is not None else teacher.scale
    if scale == 1.0:
        return
    if not (isinstance(teacher_args, dict) and "cond" in teacher_args and "uncond" in teacher_args):
        keys = sorted(teacher_args) if isinstance(teacher_args, dict) else teacher_args
        raise ValueError(
            f"teacher_args must hold 'cond' and 'uncond' conditioning dicts for a CFGDenoiser teacher with CFG "
            f"scale {scale:g} (else it runs without CFG); got {keys!r} (teacher_args defaults to extra_args). "
            "Pass teacher_cfg=1 to run the teacher conditional-only"
        )


def _warn_if_unguided(teacher: Any, guidance: TeacherGuidance | None) -> None:
    """Half of a guided call samples with the student alone (the API contract); say so rather than stay silent."""
    active = guidance is not None and guidance.guided_steps > 0 and guidance.strength != 0.0
    if active and teacher is None:
        warnings.warn("guidance= was given without teacher=: sampling with the student alone, unguided "
                      "(pass teacher= to guide, or guidance=None to silence this)", UserWarning, stacklevel=3)
    elif teacher is not None and guidance is None:
        warnings.warn("teacher= was given without guidance=: sampling with the student alone, unguided "
                      "(pass guidance=TeacherGuidance(...) to guide, or teacher=None to silence this)",
                      UserWarning, stacklevel=3)


class _ShapeCheckedStudent:
    """The student, with its first output's shape compared to its input's and every output checked for NaN/Inf.

    A student returning e.g. ``[B, 1, H, W]`` for a ``[B, C, H, W]`` sample would broadcast through
    every solver update and give a "valid" result of the wrong content; once the first call matches,
    later calls are only checked for finiteness. That check is a device flag per call, read once after
    the run by :meth:`raise_if_non_finite` (no host sync inside the sampling loop), so an unguided
    run that went NaN raises too instead of returning a "valid" tensor.
    """

    def __init__(self, student: Callable[..., torch.Tensor]):
        self.student = student
        self.checked = False
        self.finite: list[tuple[torch.Tensor, torch.Tensor]] = []  # (all finite?, sigma) per call, on device

    def raise_if_non_finite(self, sigmas: torch.Tensor) -> None:
        """Raise :class:`NonFiniteError` naming the step of the first call that returned NaN/Inf (one host read).

        Args:
            sigmas: the run's grid, read only to name the step when a call went bad.
        """
        if not self.finite:
            return
        flags = torch.stack([ok for ok, _ in self.finite]).tolist()
        if all(flags):
            return
        grid = sigmas.tolist()
        sigma = float(self.finite[flags.index(False)][1])
        # The step whose interval holds this sigma (a midpoint evaluation belongs to the step it starts from).
        step = max([i for i, s in enumerate(grid[:-1]) if s >= sigma * (1 - 1e-6)], default=0)
        raise NonFiniteError(f"the student returned NaN or Inf at step {step} (sigma={sigma:.6g}); check its dtype "
                             "(fp16 overflow), weights and conditioning")

    def __getattr__(self, name: str) -> Any:  # schedule, dtype, ... of the wrapped denoiser
        if name == "student":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.student, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = self.student(x, sigma, **cond)
        if not self.checked:
            x0 = out[0] if isinstance(out, tuple) else out  # (x0, x0_uncond) when a CFG++ sampler asks
            if not isinstance(x0, torch.Tensor) or tuple(x0.shape) != tuple(x.shape):
                got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
                raise ValueError(
                    f"student output {got} differs from its input's shape {tuple(x.shape)}; a denoiser "
                    "D(x, sigma) must return an x0 estimate shaped like x"
                )
            self.checked = True
        x0 = out[0] if isinstance(out, tuple) else out
        if isinstance(x0, torch.Tensor):
            self.finite.append((torch.isfinite(x0).all(), sigma.reshape(-1)[:1]))
        return out


def sample(
    student: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    teacher: Callable[..., torch.Tensor] | None = None,
    guidance: TeacherGuidance | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    extra_args: dict[str, Any] | None = None,
    teacher_args: dict[str, Any] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = True,
    teacher_schedule: Any = None,
    schedule: Any = None,
    cfgpp: bool = False,
    **sampler_kwargs: Any,
) -> torch.Tensor:
    """Sample with a (few-step) student denoiser, optionally guided by its teacher.

    Args:
        student: denoiser ``D(x, sigma, **extra_args) -> x0``.
        x: initial sample at ``sigmas[0]`` (see :func:`distillpp.schedules.initial_sample`).
        sigmas: descending noise levels ending in 0.
        sampler: ``"euler"``, ``"euler_ancestral"``, ``"consistency"``, ``"ddim"``, ``"dpmpp_2s_ancestral"``
            or ``"tcd"``.
        teacher: teacher denoiser; ``None`` samples with the student alone.
        guidance: :class:`TeacherGuidance` knobs; ``None`` samples with the student alone. Giving only
            one of ``teacher`` and ``guidance`` samples unguided and emits a ``UserWarning`` naming the
            missing one (no warning for guidance that guides nothing: strength 0 or no guided steps).
        generator: ``torch.Generator`` for every random draw (sampler noise and teacher re-noising), or a
            list of them, one per image of ``x`` (diffusers' convention): image ``b``'s draws then all come
            from ``generator[b]``, so it does not depend on the batch size or its batch companions.
        extra_args: conditioning for the student.
        teacher_args: conditioning for the teacher (defaults to ``extra_args``).
        callback: called every step with a dict (``x``, ``i``, ``sigma``, ``denoised``,
            ``student_denoised``, ``guidance``: a :class:`GuidanceInfo` on guided steps, else ``None``);
            ``sigma`` and ``sigma_next`` are 0-d tensors of the grid on the host (read without a sync).
        disable: disable the progress bar (default ``True``; ``False`` shows it).
        teacher_schedule: the teacher's :class:`~distillpp.DiscreteVPSchedule`, from which
            ``renoise="random"`` draws integer timesteps. ``schedule``: the student's, which ``"tcd"``
            steps on. Both default to the denoiser's declared ``schedule`` attribute (this is the one place
            that reads it); a teacher without one draws random levels uniformly in flow time.
        cfgpp: CFG++ (Chung et al. 2024): step along the unconditional direction
            ``(x - D_uncond(x)) / sigma`` while x0 stays the CFG estimate. Needs a
            :class:`~distillpp.CFGDenoiser` student; not for ``"consistency"`` (it takes no direction).
        **sampler_kwargs: solver knobs, e.g. ``eta`` for ``ddim``/ancestral samplers.

    Raises:
        ValueError: on invalid arguments, before any model call (among them: half-precision sigmas, an
            unknown or NaN solver knob, a ``CFGDenoiser`` teacher with CFG scale != 1 whose
            ``teacher_args`` lack ``cond``/``uncond``); and at the first student call when its output's
            shape differs from ``x``'s.
    """
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(repr(s) for s in SAMPLERS)}; got {sampler!r}")
    if not callable(student):
        raise ValueError("student must be a callable denoiser D(x, sigma, **cond)")
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError("x must be a tensor with a batch dimension")
    check_sigmas(sigmas)
    if guidance is not None and not isinstance(guidance, TeacherGuidance):
        raise ValueError(f"guidance must be a TeacherGuidance or None, got {type(guidance).__name__}")
    if teacher is not None and not callable(teacher):
        raise ValueError("teacher must be a callable denoiser D(x, sigma, **cond) or None")
    _check_generator(generator, x)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, value in (("extra_args", extra_args), ("teacher_args", teacher_args)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict of conditioning keyword arguments or None, got "
                             f"{type(value).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    check_sampler_options(sampler, sampler_kwargs)
    _warn_if_unguided(teacher, guidance)
    if teacher is not None and guidance is not None:
        _check_teacher_cfg(teacher, guidance, extra_args if teacher_args is None else teacher_args)
    if cfgpp:
        if sampler == "consistency":
            raise ValueError("cfgpp does not apply to sampler 'consistency' (it re-noises with fresh noise, "
                             "not along a direction)")
        if not isinstance(student, CFGDenoiser):
            raise ValueError(f"cfgpp=True needs a CFGDenoiser student (it returns the unconditional x0 as well), "
                             f"got {type(student).__name__}")
        sampler_kwargs["cfgpp"] = True
    if sampler == "tcd":
        sampler_kwargs["schedule"] = _declared_schedule(student) if schedule is None else schedule
    student = _ShapeCheckedStudent(student)
    # The grid stays on the host: the sampler and the guide read it as floats once per run, and
    # reading back a device copy would synchronise with the GPU (models get each step's sigma as a
    # device tensor filled from a float). The guide is told the sample's device, so that a guide that
    # draws teacher timesteps (renoise="random") copies its timestep table there before the loop.
    grid = sigmas.cpu()
    guide = None
    if teacher is not None and guidance is not None:
        schedule_t = _declared_schedule(teacher) if teacher_schedule is None else teacher_schedule
        guide = guidance.bind(teacher, grid, generator, extra_args if teacher_args is None else teacher_args,
                              schedule_t, device=x.device)
    out = SAMPLERS[sampler](
        student, x, grid, extra_args=extra_args, callback=callback, disable=disable,
        generator=generator, guide=guide, **sampler_kwargs,
    )
    if guide is not None:
        guide.raise_if_non_finite()  # one host read per run, after the loop
    student.raise_if_non_finite(grid)
    return out


def _declared_schedule(denoiser: Any) -> Any:
    """The discrete schedule a denoiser declares (``DiscreteVPDenoiser``/``CFGDenoiser.schedule``), or None."""
    return getattr(denoiser, "schedule", None)


def _check_generator(generator: Any, x: torch.Tensor) -> None:
    """``None``, a ``torch.Generator``, or a list/tuple of them with one per image of ``x``."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"generator must be a torch.Generator, a list of them (one per image) or None, "
                         f"got {type(generator).__name__}")
    if len(generator) != x.shape[0]:
        raise ValueError(f"generator is a list of {len(generator)} generators but x has a batch of {x.shape[0]}; "
                         "give one per image")
