"""What distillpp knows about each diffusers scheduler, in one registry.

A diffusers scheduler is a stateful object; distillpp reads it once, by class name and config, into
the pieces of a pure sampling run:

- ``grid``: the explicit sigmas its ``set_timesteps`` would use (:mod:`distillpp.schedules`);
- ``sampler``: the :data:`distillpp.SAMPLERS` key that reproduces its ``step``;
- ``initial``: how the first sample is scaled from unit noise (:func:`distillpp.schedules.initial_sample`
  family: ``"vp"``, ``"ve"`` or ``"flow"``);
- ``denoiser``: how a network's output becomes x0 (``"vp"``, ``"lcm"`` with LCM's boundary condition,
  ``"flow"``) and whether off-grid sigmas need fractional timesteps (``quantize``);
- ``refused``: config options that change the grid in ways the constructors do not follow, with the
  value that is supported. Refusing beats a silently different grid.

Every other module asks this registry (:func:`scheduler_rule`) instead of comparing class names.
Adding a scheduler is one :func:`register_scheduler` call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import schedules

__all__ = ["SchedulerRule", "SCHEDULERS", "register_scheduler", "scheduler_rule", "scheduler_config"]


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """The config of a scheduler object (or a config mapping itself) as a plain dict."""
    cfg = getattr(scheduler, "config", scheduler)
    return dict(cfg) if cfg is not None else {}


@dataclass(frozen=True)
class SchedulerRule:
    """How one diffusers scheduler class becomes explicit sigmas, a sampler and a denoiser.

    Attributes:
        name: the diffusers class name.
        noise: ``"vp"`` (discrete DDPM-style models) or ``"flow"`` (rectified flow).
        sampler: the distillpp sampler reproducing the scheduler's step.
        grid: ``grid(config, num_inference_steps, **kwargs) -> sigmas`` (kwargs: ``timesteps``, ``mu``).
        initial: ``initial(config) -> "vp" | "ve" | "flow"``: the initial-sample rule.
        denoiser: ``"vp"``, ``"lcm"`` or ``"flow"``.
        quantize: ``quantize(config) -> bool``: whether the denoiser rounds sigma to an integer timestep
            (off-grid grids such as Karras or linspace spacing need fractional timesteps).
        sampler_kwargs: ``sampler_kwargs(config) -> dict`` of solver knobs (``eta``, ``gamma``...).
        refused: ``(option, supported value)`` pairs; any other value raises.
        warn_ignored: options that are accepted but ignored (with a warning) when true.
        eta: the sampler keyword that diffusers' ``eta`` call argument sets (DDIM's ``eta``, TCD's
            ``gamma``), or ``None`` where the step has no such knob (Euler, LCM).
        eta_default: the value diffusers' pipelines pass when the user gives none.
    """

    name: str
    noise: str
    sampler: str
    grid: Callable[..., torch.Tensor]
    initial: Callable[[Mapping[str, Any]], str]
    denoiser: str = "vp"
    quantize: Callable[[Mapping[str, Any]], bool] = lambda cfg: True
    sampler_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda cfg: {}
    refused: tuple[tuple[str, Any], ...] = ()
    warn_ignored: tuple[str, ...] = field(default=())
    eta: str | None = None
    eta_default: float | None = None

    def eta_kwargs(self, eta: float | None) -> dict[str, Any]:
        """The sampler keyword for diffusers' ``eta`` (``{}`` where the sampler has none)."""
        if self.eta is None:
            return {}
        value = self.eta_default if eta is None else eta
        return {} if value is None else {self.eta: value}

    def check(self, config: Mapping[str, Any]) -> None:
        """Raise a ValueError naming the first refused option the config sets."""
        for option, supported in self.refused:
            value = config.get(option, supported)
            if value != supported and not (supported is False and value is None):
                raise ValueError(
                    f"{self.name} config {option}={value!r} is not supported (only {supported!r}); "
                    "pass explicit sigmas instead"
                )

    def warn_ignored_options(self, config: Mapping[str, Any]) -> None:
        """Warn once per call about options a sampling run ignores (e.g. DDIM's ``clip_sample``)."""
        ignored = [o for o in self.warn_ignored if config.get(o)]
        if ignored:
            warnings.warn(f"{self.name}: {' and '.join(ignored)} ignored (not reproduced); outputs differ from "
                          "diffusers'", stacklevel=3)

    def sigmas(self, config: Mapping[str, Any], num_inference_steps: int, **kwargs: Any) -> torch.Tensor:
        """The scheduler's grid for ``num_inference_steps`` (config checked first)."""
        self.check(config)
        return self.grid(config, num_inference_steps, **kwargs)


SCHEDULERS: dict[str, SchedulerRule] = {}


def register_scheduler(rule: SchedulerRule) -> SchedulerRule:
    """Add (or replace) the rule of one diffusers scheduler class."""
    SCHEDULERS[rule.name] = rule
    return rule


