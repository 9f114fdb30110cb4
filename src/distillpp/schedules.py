"""Sigma grids that equal what diffusers' schedulers use, as explicit tensors.

Every grid is a descending float32 tensor of VE noise levels ending in 0
(k-diffusion convention). Discrete variance-preserving (VP) models are described
by a :class:`DiscreteVPSchedule` (their ``alphas_cumprod`` table); its sigmas are
``sqrt((1 - abar_t) / abar_t)``. Rectified-flow times ``s`` map to
``sigma = s / (1 - s)``; flow time 1 (pure noise) is represented by
:data:`FLOW_SIGMA_MAX`.

Sigma arithmetic happens in float64 (EDM habit); the returned grids are float32
like diffusers'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "DiscreteVPSchedule",
    "FLOW_SIGMA_MAX",
    "euler_sigmas",
    "ddim_sigmas",
    "lcm_sigmas",
    "tcd_sigmas",
    "timestep_sigmas",
    "karras_sigmas",
    "flow_sigmas",
    "shift_flow_times",
    "flow_time_shift_mu",
    "sigmas_from_scheduler",
    "initial_sample",
    "sigma_to_flow_time",
    "flow_time_to_sigma",
]

# Flow time s = 1 is sigma = inf in VE coordinates. 1e8 is large enough that
# sigma / (1 + sigma) rounds to exactly 1.0 in float32 and x / (1 + sigma)
# recovers the noise to float32 precision (keep x in float32: it overflows fp16).
FLOW_SIGMA_MAX = 1e8


@dataclass(frozen=True)
class DiscreteVPSchedule:
    """The ``alphas_cumprod`` table of a discrete DDPM-style model.

    Args:
        alphas_cumprod: 1-D tensor ``abar_t`` for ``t = 0 .. T-1``.
    """

    alphas_cumprod: torch.Tensor
    # log-sigma table per device: sigma_to_t runs on every model call, and rebuilding the table and
    # copying it to an accelerator each time puts a host-to-device copy in the sampling loop.
    _log_sigmas: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_betas(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | None = None,
    ) -> "DiscreteVPSchedule":
        """Build the table the way diffusers' schedulers do (betas in float32).

        Args:
            num_train_timesteps: length of the table, an integer >= 1.
            beta_start, beta_end: first and last beta, ``0 < beta_start <= beta_end < 1``.
            beta_schedule: ``"linear"``, ``"scaled_linear"`` (SD) or ``"squaredcos_cap_v2"``.
            trained_betas: explicit betas in (0, 1), ending no lower than they start (overrides the rest).

        Raises:
            ValueError: naming the argument, for values that would give infinite or NaN sigmas
                (betas outside (0, 1), an empty table) or a reversed schedule.
        """
        from .guidance import as_count, as_number  # guidance imports this module

        if trained_betas is not None:
            try:
                betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
            except (TypeError, ValueError):
                raise ValueError(f"trained_betas must be a sequence of numbers, got {trained_betas!r}") from None
            if betas.ndim != 1 or betas.numel() < 1 or not ((betas > 0) & (betas < 1)).all():
                raise ValueError("trained_betas must be a non-empty 1-D sequence of betas in (0, 1)")
            if betas[0] > betas[-1]:
                raise ValueError("trained_betas must not decrease from first to last (reversed schedule?)")
            return cls._from_beta_tensor(betas, "trained_betas")
        num_train_timesteps = as_count(num_train_timesteps, "num_train_timesteps", 1)
        beta_start, beta_end = as_number(beta_start, "beta_start"), as_number(beta_end, "beta_end")
        if not 0 < beta_start <= beta_end < 1:  # also refuses NaN
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
            )
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            def abar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor(
                [min(1 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), 0.999)
                 for i in range(num_train_timesteps)],
                dtype=torch.float32,
            )
        else:
            raise ValueError(
                f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {beta_schedule!r}"
            )
        return cls._from_beta_tensor(betas, "beta_end")

    @classmethod
    def _from_beta_tensor(cls, betas: torch.Tensor, name: str) -> "DiscreteVPSchedule":
        abar = torch.cumprod(1.0 - betas, dim=0)
        if not (abar > 0).all():  # float32 underflow: sigma = sqrt((1 - abar) / abar) is infinite from there on
            t = int((abar <= 0).nonzero()[0])
            raise ValueError(f"{name}: these betas drive alphas_cumprod to 0 in float32 at t={t} (an infinite "
                             "sigma); use smaller betas or fewer num_train_timesteps")
        return cls(abar)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiscreteVPSchedule":
        """Build from a diffusers scheduler config (dict or ``FrozenDict``).

        Args:
            config: the scheduler's config. ``rescale_betas_zero_snr=True`` is refused: its last
                ``abar`` is 0 (sigma infinite), which no finite grid or timestep lookup reproduces.
        """
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError(
                "rescale_betas_zero_snr must be False: zero-terminal-SNR schedules (infinite sigma_max) "
                "are not supported"
            )
        return cls.from_betas(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.00085),
            beta_end=config.get("beta_end", 0.012),
            beta_schedule=config.get("beta_schedule", "scaled_linear"),
            trained_betas=config.get("trained_betas"),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """float64 sigma of every training timestep, ascending in t."""
        a = self.alphas_cumprod.double()
        return ((1 - a) / a).sqrt()

    def sigma_at(self, timesteps: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, linear in t as diffusers' Euler does."""
        t = np.asarray(timesteps, dtype=np.float64)
        table = self.sigmas.numpy()
        return torch.from_numpy(np.interp(t, np.arange(len(table)), table))

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Timestep of each sigma: nearest in log-sigma, or interpolated (k-diffusion ``DiscreteSchedule``)."""
        key = str(sigma.device)
        if key not in self._log_sigmas:
            self._log_sigmas[key] = self.sigmas.log().to(sigma.device)
        log_sigmas = self._log_sigmas[key]
        log_sigma = sigma.double().clamp(min=1e-10).log()
        dists = log_sigma.reshape(-1, 1) - log_sigmas.reshape(1, -1)
        if quantize:
            return dists.abs().argmin(dim=1).reshape(sigma.shape).to(torch.float32)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * high
        return t.reshape(sigma.shape).to(torch.float32)


def _append_zero(sigmas: torch.Tensor | np.ndarray) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    return torch.cat([s, s.new_zeros(1)]).to(torch.float32)


def _spaced_timesteps(n: int, T: int, spacing: str, steps_offset: int, rounded: bool) -> np.ndarray:
    from .guidance import as_count  # guidance imports this module

    n = as_count(n, "num_inference_steps", 1)
    steps_offset = as_count(steps_offset, "steps_offset", 0)
    if n > T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n, dtype=np.float64)[::-1]
        return t.round() if rounded else t.astype(np.float32).astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round().astype(np.float64) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def euler_sigmas(
    schedule: DiscreteVPSchedule,
    num_inference_steps: int,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
) -> torch.Tensor:
    """Sigmas of ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler``.

    Args:
        schedule: the model's training noise table.
        num_inference_steps: number of sampling steps.
        timestep_spacing: ``"linspace"``, ``"leading"`` or ``"trailing"`` (Lightning/Turbo use trailing).
        steps_offset: added to ``leading`` timesteps (SD configs use 1).
        use_karras_sigmas: replace the grid by Karras et al.'s rho=7 grid over the same range.
    """
    T = schedule.num_train_timesteps
    t = _spaced_timesteps(num_inference_steps, T, timestep_spacing, steps_offset, rounded=False)
    sigmas = schedule.sigma_at(t).numpy()
    if use_karras_sigmas:
        return karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
    return _append_zero(sigmas)


def ddim_sigmas(
    schedule: DiscreteVPSchedule,
    num_inference_steps: int,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """Sigmas of ``DDIMScheduler`` with ``set_alpha_to_one=True`` (the last step lands on sigma 0).

    With ``set_alpha_to_one=False`` diffusers' last DDIM step stops at ``sigma(t=0)`` (about 0.03 for
    SD) and leaves that much noise in the output; our grids always end at 0.

    diffusers' DDIM step targets ``t - T // num_inference_steps``, not the next timestep of its own
    grid. The two agree for ``leading`` spacing and for ``trailing`` when ``num_inference_steps``
    divides ``T``; otherwise (``linspace``, or e.g. 3 trailing steps) diffusers lands on one timestep
    and evaluates the model at the next one, which this self-consistent grid does not reproduce
    (a small difference for 3 trailing steps; a large one for ``linspace``).

    Args:
        schedule: the model's training noise table.
        num_inference_steps: number of sampling steps.
        timestep_spacing: ``"leading"`` (diffusers' DDIM default), ``"trailing"`` or ``"linspace"``.
        steps_offset: added to ``leading`` timesteps (SD configs use 1).
    """
    T = schedule.num_train_timesteps
    t = _spaced_timesteps(num_inference_steps, T, timestep_spacing, steps_offset, rounded=True)
    return timestep_sigmas(schedule, t.astype(np.int64).tolist())


def lcm_sigmas(
    schedule: DiscreteVPSchedule,
    num_inference_steps: int = 4,
    original_inference_steps: int = 50,
) -> torch.Tensor:
    """Sigmas of ``LCMScheduler``: ``num_inference_steps`` evenly indexed from the 50-step LCM grid."""
    from .guidance import as_count  # guidance imports this module

    T = schedule.num_train_timesteps
    original_inference_steps = as_count(original_inference_steps, "original_inference_steps", 1)
    num_inference_steps = as_count(num_inference_steps, "num_inference_steps", 1)
    if not 1 <= original_inference_steps <= T:
        raise ValueError(f"original_inference_steps must be in [1, {T}], got {original_inference_steps}")
    if not 1 <= num_inference_steps <= original_inference_steps:
        raise ValueError(
            f"num_inference_steps must be in [1, original_inference_steps={original_inference_steps}], "
            f"got {num_inference_steps}"
        )
    k = T // original_inference_steps
    origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return timestep_sigmas(schedule, origin[idx].tolist())


def tcd_sigmas(
    schedule: DiscreteVPSchedule,
    num_inference_steps: int = 4,
    original_inference_steps: int = 50,
    original_steps_passed: bool = False,
) -> torch.Tensor:
    """Sigmas of ``TCDScheduler.set_timesteps(num_inference_steps)`` (strength 1).

    With the config's ``original_inference_steps`` (how pipelines call it) the grid is LCM's:
    ``num_inference_steps`` evenly indexed from the ``original_inference_steps`` distillation timesteps.
    When ``original_inference_steps`` is passed to ``set_timesteps`` itself, diffusers indexes all
    training timesteps instead (the value then only bounds ``num_inference_steps``): set
    ``original_steps_passed=True`` for that grid. Sample it with the ``"tcd"`` sampler.

    Args:
        schedule: the model's training noise table.
        num_inference_steps: number of steps, at most ``original_inference_steps``.
        original_inference_steps: the scheduler config's value (50 for TCD and Hyper-SD).
        original_steps_passed: reproduce ``set_timesteps(n, original_inference_steps=...)``.
    """
    grid = lcm_sigmas(schedule, num_inference_steps, original_inference_steps)
    if not original_steps_passed:
        return grid
    T = schedule.num_train_timesteps
    idx = np.floor(np.linspace(0, T, num=num_inference_steps, endpoint=False)).astype(np.int64)
    return timestep_sigmas(schedule, np.arange(T)[::-1][idx].tolist())


def timestep_sigmas(schedule: DiscreteVPSchedule, timesteps: Sequence[int]) -> torch.Tensor:
    """Sigmas at explicit integer timesteps, e.g. DMD2's ``[999, 749, 499, 249]``."""
    from .guidance import as_count  # guidance imports this module

    T = schedule.num_train_timesteps
    try:
        ts = [as_count(t, "timesteps", 0) for t in timesteps]
    except (TypeError, ValueError):  # a float like 249.7 is refused, not truncated
        raise ValueError(
            f"timesteps must be a non-empty list of integers in [0, {T - 1}], got {timesteps!r}"
        ) from None
    if not ts or any(not 0 <= t < T for t in ts):
        raise ValueError(f"timesteps must be a non-empty list of integers in [0, {T - 1}], got {list(timesteps)}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}")
    return _append_zero(schedule.sigmas[ts].numpy())


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) grid: ``n`` sigmas from sigma_max to sigma_min, then 0.

    Args:
        sigma_min, sigma_max: the range, ``0 < sigma_min < sigma_max`` (finite).
        n: number of positive sigmas, an integer >= 1.
        rho: the ramp's exponent, finite and > 0 (7 in the paper).
    """
    from .guidance import as_count, as_number  # guidance imports this module

    n = as_count(n, "n", 1)
    sigma_min, sigma_max = as_number(sigma_min, "sigma_min"), as_number(sigma_max, "sigma_max")
    rho = as_number(rho, "rho")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not 0 < rho < math.inf:
        raise ValueError(f"rho must be a finite number > 0, got {rho}")
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sigma_to_flow_time(sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time ``s = sigma / (1 + sigma)``."""
    return sigma / (1 + sigma)


