"""``distillpp.sample``: one entry point over every sampler, with or without a teacher."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .guidance import TeacherGuidance
from .samplers import SAMPLERS

__all__ = ["sample", "check_sigmas"]


def check_sigmas(sigmas: Any) -> torch.Tensor:
    """Validate a sigma grid: a 1-D tensor, strictly descending, positive, ending in exactly 0."""
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"sigmas must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
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


def sample(
    student: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    teacher: Callable[..., torch.Tensor] | None = None,
    guidance: TeacherGuidance | None = None,
    generator: torch.Generator | None = None,
    extra_args: dict[str, Any] | None = None,
    teacher_args: dict[str, Any] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = True,
    **sampler_kwargs: Any,
) -> torch.Tensor:
    """Sample with a (few-step) student denoiser, optionally guided by its teacher.

    Args:
        student: denoiser ``D(x, sigma, **extra_args) -> x0``.
        x: initial sample at ``sigmas[0]`` (see :func:`distillpp.schedules.initial_sample`).
        sigmas: descending noise levels ending in 0.
        sampler: ``"euler"``, ``"euler_ancestral"``, ``"consistency"``, ``"ddim"`` or ``"dpmpp_2s_ancestral"``.
        teacher: teacher denoiser; ``None`` samples with the student alone.
        guidance: :class:`TeacherGuidance` knobs; ``None`` samples with the student alone.
        generator: ``torch.Generator`` for every random draw (sampler noise and teacher re-noising).
        extra_args: conditioning for the student.
        teacher_args: conditioning for the teacher (defaults to ``extra_args``).
        callback: called every step with a dict (``x``, ``i``, ``sigma``, ``denoised``,
            ``student_denoised``, ``guidance``: a :class:`GuidanceInfo` on guided steps, else ``None``).
        disable: disable the progress bar (default ``True``; ``False`` shows it).
        **sampler_kwargs: solver knobs, e.g. ``eta`` for ``ddim``/ancestral samplers.

    Raises:
        ValueError: on invalid arguments, before any model call.
    """
    if sampler not in SAMPLERS:
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
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    sigmas = sigmas.to(x.device)
    guide = None
    if teacher is not None and guidance is not None:
        guide = guidance.bind(teacher, sigmas, generator, extra_args if teacher_args is None else teacher_args)
    return SAMPLERS[sampler](
        student, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
        generator=generator, guide=guide, **sampler_kwargs,
    )