def scheduler_rule(scheduler: Any) -> SchedulerRule:
    """The rule for a scheduler object, class or class name.

    Raises:
        ValueError: the scheduler is not supported (the message lists those that are).
    """
    if isinstance(scheduler, str):
        name = scheduler
    else:
        name = scheduler.__name__ if isinstance(scheduler, type) else type(scheduler).__name__
    if name not in SCHEDULERS:
        raise ValueError(
            f"scheduler {name} is not supported; use one of {', '.join(sorted(SCHEDULERS))} "
            "(e.g. pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
            "timestep_spacing='trailing')), or pass explicit sigmas"
        )
    return SCHEDULERS[name]


# ------------------------------------------------------------------------------------------------
# The rules.

_VP_REFUSED = (("rescale_betas_zero_snr", False), ("timestep_type", "discrete"))


def _vp(cfg: Mapping[str, Any]) -> schedules.DiscreteVPSchedule:
    return schedules.DiscreteVPSchedule.from_config(cfg)


def _euler_grid(cfg: Mapping[str, Any], n: int, **_: Any) -> torch.Tensor:
    if cfg.get("use_karras_sigmas"):
        for option in ("sigma_min", "sigma_max"):
            if cfg.get(option) is not None:
                raise ValueError(
                    f"scheduler config {option}={cfg[option]!r} is not supported with use_karras_sigmas "
                    "(only None); pass karras_sigmas(sigma_min, sigma_max, n) explicitly"
                )
    return schedules.euler_sigmas(_vp(cfg), n, timestep_spacing=cfg.get("timestep_spacing", "linspace"),
                                  steps_offset=cfg.get("steps_offset", 0),
                                  use_karras_sigmas=cfg.get("use_karras_sigmas", False))


def _euler_initial(cfg: Mapping[str, Any]) -> str:
    # Euler schedulers start at noise * init_noise_sigma: sigma_max for linspace/trailing spacing,
    # sqrt(1 + sigma_max^2) (pure VP noise) otherwise.
    return "ve" if cfg.get("timestep_spacing", "linspace") in ("linspace", "trailing") else "vp"


def _euler_quantize(cfg: Mapping[str, Any]) -> bool:
    # Karras grids and linspace's fractional timesteps fall between training timesteps.
    return not (cfg.get("use_karras_sigmas") or cfg.get("timestep_spacing", "linspace") == "linspace")


_EULER_REFUSED = _VP_REFUSED + (
    ("interpolation_type", "linear"), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
)

for _name, _sampler in (("EulerDiscreteScheduler", "euler"), ("EulerAncestralDiscreteScheduler", "euler_ancestral")):
    register_scheduler(SchedulerRule(
        name=_name, noise="vp", sampler=_sampler, grid=_euler_grid, initial=_euler_initial,
        quantize=_euler_quantize, refused=_EULER_REFUSED, warn_ignored=("thresholding",),
        eta="eta" if _sampler == "euler_ancestral" else None,
    ))
del _name, _sampler

register_scheduler(SchedulerRule(
    name="DDIMScheduler", noise="vp", sampler="ddim",
    grid=lambda cfg, n, **_: schedules.ddim_sigmas(_vp(cfg), n, timestep_spacing=cfg.get("timestep_spacing", "leading"),
                                                   steps_offset=cfg.get("steps_offset", 0)),
    initial=lambda cfg: "vp", refused=_VP_REFUSED, warn_ignored=("clip_sample", "thresholding"), eta="eta",
))


def _lcm_grid(cfg: Mapping[str, Any], n: int, timesteps: Any = None, **_: Any) -> torch.Tensor:
    if timesteps is not None:
        return schedules.timestep_sigmas(_vp(cfg), timesteps)
    return schedules.lcm_sigmas(_vp(cfg), n, cfg.get("original_inference_steps", 50))


register_scheduler(SchedulerRule(
    name="LCMScheduler", noise="vp", sampler="consistency", grid=_lcm_grid, initial=lambda cfg: "vp",
    denoiser="lcm", refused=_VP_REFUSED, warn_ignored=("clip_sample", "thresholding"),
))


register_scheduler(SchedulerRule(
    name="TCDScheduler", noise="vp", sampler="tcd",
    grid=lambda cfg, n, timesteps=None, **_: (
        schedules.timestep_sigmas(_vp(cfg), timesteps) if timesteps is not None
        else schedules.tcd_sigmas(_vp(cfg), n, cfg.get("original_inference_steps", 50))),
    initial=lambda cfg: "vp", refused=_VP_REFUSED, warn_ignored=("clip_sample", "thresholding"),
    eta="gamma", eta_default=0.0,  # diffusers' pipelines pass eta=0.0 unless told otherwise
))


def _flow_grid(cfg: Mapping[str, Any], n: int, mu: float | None = None, **_: Any) -> torch.Tensor:
    return schedules.flow_sigmas(
        n, num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=cfg.get("shift", 1.0),
        use_dynamic_shifting=cfg.get("use_dynamic_shifting", False), mu=mu,
        time_shift_type=cfg.get("time_shift_type", "exponential"), shift_terminal=cfg.get("shift_terminal"),
    )


register_scheduler(SchedulerRule(
    name="FlowMatchEulerDiscreteScheduler", noise="flow", sampler="euler", grid=_flow_grid,
    initial=lambda cfg: "flow", denoiser="flow",
    refused=(("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
             ("invert_sigmas", False), ("stochastic_sampling", False), ("use_flow_sigmas", False)),
))