def flow_time_to_sigma(s: torch.Tensor | np.ndarray) -> torch.Tensor:
    """VE sigma of flow time ``s``; ``s = 1`` becomes :data:`FLOW_SIGMA_MAX`."""
    s = torch.as_tensor(np.asarray(s, dtype=np.float64))
    return torch.where(s >= 1, torch.full_like(s, FLOW_SIGMA_MAX), s / (1 - s).clamp(min=1e-300))


def flow_time_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent ``mu`` for dynamic shifting (linear in the token count)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_flow_times(
    s: np.ndarray,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
) -> np.ndarray:
    """``FlowMatchEulerDiscreteScheduler``'s shifting of flow times, in the dtype of ``s``.

    Dynamic when ``mu`` is given (``exp(mu) / (exp(mu) + 1/s - 1)``, or ``mu / (mu + 1/s - 1)`` for
    ``time_shift_type="linear"``), else static (``shift * s / (1 + (shift - 1) * s)``); then, with
    ``shift_terminal``, stretched so the last flow time equals it (needs at least 2 times: diffusers
    divides 0 by 0 for one step).
    """
    s = np.asarray(s)
    if mu is not None:
        if time_shift_type == "exponential":
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        elif time_shift_type == "linear":
            s = mu / (mu + (1 / s - 1) ** 1.0)
        else:
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
    else:
        s = shift * s / (1 + (shift - 1) * s)
    if shift_terminal:
        if len(s) < 2:
            raise ValueError("shift_terminal needs num_inference_steps >= 2 (one step has no terminal flow time "
                             "to stretch; diffusers returns NaN)")
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    return s


