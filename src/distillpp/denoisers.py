"""Model families as one contract: ``D(x, sigma, **cond) -> x0_hat``.

``x`` is in VE coordinates (``x = x0 + sigma * eps``), ``sigma`` a ``[batch]`` tensor.
Each wrapper takes a plain callable network ``net(model_input, timestep, **cond)``
returning a tensor, so diffusers models (through :func:`unet_fn`) and test
functions plug in alike. The samplers never know what is underneath.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from .schedules import DiscreteVPSchedule, sigma_to_flow_time

__all__ = [
    "Denoiser",
    "DiscreteVPDenoiser",
    "LCMDenoiser",
    "FlowDenoiser",
    "CFGDenoiser",
    "unet_fn",
    "transformer_fn",
    "lcm_guidance_embedding",
    "batch_cond",
    "repeat_cond",
    "append_dims",
]

Net = Callable[..., torch.Tensor]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Right-pad ``v`` with singleton dims to ``ndim`` (k-diffusion ``append_dims``)."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def unet_fn(model: Any) -> Net:
    """Adapt a diffusers model (``UNet2DConditionModel``, ``UNet2DModel``, transformers) to ``net(z, t, **cond)``."""

    def net(sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        return model(sample, timestep, **cond, return_dict=False)[0]

    net.model = model  # type: ignore[attr-defined]
    return net


def transformer_fn(model: Any) -> Net:
    """Adapt a diffusers transformer (FLUX, SD3, PixArt, DiT) to ``net(hidden_states, timestep, **cond)``.

    These models take the timestep by keyword (third or fourth positionally, unlike UNets, see
    :func:`unet_fn`), so it is passed as ``model(hidden_states=..., timestep=..., **cond)``. Floating
    inputs are cast to the model's dtype except ``guidance`` (FLUX's distilled guidance, float32 as
    diffusers passes it); the timestep goes in float32 and the output comes back on the input's device.
    """

    def net(hidden_states: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        dtype = model.dtype
        cond = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "guidance" else v
                for k, v in cond.items()}
        out = model(hidden_states=hidden_states.to(dtype), timestep=timestep.float(), **cond, return_dict=False)[0]
        return out.to(hidden_states.device)

    net.model = model  # type: ignore[attr-defined]
    return net


def lcm_guidance_embedding(w: torch.Tensor | float, embedding_dim: int = 256, batch: int | None = None) -> torch.Tensor:
    """LCM's guidance-scale embedding of ``w`` (the ``timestep_cond`` input), as in the LCM paper's code.

    Args:
        w: guidance scale(s); diffusers' LCM pipelines pass ``guidance_scale - 1``.
        embedding_dim: the UNet's ``time_cond_proj_dim``.
        batch: repeat a scalar ``w`` to this batch size.
    """
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    if batch is not None and w.numel() == 1:
        w = w.expand(batch)
    w = w * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def _map_cond(cond: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(cond, torch.Tensor):
        return fn(cond) if cond.ndim > 0 else cond
    if isinstance(cond, dict):
        return {k: _map_cond(v, fn) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_map_cond(v, fn) for v in cond)
    return cond


def repeat_cond(cond: Any, k: int) -> Any:
    """Repeat every batched tensor in a (nested) conditioning ``k`` times along the batch."""
    if k == 1:
        return cond
    return _map_cond(cond, lambda t: t.repeat(k, *([1] * (t.ndim - 1))))


def batch_cond(first: Any, second: Any) -> Any:
    """Concatenate two conditionings of the same structure along the batch (``[uncond, cond]``)."""
    if isinstance(first, torch.Tensor):
        if not isinstance(second, torch.Tensor):
            raise ValueError("cond and uncond must have the same structure")
        if first.ndim == 0:
            return first
        return torch.cat([first, second])
    if isinstance(first, dict):
        if not isinstance(second, dict) or first.keys() != second.keys():
            raise ValueError("cond and uncond must have the same keys")
        return {k: batch_cond(first[k], second[k]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(batch_cond(a, b) for a, b in zip(first, second))
    return first


class DiscreteVPDenoiser:
    """A discrete-time DDPM model (SD1.5, SDXL, LCM, DMD2, Lightning, Turbo, our zoo) as a denoiser.

    Args:
        net: ``net(z, t, **cond)`` with ``z = x / sqrt(1 + sigma^2)`` the VP sample and ``t`` a
            ``[batch]`` float timestep.
        schedule: the model's training noise table.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        quantize: map sigma to the nearest timestep in log-sigma (default); ``False`` interpolates a
            fractional timestep, as diffusers does for Karras grids.
        dtype: dtype of the network input (sigma arithmetic stays in the sample's dtype).
        learned_sigma: the network returns ``2C`` channels for a ``C``-channel sample, the prediction
            followed by a learned variance (PixArt, DiT, DeepFloyd IF); the variance is dropped, as
            diffusers' pipelines do.
    """

    def __init__(
        self,
        net: Net,
        schedule: DiscreteVPSchedule,
        prediction_type: str = "epsilon",
        quantize: bool = True,
        dtype: torch.dtype | None = None,
        learned_sigma: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
            )
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.quantize = quantize
        self.dtype = dtype
        self.learned_sigma = learned_sigma

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def raw_x0(self, out: torch.Tensor, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = append_dims(sigma, x.ndim)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            c = 1 / (1 + s**2)
            return c.sqrt() * z - (s * c.sqrt()) * out
        return out

    def boundary_condition(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Map the raw x0 prediction to the denoiser's output (identity; LCM overrides it)."""
        return x0

    def prediction(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The network output's prediction channels: all of them, or the first ``C`` of ``2C`` (``learned_sigma``)."""
        if not self.learned_sigma:
            return out
        c = z.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"learned_sigma=True expects the network to return {2 * c} channels for a {c}-channel "
                             f"sample (prediction + variance), got {out.shape[1]}")
        return out[:, :c]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        t = self.timestep(sigma)  # before any rounding to x's dtype: bf16 sigmas hit the wrong t
        sigma = sigma.to(x.dtype)
        z = x / append_dims((1 + sigma**2).sqrt(), x.ndim)
        out = self.prediction(self.net(z.to(self.dtype or x.dtype), t, **cond), z).to(x.dtype)
        return self.boundary_condition(self.raw_x0(out, x, z, sigma), z, t)


class LCMDenoiser(DiscreteVPDenoiser):
    """A latent consistency model: the VP prediction followed by LCM's boundary condition.

    ``x0 = c_skip(t) * z + c_out(t) * x0_raw`` with ``c_skip = sd^2 / ((10 t)^2 + sd^2)``,
    ``c_out = 10 t / sqrt((10 t)^2 + sd^2)``, ``sd = 0.5`` (diffusers ``LCMScheduler``).
    Pass LCM's guidance embedding as ``timestep_cond=`` in the conditioning.
    """

    def __init__(self, *args: Any, timestep_scaling: float = 10.0, sigma_data: float = 0.5, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data

    def boundary_condition(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Scalings in float32 (10 t reaches 9990; bf16 would round t itself).
        st = append_dims(t.float() * self.timestep_scaling, x0.ndim)
        sd2 = self.sigma_data**2
        c_skip = (sd2 / (st**2 + sd2)).to(x0.dtype)
        c_out = (st / (st**2 + sd2).sqrt()).to(x0.dtype)
        return c_out * x0 + c_skip * z


class FlowDenoiser:
    """A rectified-flow velocity model (FLUX, SD3) as a denoiser.

    ``x_fm = x / (1 + sigma)``, flow time ``s = sigma / (1 + sigma)``, ``v_hat ~ eps - x0``,
    ``x0 = x_fm - s * v_hat``.

    Args:
        net: ``net(x_fm, timestep, **cond)`` with ``timestep = s * timestep_scale``.
        timestep_scale: 1000 for SD3 transformers; 1 for FLUX (its pipeline passes ``t / 1000``).
        dtype: dtype of the network input.
    """

    def __init__(self, net: Net, timestep_scale: float = 1000.0, dtype: torch.dtype | None = None):
        self.net = net
        self.timestep_scale = timestep_scale
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = sigma.to(torch.float32)
        xf = x.float()
        x_fm = xf / append_dims(1 + sigma, x.ndim)
        s = sigma_to_flow_time(sigma)
        v = self.net(x_fm.to(self.dtype or x.dtype), s * self.timestep_scale, **cond).float()
        return (x_fm - append_dims(s, x.ndim) * v).to(x.dtype)


class CFGDenoiser:
    """Classifier-free guidance as a denoiser combinator: ``D_u + w * (D_c - D_u)``.

    Both branches run as one batched forward over ``[uncond, cond]``. Call it with the
    conditioning split in two: ``D(x, sigma, cond={...}, uncond={...}, cfg_scale=w)``; the dicts
    are passed to the inner denoiser as keyword arguments. With ``w == 1`` or no ``uncond`` only
    the conditional branch runs.

    ``return_uncond=True`` returns ``(x0_cfg, x0_uncond)``, what a CFG++ sampler (``cfgpp=True``) steps
    with. Where CFG is off (``w == 1`` or no ``uncond``) the unconditional estimate is the conditional
    one, so CFG++ at scale 1 is the plain sampler (CFG++'s own lambda = 1 would still run the
    unconditional branch; scale 1 here means "no CFG", as everywhere else in this class).

    ``clip`` clamps the combined estimate (and the unconditional one) to ``[-clip, clip]``: diffusers'
    ``clip_sample`` for pixel-space models, whose data lie in ``[-1, 1]``. The clamp comes after the CFG
    combination, as in diffusers, where CFG mixes noise predictions and the scheduler then clips the
    resulting x0 (the two mixes are the same linear map).

    Args:
        inner: the denoiser to guide.
        scale: default guidance scale ``w`` (overridden per call by ``cfg_scale=``).
        clip: clamp x0 estimates to ``[-clip, clip]`` (``None``: no clamp).
    """

    def __init__(self, inner: Denoiser, scale: float = 1.0, clip: float | None = None):
        if clip is not None and not (float(clip) > 0):
            raise ValueError(f"clip must be a positive number or None, got {clip!r}")
        self.inner = inner
        self.scale = scale
        self.clip = None if clip is None else float(clip)

    @property
    def schedule(self) -> Any:
        return getattr(self.inner, "schedule", None)

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        cfg_scale: float | None = None,
        return_uncond: bool = False,
        **shared: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        w = self.scale if cfg_scale is None else cfg_scale
        cond = cond or {}
        if uncond is None or w == 1.0:
            x0 = self._clip(self.inner(x, sigma, **cond, **shared))
            return (x0, x0) if return_uncond else x0
        both = batch_cond(uncond, cond)
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **shared)
        x0_u, x0_c = out.chunk(2)
        x0 = self._clip(x0_u + w * (x0_c - x0_u))
        return (x0, self._clip(x0_u)) if return_uncond else x0

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)
