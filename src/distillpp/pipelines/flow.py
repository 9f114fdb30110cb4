"""Flow-matching students and teachers: FLUX.1 and Stable Diffusion 3.5 as denoisers.

Model adapters only: the method is :mod:`distillpp.guidance`, the sampler our ``euler``, and the
run itself :func:`~distillpp.pipelines.base.run_guided`.

- ``flux-schnell``: student FLUX.1-schnell (4 steps, static shift 1), teacher the FLUX.1-dev
  transformer with its distilled guidance embedding (``teacher_guidance=3.5``, given to the
  teacher only) and optional true CFG against a negative prompt (``teacher_cfg > 1``).
- ``sd35-large-turbo``: student SD3.5-Large-Turbo (4 steps, no CFG), teacher SD3.5-Large with
  ordinary CFG (``teacher_cfg=3.5``).

Student and teacher share the student pipeline's text encoders and VAE (both pairs were trained on
the same ones); only the teacher's transformer is loaded. Each transformer becomes one
:class:`~distillpp.FlowDenoiser` over VE sigmas: ``x_fm = x / (1 + sigma)``, flow time
``s = sigma / (1 + sigma)``, ``x0 = x_fm - s * v``. Flow time 1 (pure noise) is
:data:`~distillpp.schedules.FLOW_SIGMA_MAX` = 1e8, so samples stay float32 whatever the
transformers' dtype.

With ``strength=0`` a run reproduces the student's own diffusers pipeline (``FluxPipeline``,
``StableDiffusion3Pipeline``) to float32 rounding (about 1e-6): the same flow-time grid, the same
initial latents drawn by the pipeline's own ``prepare_latents`` from the same generator, the same
decoder. Euler in VE coordinates, ``x_{i+1} = x0 + sigma_{i+1} d``, is algebraically the scheduler's
``x_fm + (s_{i+1} - s_i) v``, and the first step at sigma = 1e8 needs no special case: ``x_fm``
recovers the noise to one float32 ulp.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..denoisers import CFGDenoiser, FlowDenoiser
from ..guidance import TeacherGuidance
from ..schedules import (
    FLOW_SIGMA_MAX, flow_sigmas, flow_time_shift_mu, flow_time_to_sigma, initial_sample, shift_flow_times,
)
from .base import (
    OUTPUT_TYPES,
    DistillppPipelineOutput,
    GuidanceDefaults,
    GuidedRun,
    MissingWeightsError,
    WeightsRef,
    check_call_args,
    check_weights,
    make_guidance,
    place_teacher_net,
    run_guided,
)
from .presets import Preset, register_family, register_preset

__all__ = [
    "FLOW_FAMILIES",
    "FLUX_DEV_GUIDANCE",
    "FlowDistillppPipeline",
    "flow_family",
    "check_flow_pair",
    "check_flow_guidance",
    "flux_sigmas",
    "sd3_sigmas",
    "transformer_fn",
    "FluxConditioning",
    "prepare_flux",
    "prepare_sd3",
    "load_flow_preset",
]

FLOW_FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}

# Config entries student and teacher must agree on: they share latents (VAE) and text embeddings.
_SHARED_CONFIG = {
    "in_channels": "latent channels of the shared VAE",
    "patch_size": "patch size",
    "joint_attention_dim": "text-embedding width of the shared T5 encoder",
    "pooled_projection_dim": "pooled text-embedding width of the shared CLIP encoders",
}

# FLUX.1-dev's distilled guidance embedding: 3.5 is diffusers' and BFL's default.
FLUX_DEV_GUIDANCE = 3.5


def flow_family(transformer: Any) -> str:
    """``"flux"`` or ``"sd3"`` for a diffusers transformer (``torch.compile`` wrappers are looked through)."""
    model = getattr(transformer, "_orig_mod", transformer)
    name = type(model).__name__
    if name not in FLOW_FAMILIES:
        raise ValueError(f"transformer must be a FluxTransformer2DModel or SD3Transformer2DModel, got {name}")
    return FLOW_FAMILIES[name]


def check_flow_pair(student: Any, teacher: Any) -> str:
    """Check that a teacher transformer can guide a student transformer; returns the family.

    Raises:
        ValueError: the families differ (a FLUX student with an SD3 teacher), or the configs disagree
            on latent channels, patch size or text-embedding widths, which student and teacher share.
    """
    fam_s, fam_t = flow_family(student), flow_family(teacher)
    if fam_s != fam_t:
        raise ValueError(
            f"teacher is a {type(teacher).__name__} ({fam_t}) but the student is a {type(student).__name__} "
            f"({fam_s}); a flow teacher must be of the student's family (FLUX.1-schnell with FLUX.1-dev, "
            "SD3.5-Large-Turbo with SD3.5-Large) because they share latents and text encoders"
        )
    cs, ct = student.config, teacher.config
    for key, what in _SHARED_CONFIG.items():
        if cs.get(key) != ct.get(key):
            raise ValueError(
                f"teacher transformer {key}={ct.get(key)} differs from the student's {key}={cs.get(key)} "
                f"({what}); the teacher must work on the student's latents and text embeddings"
            )
    out_s = cs.get("out_channels") or cs.get("in_channels")
    out_t = ct.get("out_channels") or ct.get("in_channels")
    if out_s != out_t:
        raise ValueError(f"teacher transformer out_channels={out_t} differs from the student's out_channels={out_s}")
    return fam_s


def check_flow_guidance(guidance: TeacherGuidance | None, sigmas: torch.Tensor) -> None:
    """Reject guidance that cannot run on this flow grid, before any model is called.

    ``space="eps"`` at flow time 1 (sigma = 1e8 standing for infinity) would form
    ``x0 = x - sigma * eps``, amplifying any teacher/student eps difference without bound.

    Raises:
        ValueError: too many guided steps, or ``space="eps"`` with the first step guided.
    """
    if guidance is None:
        return
    guidance.strengths(sigmas)
    if guidance.space == "eps" and guidance.steps >= 1 and float(sigmas[0]) >= FLOW_SIGMA_MAX:
        raise ValueError(
            "space must be 'x0' for flow models when the first step is guided: at flow time 1 (sigma=1e8 "
            "standing for infinity) eps fusion forms x0 = x - sigma * eps and amplifies the teacher's "
            "correction without bound"
        )


# ---------------------------------------------------------------------------------------------------
# Sigma grids


_UNSUPPORTED_SCHEDULER = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                          "stochastic_sampling", "use_flow_sigmas")


def _check_scheduler_config(config: Mapping[str, Any]) -> None:
    for key in _UNSUPPORTED_SCHEDULER:
        if config.get(key):
            raise ValueError(
                f"scheduler config {key}=True is not supported by the flow pipelines (they reproduce the "
                "deterministic Euler grid only); pass a scheduler without it"
            )


def _shift_mu(config: Mapping[str, Any], image_seq_len: int, default_max_shift: float) -> float | None:
    if not config.get("use_dynamic_shifting", False):
        return None
    return flow_time_shift_mu(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )


def flux_sigmas(num_inference_steps: int, scheduler_config: Mapping[str, Any], image_seq_len: int) -> torch.Tensor:
    """VE sigmas of ``FluxPipeline``: flow times ``linspace(1, 1/n, n)``, shifted by its scheduler.

    Unlike SD3, ``FluxPipeline`` hands ``FlowMatchEulerDiscreteScheduler`` explicit flow times, which
    the scheduler then shifts: statically (FLUX.1-schnell, ``shift=1``: unchanged) or dynamically
    with ``mu`` linear in the packed image token count (FLUX.1-dev). This grid is not one
    :func:`~distillpp.schedules.flow_sigmas` produces (that one starts from the scheduler's own
    ``linspace(1, 1/1000, n)``), so it is computed here, in float32 like the scheduler.

    Args:
        num_inference_steps: steps.
        scheduler_config: the student's scheduler config.
        image_seq_len: packed latent tokens, ``(height // 16) * (width // 16)`` for 8x VAEs.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    _check_scheduler_config(scheduler_config)
    n = num_inference_steps
    s = np.linspace(1.0, 1 / n, n).astype(np.float32)
    mu = _shift_mu(scheduler_config, image_seq_len, default_max_shift=1.15)
    s = shift_flow_times(s, shift=scheduler_config.get("shift", 1.0), mu=mu,
                         time_shift_type=scheduler_config.get("time_shift_type", "exponential"),
                         shift_terminal=scheduler_config.get("shift_terminal"))
    s = np.asarray(s, dtype=np.float32).astype(np.float64)
    return torch.cat([flow_time_to_sigma(s), torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def sd3_sigmas(num_inference_steps: int, scheduler_config: Mapping[str, Any], image_seq_len: int) -> torch.Tensor:
    """VE sigmas of ``StableDiffusion3Pipeline``: its scheduler's own grid (:func:`~distillpp.schedules.flow_sigmas`).

    Args:
        num_inference_steps: steps.
        scheduler_config: the student's scheduler config (SD3.5: static ``shift=3``).
        image_seq_len: latent patches; used only with dynamic shifting (SD3's ``max_shift`` default is 1.16).
    """
    _check_scheduler_config(scheduler_config)
    return flow_sigmas(
        num_inference_steps,
        num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        shift=scheduler_config.get("shift", 1.0),
        use_dynamic_shifting=scheduler_config.get("use_dynamic_shifting", False),
        mu=_shift_mu(scheduler_config, image_seq_len, default_max_shift=1.16),
        time_shift_type=scheduler_config.get("time_shift_type", "exponential"),
        shift_terminal=scheduler_config.get("shift_terminal"),
    )


# ---------------------------------------------------------------------------------------------------
# Transformers as nets ``net(x_fm, t, **cond)`` for FlowDenoiser


def transformer_fn(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """A FLUX/SD3 transformer as ``net(hidden_states, timestep, **cond)``, casting floats to its dtype.

    (:func:`distillpp.unet_fn` passes the timestep positionally, which these transformers take third
    or fourth.) ``guidance`` stays float32, as diffusers passes it.
    """

    def net(hidden_states: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        dtype = model.dtype
        cond = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "guidance" else v
                for k, v in cond.items()}
        out = model(hidden_states=hidden_states.to(dtype), timestep=timestep.float(), **cond, return_dict=False)[0]
        return out.to(hidden_states.device)

    net.model = model  # type: ignore[attr-defined]
    return net


@dataclass
class FluxConditioning:
    """Adds FLUX's per-run inputs (position ids, distilled guidance) below CFG and multi-draw batching.

    FLUX's ``img_ids``/``txt_ids`` have no batch dimension and its guidance value is one number per
    run, so they live here rather than in the conditioning that :class:`~distillpp.CFGDenoiser` and
    the guidance's ``samples`` concatenate along the batch.

    Args:
        net: ``net(hidden_states, timestep, **cond)`` over a ``FluxTransformer2DModel`` (possibly placed
            on another device or offloaded).
        img_ids, txt_ids: position ids, ``[tokens, 3]``.
        guidance: distilled guidance value (FLUX.1-dev); ``None`` for models without the embedding.
    """

    net: Callable[..., torch.Tensor]
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: float | None = None

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        device = hidden_states.device
        if self.guidance is not None:
            cond["guidance"] = torch.full((hidden_states.shape[0],), float(self.guidance), device=device,
                                          dtype=torch.float32)
        return self.net(hidden_states, timestep, img_ids=self.img_ids.to(device), txt_ids=self.txt_ids.to(device),
                        **cond)


def _net_model(net: Callable[..., torch.Tensor]) -> torch.nn.Module:
    """The transformer under a (possibly placed or offloaded) :func:`transformer_fn` net."""
    seen = net
    for _ in range(4):
        model = getattr(seen, "model", None)
        if isinstance(model, torch.nn.Module):
            return model
        seen = getattr(seen, "net", None)
        if seen is None:
            break
    raise ValueError("teacher_net must be transformer_fn(teacher_transformer), optionally wrapped by place_teacher_net")


def _flux_guidance(transformer: torch.nn.Module, value: float | None, who: str) -> float | None:
    """The guidance value a FLUX transformer takes: its own if it has the embedding, else none."""
    if not transformer.config.get("guidance_embeds", False):
        return None
    if value is None:
        raise ValueError(f"the {who} transformer has a guidance embedding (FLUX.1-dev); give it a value, e.g. 3.5")
    return float(value)


# ---------------------------------------------------------------------------------------------------
# One run: the pieces run_guided needs


def _batch_size(prompt: str | list[str]) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def _check_size(height: int, width: int, multiple: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < multiple or v % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v!r}")


def _module_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: its accelerate offload hook's device if it has one, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _decoder(pipe: Any, unpack: Callable[[torch.Tensor], torch.Tensor], output_type: str, dtype: torch.dtype
             ) -> Callable[[torch.Tensor], Any]:
    """The student pipeline's own decoding: un-scale, VAE decode, post-process (latents: cast only)."""

    def decode(latents: torch.Tensor) -> Any:
        if output_type == "latent":
            return latents.to(dtype)
        lat = unpack(latents) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        lat = lat.to(device=_module_device(pipe.vae), dtype=pipe.vae.dtype)
        with torch.no_grad():
            image = pipe.vae.decode(lat, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    return decode


def _uses_teacher(teacher_net: Any, guidance: TeacherGuidance | None, sigmas: torch.Tensor) -> bool:
    """A teacher is built unless there is none or the guidance gives it zero weight at every step."""
    if teacher_net is None:
        return False
    return guidance is None or any(lam != 0 for lam in guidance.strengths(sigmas))


def _check_latents(latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")


def _negatives(negative: str | list[str] | None, prompt: str | list[str]) -> str | list[str]:
    """The negative prompt(s) for a batch of prompts (``""`` by default, as diffusers' SD3)."""
    negative = "" if negative is None else negative
    if isinstance(negative, str) and isinstance(prompt, list):
        return [negative] * len(prompt)
    if isinstance(negative, list) and len(negative) != _batch_size(prompt):
        raise ValueError(f"negative prompt has {len(negative)} entries but there are {_batch_size(prompt)} prompts")
    return negative


@torch.no_grad()
def _prologue(pipe, teacher_net, family, pipeline_name, prompt, height, width, generator, num_images_per_prompt):
    """Checks every flow family runs first; returns the student transformer, batch size and image size."""
    check_call_args(generator, num_images_per_prompt)
    student_tf = pipe.transformer
    if flow_family(student_tf) != family:
        raise ValueError(f"pipe must be a {pipeline_name}, got a {type(student_tf).__name__} transformer")
    if teacher_net is not None:
        check_flow_pair(student_tf, _net_model(teacher_net))
    batch = _batch_size(prompt) * num_images_per_prompt
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    return student_tf, batch, height, width


def prepare_flux(
    pipe: Any,
    teacher_net: Callable[..., torch.Tensor] | None,
    prompt: str | list[str],
    prompt_2: str | list[str] | None = None,
    teacher_negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 4,
    guidance_scale: float = FLUX_DEV_GUIDANCE,
    teacher_guidance: float | None = FLUX_DEV_GUIDANCE,
    teacher_cfg: float = 1.0,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    max_sequence_length: int = 512,
    output_type: str = "pil",
    guidance: TeacherGuidance | None = None,
) -> GuidedRun:
    """A ``FluxPipeline`` student and a FLUX teacher network as one :class:`~distillpp.pipelines.GuidedRun`.

    Follows ``FluxPipeline.__call__`` argument for argument; sampled unguided, the run's output equals
    the pipeline's. The teacher shares the pipeline's text encoders and VAE.

    Args:
        pipe: the student ``FluxPipeline`` (e.g. FLUX.1-schnell).
        teacher_net: :func:`transformer_fn` of the teacher's ``FluxTransformer2DModel`` (FLUX.1-dev),
            placed with :func:`~distillpp.pipelines.base.place_teacher_net`; ``None``: no teacher.
        prompt, prompt_2: CLIP and T5 prompts, as in diffusers.
        teacher_negative_prompt: the teacher's true-CFG negative prompt (default ``""``); used only
            when ``teacher_cfg != 1``.
        height, width: image size, multiples of ``2 * vae_scale_factor`` (default 1024).
        num_inference_steps: student steps.
        guidance_scale: the student's guidance embedding, used only if the student has one (diffusers'
            semantics; FLUX.1-schnell has none).
        teacher_guidance: the teacher's guidance embedding value (FLUX.1-dev); reaches the teacher only.
        teacher_cfg: the teacher's true-CFG scale (1 = off: one teacher forward).
        num_images_per_prompt, generator, latents, max_sequence_length: as in diffusers.
        output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (packed latents, like diffusers).
        guidance: validated against the grid before any model runs; with zero strength at every step
            the run has no teacher (nothing of it is computed).
    """
    student_tf, batch, height, width = _prologue(
        pipe, teacher_net, "flux", "FluxPipeline", prompt, height, width, generator, num_images_per_prompt)
    teacher_tf = _net_model(teacher_net) if teacher_net is not None else None
    packed = pipe.vae_scale_factor * 2
    _check_size(height, width, packed)
    sigmas = flux_sigmas(num_inference_steps, pipe.scheduler.config, (height // packed) * (width // packed))
    check_flow_guidance(guidance, sigmas)
    if not _uses_teacher(teacher_net, guidance, sigmas):
        teacher_net = teacher_tf = None
    channels = student_tf.config.in_channels
    _check_latents(latents, (batch, (height // packed) * (width // packed), channels))
    student_guidance = _flux_guidance(student_tf, guidance_scale, "student")
    teacher_guidance = _flux_guidance(teacher_tf, teacher_guidance, "teacher") if teacher_tf is not None else None

    device = pipe._execution_device
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=max_sequence_length,
    )
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    noise, img_ids = pipe.prepare_latents(
        batch, channels // 4, height, width, embeds.dtype, device, generator, latents,
    )
    x = initial_sample(noise, sigmas, "flow")
    student = FlowDenoiser(FluxConditioning(transformer_fn(student_tf), img_ids, text_ids, student_guidance),
                           timestep_scale=1.0, dtype=student_tf.dtype)

    teacher, teacher_args = None, None
    if teacher_net is not None:
        teacher = CFGDenoiser(FlowDenoiser(FluxConditioning(teacher_net, img_ids, text_ids, teacher_guidance),
                                           timestep_scale=1.0, dtype=teacher_tf.dtype), teacher_cfg)
        teacher_args = {"cond": cond}
        if teacher_cfg != 1.0:
            n_embeds, n_pooled, _ = pipe.encode_prompt(
                prompt=_negatives(teacher_negative_prompt, prompt), prompt_2=None, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            )
            teacher_args["uncond"] = {"encoder_hidden_states": n_embeds, "pooled_projections": n_pooled}

    def unpack(lat: torch.Tensor) -> torch.Tensor:
        return pipe._unpack_latents(lat, height, width, pipe.vae_scale_factor)

    return GuidedRun(student=student, x=x, sigmas=sigmas, sampler="euler", teacher=teacher, extra_args=cond,
                     teacher_args=teacher_args, decode=_decoder(pipe, unpack, output_type, embeds.dtype))


@torch.no_grad()
def prepare_sd3(
    pipe: Any,
    teacher_net: Callable[..., torch.Tensor] | None,
    prompt: str | list[str],
    prompt_2: str | list[str] | None = None,
    prompt_3: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    teacher_negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 4,
    guidance_scale: float = 0.0,
    teacher_cfg: float = 3.5,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    max_sequence_length: int = 256,
    clip_skip: int | None = None,
    output_type: str = "pil",
    guidance: TeacherGuidance | None = None,
) -> GuidedRun:
    """A ``StableDiffusion3Pipeline`` student and an SD3 teacher network as one ``GuidedRun``.

    Follows ``StableDiffusion3Pipeline.__call__`` (without skip-layer guidance); sampled unguided, the
    run's output equals the pipeline's.

    Args:
        pipe: the student pipeline (e.g. SD3.5-Large-Turbo).
        teacher_net: :func:`transformer_fn` of the teacher's ``SD3Transformer2DModel`` (SD3.5-Large),
            placed with :func:`~distillpp.pipelines.base.place_teacher_net`; ``None``: no teacher.
        prompt, prompt_2, prompt_3, negative_prompt: as in diffusers (``negative_prompt`` is the
            student's, used when ``guidance_scale > 1``).
        teacher_negative_prompt: the teacher's CFG negative prompt (default: ``negative_prompt``, else ``""``).
        height, width: image size (default: the transformer's sample size times the VAE factor).
        num_inference_steps: student steps.
        guidance_scale: the student's CFG (diffusers' semantics: off at <= 1; Turbo uses 0).
        teacher_cfg: the teacher's CFG scale (1 = off).
        num_images_per_prompt, generator, latents, max_sequence_length, clip_skip: as in diffusers.
        output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        guidance: validated against the grid before any model runs; with zero strength at every step
            the run has no teacher.
    """
    student_tf, batch, height, width = _prologue(
        pipe, teacher_net, "sd3", "StableDiffusion3Pipeline", prompt, height, width, generator, num_images_per_prompt)
    teacher_tf = _net_model(teacher_net) if teacher_net is not None else None
    patch = student_tf.config.patch_size
    _check_size(height, width, pipe.vae_scale_factor * patch)
    lat_h, lat_w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    sigmas = sd3_sigmas(num_inference_steps, pipe.scheduler.config, (lat_h // patch) * (lat_w // patch))
    check_flow_guidance(guidance, sigmas)
    if not _uses_teacher(teacher_net, guidance, sigmas):
        teacher_net = teacher_tf = None
    _check_latents(latents, (batch, student_tf.config.in_channels, lat_h, lat_w))

    device = pipe._execution_device
    student_cfg = guidance_scale > 1
    teacher_cfg_on = teacher_net is not None and teacher_cfg != 1.0
    t_negative = teacher_negative_prompt if teacher_negative_prompt is not None else negative_prompt

    def encode(negative: str | list[str] | None, with_uncond: bool) -> tuple[dict, dict | None]:
        e, ne, p, np_ = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, device=device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=with_uncond,
            negative_prompt=negative, clip_skip=clip_skip, max_sequence_length=max_sequence_length,
        )
        c = {"encoder_hidden_states": e, "pooled_projections": p}
        return c, ({"encoder_hidden_states": ne, "pooled_projections": np_} if with_uncond else None)

    # One encode gives cond and one uncond; a second only when student and teacher negatives differ.
    cond, uncond = encode(negative_prompt if student_cfg else t_negative, student_cfg or teacher_cfg_on)
    t_uncond = uncond
    if student_cfg and teacher_cfg_on and t_negative != negative_prompt:
        _, t_uncond = encode(t_negative, True)

    embeds = cond["encoder_hidden_states"]
    noise = pipe.prepare_latents(batch, student_tf.config.in_channels, height, width, embeds.dtype, device,
                                 generator, latents)
    x = initial_sample(noise, sigmas, "flow")
    student = CFGDenoiser(FlowDenoiser(transformer_fn(student_tf), 1000.0, student_tf.dtype), guidance_scale)
    extra_args = {"cond": cond, "uncond": uncond} if student_cfg else {"cond": cond}

    teacher, teacher_args = None, None
    if teacher_net is not None:
        teacher = CFGDenoiser(FlowDenoiser(teacher_net, 1000.0, teacher_tf.dtype), teacher_cfg)
        teacher_args = {"cond": cond, "uncond": t_uncond} if teacher_cfg_on else {"cond": cond}

    return GuidedRun(student=student, x=x, sigmas=sigmas, sampler="euler", teacher=teacher, extra_args=extra_args,
                     teacher_args=teacher_args, decode=_decoder(pipe, lambda lat: lat, output_type, embeds.dtype))


# ---------------------------------------------------------------------------------------------------
# The user-facing pipeline


class FlowDistillppPipeline:
    """A FLUX or SD3 student pipeline guided by a teacher transformer of the same family.

    Args:
        pipe: the student ``FluxPipeline`` / ``StableDiffusion3Pipeline`` (its text encoders and VAE
            serve the teacher too).
        teacher: the teacher transformer (``FluxTransformer2DModel`` / ``SD3Transformer2DModel``), or
            ``None`` for the student alone.
        guidance: default teacher-guidance knobs (``teacher_cfg`` is the teacher's CFG scale: FLUX true
            CFG, 1 = off; SD3 ordinary CFG). Default: the family's preset values.
        num_inference_steps, guidance_scale, height, width, max_sequence_length: student defaults
            (``max_sequence_length=256`` is FLUX.1-schnell's and SD3's T5 length; diffusers' ``FluxPipeline``
            defaults to 512, so pass 512 to compare with its default output).
        teacher_guidance: FLUX.1-dev's distilled guidance value, given to the teacher only.
        teacher_device: keep the teacher on this device (default: the student's execution device).
        teacher_offload: ``"cpu"``: keep the teacher in CPU memory, copied over for each of its calls.

    Raises:
        ValueError: student and teacher are of different families or disagree on shared dimensions.
    """

    def __init__(
        self,
        pipe: Any,
        teacher: torch.nn.Module | None = None,
        guidance: GuidanceDefaults | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 0.0,
        teacher_guidance: float | None = FLUX_DEV_GUIDANCE,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        teacher_device: torch.device | str | None = None,
        teacher_offload: str | None = None,
    ):
        self.pipe = pipe
        self.family = flow_family(pipe.transformer)
        if teacher is not None:
            check_flow_pair(pipe.transformer, teacher)
        self.teacher = teacher
        self.defaults = guidance if guidance is not None else _FAMILY_DEFAULTS[self.family]
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.teacher_guidance = teacher_guidance
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        self.teacher_device = teacher_device
        self.teacher_offload = teacher_offload
        self._teacher_net = self._place_teacher()
        self._progress_disable = True

    @property
    def device(self) -> torch.device:
        """The execution device (the student's)."""
        return self.pipe._execution_device

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """``disable=False`` shows a sampling progress bar (diffusers' method name)."""
        self._progress_disable = kwargs.get("disable", True)

    def _place_teacher(self) -> Callable[..., torch.Tensor] | None:
        if self.teacher is None:
            return None
        return place_teacher_net(transformer_fn(self.teacher), self.teacher, self.device,
                                 self.teacher_device, self.teacher_offload)

    @classmethod
    def from_pretrained(
        cls,
        student: str,
        teacher: str | None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        teacher_device: torch.device | str | None = None,
        teacher_offload: str | None = None,
        **kwargs: Any,
    ) -> "FlowDistillppPipeline":
        """Load a student pipeline and only the transformer of its teacher (the rest is shared).

        Args:
            student: id or folder of a ``FluxPipeline`` / ``StableDiffusion3Pipeline``.
            teacher: id or folder whose ``transformer`` subfolder is the teacher (``None``: no teacher).
            torch_dtype: e.g. ``torch.bfloat16`` (samples stay float32).
            device: where the student goes.
            teacher_device, teacher_offload: teacher placement (see the class).
            **kwargs: pipeline defaults (``guidance=``, ``num_inference_steps=``...) and
                ``from_pretrained`` options (``local_files_only``, ``revision``, ``token``...).

        Raises:
            ValueError: the teacher's config is not of the student's family or disagrees on shared
                dimensions (checked before its weights load).
        """
        from diffusers import DiffusionPipeline

        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _PIPELINE_DEFAULTS}
        pipe = DiffusionPipeline.from_pretrained(student, torch_dtype=torch_dtype, **kwargs)
        if not hasattr(pipe, "transformer"):
            raise ValueError(f"student {student!r} is not a FLUX or SD3 pipeline (it has no transformer)")
        teacher_tf = _load_teacher(pipe, student, teacher, torch_dtype, kwargs) if teacher is not None else None
        if device is not None:
            pipe.to(device)
        return cls(pipe, teacher_tf, teacher_device=teacher_device, teacher_offload=teacher_offload, **own)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "FlowDistillppPipeline":
        """Move the student (and the teacher, unless it is placed elsewhere or offloaded)."""
        self.pipe.to(device=device, dtype=dtype)
        if self.teacher is not None:
            if dtype is not None:
                self.teacher.to(dtype=dtype)
            if device is not None and self.teacher_device is None and self.teacher_offload is None:
                self.teacher.to(device)
            self._teacher_net = self._place_teacher()
        return self

    def prepare(self, prompt: str | list[str], guidance: TeacherGuidance | None = None, **kwargs: Any) -> GuidedRun:
        """The :class:`~distillpp.pipelines.GuidedRun` for one call (``prepare_flux`` / ``prepare_sd3`` arguments)."""
        kwargs.setdefault("num_inference_steps", self.num_inference_steps)
        kwargs.setdefault("guidance_scale", self.guidance_scale)
        kwargs.setdefault("max_sequence_length", self.max_sequence_length)
        kwargs.setdefault("height", self.height)
        kwargs.setdefault("width", self.width)
        if guidance is not None and guidance.teacher_cfg is not None:
            kwargs.setdefault("teacher_cfg", guidance.teacher_cfg)
        if self.family == "flux":
            kwargs.setdefault("teacher_guidance", self.teacher_guidance)
            kwargs.pop("negative_prompt", None)  # FLUX students take no negative prompt
            return prepare_flux(self.pipe, self._teacher_net, prompt, guidance=guidance, **kwargs)
        kwargs.pop("teacher_guidance", None)
        return prepare_sd3(self.pipe, self._teacher_net, prompt, guidance=guidance, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        strength: Any = None,
        guided_steps: int | None = None,
        teacher_cfg: float | None = None,
        renoise: str | None = None,
        noise: str | None = None,
        space: str | None = None,
        samples: int | None = None,
        teacher_negative_prompt: str | list[str] | None = None,
        callback: Callable[[dict], None] | None = None,
        return_dict: bool = True,
        teacher_guidance: float | None = None,
        max_sequence_length: int | None = None,
        latents: torch.Tensor | None = None,
        **prompts: Any,
    ) -> DistillppPipelineOutput | tuple:
        """Generate images; the student alone with ``strength=0`` (equal to its diffusers pipeline).

        Args:
            prompt: text prompt(s).
            negative_prompt: the student's negative prompt (SD3 with ``guidance_scale > 1``) and the
                teacher's default one.
            num_inference_steps, guidance_scale, height, width, max_sequence_length: override defaults.
            generator: one ``torch.Generator`` for the initial latents and every guidance draw.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            num_images_per_prompt: images per prompt.
            latents: initial unit noise in the student pipeline's layout (FLUX: packed
                ``[B, tokens, 4 C]``; SD3: ``[B, C, H / f, W / f]``) instead of drawing it.
            strength, guided_steps, teacher_cfg, renoise, noise, space, samples: teacher-guidance knobs
                (``None``: the pipeline's defaults; see :class:`distillpp.TeacherGuidance`).
            teacher_negative_prompt: the teacher's CFG negative prompt (default ``negative_prompt`` or ``""``).
            callback: per-step callback of :func:`distillpp.sample`.
            return_dict: return a :class:`~distillpp.pipelines.DistillppPipelineOutput` (else a tuple).
            teacher_guidance: FLUX.1-dev guidance embedding value for the teacher.
            **prompts: ``prompt_2``, ``prompt_3``, ``clip_skip`` as in diffusers.

        Raises:
            ValueError: on invalid arguments, before any model call.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        allowed = {"prompt_2", "prompt_3", "clip_skip"} if self.family == "sd3" else {"prompt_2"}
        unknown = set(prompts) - allowed
        if unknown:
            raise ValueError(
                f"unexpected arguments {sorted(unknown)}; {self.family} pipelines accept {sorted(allowed)}"
            )
        g = make_guidance(self.defaults, strength, guided_steps, teacher_cfg, renoise, noise, space, samples)
        kwargs: dict[str, Any] = dict(prompts, generator=generator, output_type=output_type,
                                      num_images_per_prompt=num_images_per_prompt, latents=latents)
        if self.family == "sd3":
            kwargs["negative_prompt"] = negative_prompt
        t_negative = teacher_negative_prompt if teacher_negative_prompt is not None else negative_prompt
        if self._teacher_net is not None:
            kwargs["teacher_negative_prompt"] = t_negative
            kwargs["teacher_cfg"] = g.teacher_cfg
        for key, value in (("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale),
                           ("height", height), ("width", width), ("max_sequence_length", max_sequence_length),
                           ("teacher_guidance", teacher_guidance)):
            if value is not None:
                kwargs[key] = value
        run = self.prepare(prompt, guidance=g if self._teacher_net is not None else None, **kwargs)
        guided = g if run.teacher is not None else None
        latents_out, images = run_guided(run, guided, generator=generator, callback=callback,
                                         disable=self._progress_disable)
        if images is None:
            images = latents_out
        if not return_dict:
            return (images,)
        return DistillppPipelineOutput(images=images)


_FLOW_X0 = GuidanceDefaults(strength=0.05, guided_steps=1, space="x0", renoise="next", noise="random")
_FAMILY_DEFAULTS = {"flux": replace(_FLOW_X0, teacher_cfg=1.0), "sd3": replace(_FLOW_X0, teacher_cfg=3.5)}

_PIPELINE_DEFAULTS = ("guidance", "num_inference_steps", "guidance_scale", "teacher_guidance", "height", "width",
                      "max_sequence_length")
_HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only")


def _load_teacher(pipe: Any, student: str, teacher: str, torch_dtype: torch.dtype | None,
                  kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """The teacher's transformer, its config checked against the student's before the weights load."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    family = flow_family(pipe.transformer)
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    hub = {k: v for k, v in kwargs.items() if k in _HUB_OPTIONS}
    config = cls.load_config(teacher, subfolder="transformer", **hub)
    name = config.get("_class_name")
    if name is not None and FLOW_FAMILIES.get(name) != family:
        raise ValueError(
            f"teacher {teacher!r} has a {name} transformer but the student {student!r} is {family} "
            f"({cls.__name__}); pair FLUX with FLUX and SD3 with SD3"
        )
    for key, what in _SHARED_CONFIG.items():
        if key in config and config[key] != pipe.transformer.config.get(key):
            raise ValueError(
                f"teacher {teacher!r} has {key}={config[key]} but the student {student!r} has "
                f"{key}={pipe.transformer.config.get(key)} ({what})"
            )
    model = cls.from_pretrained(teacher, subfolder="transformer", torch_dtype=torch_dtype, **hub)
    check_flow_pair(pipe.transformer, model)
    return model


# ---------------------------------------------------------------------------------------------------
# Presets

_FLUX_FILES = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
               "tokenizer_2/*", "transformer/*", "vae/*")
_SD3_FILES = _FLUX_FILES + ("text_encoder_3/*", "tokenizer_3/*")


def load_flow_preset(
    preset: Preset,
    base: str | None = None,
    student: str | None = None,
    teacher: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    download: bool = False,
    teacher_device: torch.device | str | None = None,
    teacher_offload: str | None = None,
    **kwargs: Any,
) -> FlowDistillppPipeline:
    """Loader of the ``flux`` and ``sd3`` preset families (see :func:`~distillpp.pipelines.from_preset`).

    Args:
        preset: the preset.
        base, student: folder or id of the student pipeline (either name; overrides the preset's).
        teacher: folder or id of the teacher (its ``transformer`` subfolder is loaded); ``"none"``: no teacher.
        torch_dtype: e.g. ``torch.bfloat16``.
        device, teacher_device, teacher_offload: placement.
        download: allow downloads (default: local folders and the Hugging Face cache only).
        **kwargs: pipeline defaults overriding the preset's (``num_inference_steps=``...).

    Raises:
        MissingWeightsError: weights are missing or incomplete (the message says how to get them).
        ValueError: the teacher is not of the student's family or disagrees on shared dimensions.
    """
    student_repo = student or base or preset.base
    teacher_repo = preset.teacher if teacher is None else teacher
    if teacher_repo in ("none", ""):
        teacher_repo = None
    files = _FLUX_FILES if preset.family == "flux" else _SD3_FILES
    refs = [WeightsRef(student_repo, role="student pipeline", allow_patterns=files)]
    if teacher_repo is not None:
        refs.append(WeightsRef(teacher_repo, role="teacher transformer",
                               allow_patterns=("transformer/*", "model_index.json")))
    paths = check_weights(refs, local_files_only=not download, what=f"preset {preset.name}")
    extra = dict(preset.extra)
    defaults: dict[str, Any] = dict(
        guidance=preset.guidance, num_inference_steps=preset.num_inference_steps,
        guidance_scale=preset.guidance_scale, height=preset.height, width=preset.width,
        max_sequence_length=extra.get("max_sequence_length", 256),
        teacher_guidance=extra.get("teacher_guidance", FLUX_DEV_GUIDANCE),
    )
    defaults.update(kwargs)
    try:
        return FlowDistillppPipeline.from_pretrained(
            paths[refs[0]], paths[refs[1]] if teacher_repo is not None else None, torch_dtype=torch_dtype,
            device=device, teacher_device=teacher_device, teacher_offload=teacher_offload,
            local_files_only=not download, **defaults,
        )
    except MissingWeightsError:
        raise
    except OSError as e:  # an incomplete folder or snapshot (missing subfolder or weights file)
        raise MissingWeightsError(
            f"could not load preset {preset.name!r} from {', '.join(paths.values())}: {e}\n"
            "get the weights with:\n" + "\n".join("  " + r.download_command() for r in refs if r.is_hub_id)
        ) from e


register_family("flux", load_flow_preset)
register_family("sd3", load_flow_preset)

# Steps, student guidance and token counts follow the model cards (FLUX.1-schnell: 4 steps, guidance 0,
# 256 T5 tokens; SD3.5-Large-Turbo: 4 steps, guidance 0; SD3.5-Large: CFG 3.5). Strength 0.05 in x0
# space with one guided step is the paper's range for Euler students (SPEC section 5); it has not been
# tuned or validated on these weights.

register_preset(Preset(
    name="flux-schnell", family="flux", base="black-forest-labs/FLUX.1-schnell", student_kind="pipeline",
    student=None, teacher="black-forest-labs/FLUX.1-dev", scheduler="FlowMatchEulerDiscreteScheduler",
    num_inference_steps=4, guidance_scale=0.0, guidance=_FAMILY_DEFAULTS["flux"], height=1024,
    width=1024, variant=None, extra={"teacher_guidance": FLUX_DEV_GUIDANCE, "max_sequence_length": 256},
    notes="FLUX.1-schnell (static shift 1) guided by the FLUX.1-dev transformer with its distilled guidance "
          "embedding 3.5; teacher_cfg > 1 adds true CFG against the negative prompt. Strength unvalidated on "
          "real weights.",
))
register_preset(Preset(
    name="sd35-large-turbo", family="sd3", base="stabilityai/stable-diffusion-3.5-large-turbo",
    student_kind="pipeline", student=None, teacher="stabilityai/stable-diffusion-3.5-large",
    scheduler="FlowMatchEulerDiscreteScheduler", num_inference_steps=4, guidance_scale=0.0,
    guidance=_FAMILY_DEFAULTS["sd3"], height=1024, width=1024, variant=None,
    extra={"max_sequence_length": 256},
    notes="SD3.5-Large-Turbo (4 steps, no CFG) guided by SD3.5-Large with CFG 3.5 (its model card's value; "
          "3.5-4.5 are usual). Strength unvalidated on real weights.",
))