def flow_sigmas(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    return_flow_times: bool = False,
) -> torch.Tensor:
    """VE sigmas of ``FlowMatchEulerDiscreteScheduler`` for the same config.

    Args:
        num_inference_steps: number of steps.
        num_train_timesteps, shift, use_dynamic_shifting, time_shift_type, shift_terminal: as in the
            scheduler config (FLUX.1-schnell: shift 1, no dynamic shifting; FLUX.1-dev: dynamic).
        mu: required with dynamic shifting (see :func:`flow_time_shift_mu`).
        return_flow_times: return the flow times ``s`` (ending in 0) instead of VE sigmas.
    """
    from .guidance import as_count, as_number  # guidance imports this module

    num_inference_steps = as_count(num_inference_steps, "num_inference_steps", 1)
    num_train_timesteps = as_count(num_train_timesteps, "num_train_timesteps", 1)
    if not 0 < as_number(shift, "shift") < math.inf:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if mu is not None and not math.isfinite(as_number(mu, "mu")):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    if use_dynamic_shifting and mu is None:
        raise ValueError("mu must be given when use_dynamic_shifting=True (see flow_time_shift_mu)")
    T = num_train_timesteps

    def static_shift(s: np.ndarray) -> np.ndarray:
        return shift * s / (1 + (shift - 1) * s)

    # The scheduler's constructor shifts its training grid (unless shifting is dynamic) and takes
    # sigma_max / sigma_min from it; set_timesteps then shifts the inference grid again.
    train = np.linspace(1, T, T, dtype=np.float32)[::-1] / T
    if not use_dynamic_shifting:
        train = static_shift(train.astype(np.float32)).astype(np.float32)
    s_max, s_min = float(train[0]), float(train[-1])
    s = (np.linspace(s_max * T, s_min * T, num_inference_steps) / T).astype(np.float64)
    s = shift_flow_times(s, shift=shift, mu=mu if use_dynamic_shifting else None,
                         time_shift_type=time_shift_type, shift_terminal=shift_terminal)
    s = s.astype(np.float32).astype(np.float64)
    if return_flow_times:
        return _append_zero(s)
    return torch.cat([flow_time_to_sigma(s), torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def sigmas_from_scheduler(scheduler: Any, num_inference_steps: int, **kwargs: Any) -> torch.Tensor:
    """Explicit sigmas for a diffusers scheduler object, read from its class and config.

    The grid equals the scheduler's own ``set_timesteps(num_inference_steps)``; which schedulers and
    options are supported is recorded in :mod:`distillpp.diffusers_schedulers`. Pipelines may pass
    their own grid instead: ``FluxPipeline`` calls ``set_timesteps(sigmas=np.linspace(1, 1 / n, n), mu=mu)``,
    which these defaults do not reproduce.

    Args:
        scheduler: a diffusers scheduler object (only its class and config are read).
        num_inference_steps: number of sampling steps.
        **kwargs: ``timesteps`` (LCM: explicit DMD2-style grids) or ``mu`` (flow dynamic shifting).

    Raises:
        ValueError: for unsupported scheduler classes, and for config options that change the grid in
            ways not reproduced here (exponential/beta sigmas, log-linear interpolation, a custom Karras
            range, inverted flow sigmas, zero-terminal-SNR betas).
    """
    from .diffusers_schedulers import scheduler_config, scheduler_rule

    return scheduler_rule(scheduler).sigmas(scheduler_config(scheduler), num_inference_steps, **kwargs)


def initial_sample(noise: torch.Tensor, sigmas: torch.Tensor, family: str = "vp") -> torch.Tensor:
    """The starting sample at ``sigmas[0]`` for unit Gaussian ``noise`` (docs/method.md, section 3).

    ``vp``: pure noise in VP coordinates, ``noise * sqrt(1 + sigma^2)``; ``ve``: ``noise * sigma``;
    ``flow``: pure noise in flow coordinates, ``noise * (1 + sigma)``.
    """
    s0 = float(sigmas[0])
    if family == "vp":
        return noise * math.sqrt(1 + s0**2)
    if family == "ve":
        return noise * s0
    if family == "flow":
        return noise.float() * (1 + s0)
    raise ValueError(f"family must be 'vp', 've' or 'flow', got {family!r}")
