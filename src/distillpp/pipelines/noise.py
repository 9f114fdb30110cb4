"""Noise families: how a model family's noise process becomes sigmas, a sampler and denoisers.

A model family (SD, SDXL, PixArt, FLUX, SD3, the zoo) says *what* network it runs and how it is
conditioned; its noise family says how that network's output and inputs relate to the one denoiser
contract ``D(x, sigma, **cond) -> x0``:

- :class:`VPNoise`: discrete variance-preserving models sampled by a diffusers scheduler. The
  scheduler is read once through :mod:`distillpp.diffusers_schedulers` into explicit sigmas, the
  sampler that reproduces its step, the initial-sample rule and the denoiser (LCM's boundary
  condition, fractional timesteps for off-grid sigmas).
- :class:`FlowNoise`: rectified-flow models (velocity ``eps - x0``) over a flow-time grid.

The two are independent of the model family: PixArt is a transformer with VP noise, the zoo has
both kinds, FLUX and SD3 are transformers with flow noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..denoisers import DiscreteVPDenoiser, FlowDenoiser, LCMDenoiser
from ..diffusers_schedulers import SchedulerRule, scheduler_config, scheduler_rule
from ..schedules import DiscreteVPSchedule, initial_sample, timestep_sigmas

__all__ = ["VPNoise", "FlowNoise", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction(prediction: str, who: str) -> str:
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{who} prediction_type {prediction!r} is not supported; supported: "
                         f"{', '.join(PREDICTION_TYPES)}")
    return prediction


@dataclass
class VPNoise:
    """A discrete VP model's noise process, as one diffusers scheduler samples it.

    Args:
        rule: the scheduler's registry entry (:func:`~distillpp.diffusers_schedulers.scheduler_rule`).
        config: the scheduler config (``beta_*``, spacing, ``prediction_type``...).
    """

    rule: SchedulerRule
    config: dict[str, Any]
    schedule: DiscreteVPSchedule = field(init=False)
    prediction: str = field(init=False)

    def __post_init__(self) -> None:
        if self.rule.noise != "vp":
            raise ValueError(f"{self.rule.name} is a {self.rule.noise} scheduler, not a discrete VP one")
        self.rule.check(self.config)
        self.schedule = DiscreteVPSchedule.from_config(self.config)
        self.prediction = _check_prediction(self.config.get("prediction_type", "epsilon"), "scheduler")

    @classmethod
    def from_scheduler(cls, scheduler: Any, class_name: str | None = None) -> "VPNoise":
        """From a diffusers scheduler object (or a config with ``class_name``)."""
        rule = scheduler_rule(class_name if class_name is not None else scheduler)
        return cls(rule, scheduler_config(scheduler))

    @property
    def sampler(self) -> str:
        return self.rule.sampler

    @property
    def sampler_kwargs(self) -> dict[str, Any]:
        return self.rule.sampler_kwargs(self.config)

    def sigmas(self, num_inference_steps: int, timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """The scheduler's grid; explicit ``timesteps`` (DMD2's ``[999, 749, 499, 249]``) where given."""
        if timesteps is not None:
            return timestep_sigmas(self.schedule, timesteps)
        return self.rule.sigmas(self.config, num_inference_steps)

    def initial(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Unit noise -> the sample at ``sigmas[0]``, scaled as the diffusers scheduler starts."""
        return initial_sample(noise.float(), sigmas, self.rule.initial(self.config))

    def denoiser(self, net: Callable[..., torch.Tensor], dtype: torch.dtype | None = None,
                 **hooks: Any) -> DiscreteVPDenoiser:
        """``net`` as the student denoiser this scheduler implies (LCM's boundary condition for LCM).

        Args:
            net: ``net(model_input, timestep, **cond)``.
            dtype: the network's dtype (inputs are cast to it).
            **hooks: passed to the denoiser (e.g. a learned-sigma output hook).
        """
        quantize = self.rule.quantize(self.config)
        if self.rule.denoiser == "lcm":
            return LCMDenoiser(net, self.schedule, self.prediction, quantize=quantize, dtype=dtype,
                               timestep_scaling=self.config.get("timestep_scaling", 10.0), **hooks)
        return DiscreteVPDenoiser(net, self.schedule, self.prediction, quantize=quantize, dtype=dtype, **hooks)

    def teacher_denoiser(self, net: Callable[..., torch.Tensor], dtype: torch.dtype | None = None,
                         **hooks: Any) -> DiscreteVPDenoiser:
        """``net`` as a many-step teacher on this noise table: no boundary condition, nearest timestep."""
        return DiscreteVPDenoiser(net, self.schedule, self.prediction, dtype=dtype, **hooks)

    @classmethod
    def teacher_table(cls, config: Mapping[str, Any]) -> "VPNoise":
        """A teacher's noise table from its scheduler config, whatever scheduler class wrote it."""
        return cls(scheduler_rule("DDIMScheduler"), {**dict(config), "clip_sample": False})


@dataclass
class FlowNoise:
    """A rectified-flow model's noise process over an explicit flow-time grid.

    Args:
        grid: ``grid(num_inference_steps) -> sigmas`` (VE sigmas; flow time 1 is
            :data:`~distillpp.schedules.FLOW_SIGMA_MAX`), or ``None`` for families whose grid depends on
            more than the step count (FLUX and SD3 shift it by the image size) and who build it themselves.
        timestep_scale: the network's time input is ``s * timestep_scale`` (1000 for SD3 and the zoo,
            1 for FLUX, whose transformer scales internally).
    """

    grid: Callable[[int], torch.Tensor] | None = None
    timestep_scale: float = 1000.0
    sampler: str = "euler"
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)

    def sigmas(self, num_inference_steps: int, timesteps: Sequence[int] | None = None) -> torch.Tensor:
        if timesteps is not None:
            raise ValueError("timesteps apply to discrete VP students only; flow students take num_inference_steps")
        if self.grid is None:
            raise ValueError("this flow family builds its grid from the call (image size); ask the family")
        return self.grid(num_inference_steps)

    def initial(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return initial_sample(noise, sigmas, "flow")

    def denoiser(self, net: Callable[..., torch.Tensor], dtype: torch.dtype | None = None) -> FlowDenoiser:
        return FlowDenoiser(net, timestep_scale=self.timestep_scale, dtype=dtype)

    teacher_denoiser = denoiser
