"""Flow-matching students and teachers: FLUX.1 and Stable Diffusion 3.5 as denoisers.

Two model families of :class:`~distillpp.pipelines.GuidedPipeline` (:class:`FluxFamily`,
:class:`SD3Family`) over the flow noise family; the method is :mod:`distillpp.guidance`, the sampler
our ``euler``.

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

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..denoisers import CFGDenoiser, FlowDenoiser
from ..guidance import TeacherGuidance
from ..schedules import FLOW_SIGMA_MAX, flow_sigmas, flow_time_shift_mu, flow_time_to_sigma, shift_flow_times
from .core import Call, Conditioning, DiffusersFamily, GuidedPipeline, module_dtype
from .noise import FlowNoise
from .presets import LoadOptions, Preset, register_family, register_preset
from .weights import WeightsRef, check_weights, loading_errors

__all__ = [
    "FLOW_FAMILIES",
    "FLUX_DEV_GUIDANCE",
    "FlowDistillppPipeline",
    "flow_family",
    "check_flow_pair",
    "check_flow_guidance",
    "flux_sigmas",
    "sd3_sigmas",
    "FluxConditioning",
    "FluxFamily",
    "SD3Family",
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
    if guidance.space == "eps" and guidance.guided_steps >= 1 and float(sigmas[0]) >= FLOW_SIGMA_MAX:
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
# FLUX's per-run inputs


@dataclass
class FluxConditioning:
    """Adds FLUX's per-run inputs (position ids, distilled guidance) below CFG and multi-draw batching.

    FLUX's ``img_ids``/``txt_ids`` have no batch dimension and its guidance value is one number per
    run, so they live here rather than in the conditioning that :class:`~distillpp.CFGDenoiser` and
    the guidance's ``samples`` concatenate along the batch.

    Args:
        net: ``net(hidden_states, timestep, **cond)`` over a ``FluxTransformer2DModel``
            (:func:`distillpp.denoisers.transformer_fn`, possibly placed on another device or offloaded).
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


def _flux_guidance(transformer: torch.nn.Module, value: float | None, who: str) -> float | None:
    """The guidance value a FLUX transformer takes: its own if it has the embedding, else none."""
    if not transformer.config.get("guidance_embeds", False):
        return None
    if value is None:
        raise ValueError(f"the {who} transformer has a guidance embedding (FLUX.1-dev); give it a value, e.g. 3.5")
    return float(value)


# ---------------------------------------------------------------------------------------------------
# The two families


def _module_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: its accelerate offload hook's device if it has one, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class _TransformerFamily(DiffusersFamily):
    """What FLUX and SD3 share: a diffusers pipeline whose text encoders and VAE serve the teacher too."""

    component = "transformer"
    pipeline_name = ""

    def __init__(self, pipe: Any, teacher: torch.nn.Module | None, options: Mapping[str, Any]):
        if flow_family(getattr(pipe, "transformer", None)) != self.name:
            raise ValueError(f"pipe must be a {self.pipeline_name}, "
                             f"got a {type(pipe.transformer).__name__} transformer")
        self.owner = pipe
        self.student_module = pipe.transformer
        self.teacher_module = teacher
        self.teacher_kind = "separate" if teacher is not None else "none"
        self.options = dict(options)
        self.noise = FlowNoise(timestep_scale=self.timestep_scale)  # the grid depends on the size: sigmas()

    def check_pair(self) -> None:
        if self.teacher_module is not None:
            check_flow_pair(self.student_module, self.teacher_module)

    def default_size(self) -> tuple[int, int]:
        side = self.owner.default_sample_size * self.owner.vae_scale_factor
        return side, side

    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        return self.owner.vae_scale_factor * self.patch

    def _seq_len(self, call: Call) -> int:
        """Image tokens (FLUX: packed 2x2 latent patches; SD3: patches): its grid is shifted by them."""
        m = self.size_multiple
        return (call.height // m) * (call.width // m)

    def sigmas(self, call: Call) -> torch.Tensor:
        """The pipeline's own grid (``flux_sigmas`` / ``sd3_sigmas``) for this image size."""
        if call.timesteps is not None:
            raise ValueError("timesteps apply to discrete VP students only; flow students take num_inference_steps")
        return self.grid(call.num_inference_steps, self.owner.scheduler.config, self._seq_len(call))

    def check_guidance(self, guidance: TeacherGuidance, sigmas: torch.Tensor) -> None:
        check_flow_guidance(guidance, sigmas)

    def initial(self, call: Call, sigmas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        shape = self.latent_shape(call)
        if call.latents is not None and tuple(call.latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(call.latents.shape)}")
        noise = self.prepare_latents(call, dtype)
        return self.noise.initial(noise.to(self.device), sigmas)  # host grid: no read back from the GPU

    def decode(self, latents: torch.Tensor, call: Call) -> tuple[Any, Any]:
        """The student pipeline's own decoding: un-scale, VAE decode, post-process (latents: cast only)."""
        pipe, dtype = self.owner, call.state["embeds_dtype"]
        if call.output_type == "latent":
            return latents.to(dtype), None
        lat = self.unpack(latents, call) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        lat = lat.to(device=_module_device(pipe.vae), dtype=pipe.vae.dtype)
        image = pipe.vae.decode(lat, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=call.output_type), None

    def unpack(self, latents: torch.Tensor, call: Call) -> torch.Tensor:
        return latents


def _negatives(negative: list[str] | None, n: int) -> list[str]:
    """The negative prompts of a batch (``""`` by default, as diffusers' SD3)."""
    return negative if negative is not None else [""] * n


class FluxFamily(_TransformerFamily):
    """A ``FluxPipeline`` student (FLUX.1-schnell) and a FLUX teacher transformer (FLUX.1-dev).

    Follows ``FluxPipeline.__call__``; sampled unguided, the run's output equals the pipeline's. The
    student's ``guidance_scale`` feeds its guidance embedding only if it has one (FLUX.1-schnell has
    none); the teacher's embedding value is the ``teacher_guidance`` option, given to the teacher only;
    ``teacher_cfg > 1`` adds true CFG against the teacher's negative prompt.
    """

    name = "flux"
    pipeline_name = "FluxPipeline"
    timestep_scale = 1.0

    @property
    def patch(self) -> int:
        return 2

    def check_options(self, call: Call) -> None:
        if call.negative is not None:
            raise ValueError("negative_prompt does not apply to FLUX students (no student CFG); "
                             "use teacher_negative_prompt with teacher_cfg > 1")

    grid = staticmethod(flux_sigmas)

    def student_uses_cfg(self, call: Call) -> bool:
        return False

    def encode(self, call: Call, student_cfg: bool, teacher: bool) -> Conditioning:
        pipe, o = self.owner, call.options
        kw = dict(device=self.device, num_images_per_prompt=call.num_images_per_prompt,
                  max_sequence_length=o["max_sequence_length"])
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=call.prompts, prompt_2=o["prompt_2"], **kw)
        call.state.update(text_ids=text_ids, embeds_dtype=embeds.dtype)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if not teacher:
            return Conditioning({"cond": cond})
        t_args: dict[str, Any] = {"cond": cond}
        if call.state["teacher_cfg"] != 1.0:
            negative = call.teacher_negative or _negatives(None, len(call.prompts))
            n_embeds, n_pooled, _ = pipe.encode_prompt(prompt=negative, prompt_2=None, **kw)
            t_args["uncond"] = {"encoder_hidden_states": n_embeds, "pooled_projections": n_pooled}
        return Conditioning({"cond": cond}, t_args)

    def latent_shape(self, call: Call) -> tuple[int, ...]:
        return (call.batch, self._seq_len(call), self.student_module.config.in_channels)

    def prepare_latents(self, call: Call, dtype: torch.dtype) -> torch.Tensor:
        noise, img_ids = self.owner.prepare_latents(
            call.batch, self.student_module.config.in_channels // 4, call.height, call.width, dtype, self.device,
            call.generator, call.latents)
        call.state["img_ids"] = img_ids
        return noise

    def _conditioned(self, net: Callable[..., torch.Tensor], call: Call, guidance: float | None) -> FluxConditioning:
        return FluxConditioning(net, call.state["img_ids"], call.state["text_ids"], guidance)

    def student_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        guidance = _flux_guidance(self.student_module, call.guidance_scale, "student")
        return CFGDenoiser(FlowDenoiser(self._conditioned(net, call, guidance), timestep_scale=1.0,
                                        dtype=module_dtype(self.student_module)))

    def teacher_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        guidance = _flux_guidance(self.teacher_module, call.options["teacher_guidance"], "teacher")
        inner = FlowDenoiser(self._conditioned(net, call, guidance), timestep_scale=1.0,
                             dtype=module_dtype(self.teacher_module))
        return CFGDenoiser(inner, call.state["teacher_cfg"])

    def check_pair(self) -> None:
        super().check_pair()
        if self.teacher_module is not None:
            _flux_guidance(self.teacher_module, self.options["teacher_guidance"], "teacher")

    def unpack(self, latents: torch.Tensor, call: Call) -> torch.Tensor:
        return self.owner._unpack_latents(latents, call.height, call.width, self.owner.vae_scale_factor)


class SD3Family(_TransformerFamily):
    """A ``StableDiffusion3Pipeline`` student (SD3.5-Large-Turbo) and an SD3 teacher transformer (SD3.5-Large).

    Follows ``StableDiffusion3Pipeline.__call__`` (without skip-layer guidance); sampled unguided, the
    run's output equals the pipeline's. The teacher runs ordinary CFG (``teacher_cfg``).
    """

    name = "sd3"
    pipeline_name = "StableDiffusion3Pipeline"
    timestep_scale = 1000.0

    @property
    def patch(self) -> int:
        return self.student_module.config.patch_size

    grid = staticmethod(sd3_sigmas)

    def _encode(self, call: Call, negative: list[str] | None, with_uncond: bool) -> tuple[dict, dict | None]:
        o = call.options
        e, ne, p, np_ = self.owner.encode_prompt(
            prompt=call.prompts, prompt_2=o["prompt_2"], prompt_3=o["prompt_3"], device=self.device,
            num_images_per_prompt=call.num_images_per_prompt, do_classifier_free_guidance=with_uncond,
            negative_prompt=negative, clip_skip=o["clip_skip"], max_sequence_length=o["max_sequence_length"],
        )
        c = {"encoder_hidden_states": e, "pooled_projections": p}
        return c, ({"encoder_hidden_states": ne, "pooled_projections": np_} if with_uncond else None)

    def encode(self, call: Call, student_cfg: bool, teacher: bool) -> Conditioning:
        cond = self.cfg_conditioning(call, student_cfg, teacher, lambda neg, with_uncond: self._encode(
            call, neg, with_uncond))
        call.state["embeds_dtype"] = cond.student["cond"]["encoder_hidden_states"].dtype
        return cond

    def prepare_latents(self, call: Call, dtype: torch.dtype) -> torch.Tensor:
        return self.owner.prepare_latents(call.batch, self.student_module.config.in_channels, call.height,
                                          call.width, dtype, self.device, call.generator, call.latents)

    def student_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        return CFGDenoiser(self.noise.denoiser(net, module_dtype(self.student_module)), call.guidance_scale)

    def teacher_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        inner = self.noise.teacher_denoiser(net, module_dtype(self.teacher_module))
        return CFGDenoiser(inner, call.state["teacher_cfg"])


_FAMILY_CLASSES = {"flux": FluxFamily, "sd3": SD3Family}
_FLOW_X0 = TeacherGuidance(strength=0.05, guided_steps=1, space="x0", renoise="next", noise="random")
_FAMILY_DEFAULTS = {"flux": TeacherGuidance(strength=0.05, guided_steps=1, space="x0", teacher_cfg=1.0),
                    "sd3": TeacherGuidance(strength=0.05, guided_steps=1, space="x0", teacher_cfg=3.5)}


class FlowDistillppPipeline(GuidedPipeline):
    """A FLUX or SD3 student pipeline guided by a teacher transformer of the same family.

    Args:
        pipe: the student ``FluxPipeline`` / ``StableDiffusion3Pipeline`` (its text encoders and VAE
            serve the teacher too).
        teacher: the teacher transformer (``FluxTransformer2DModel`` / ``SD3Transformer2DModel``), or
            ``None`` for the student alone.
        guidance: default teacher-guidance knobs (``teacher_cfg`` is the teacher's CFG scale: FLUX true
            CFG, 1 = off; SD3 ordinary CFG). Default: the family's preset values.
        num_inference_steps, guidance_scale, height, width: student defaults.
        max_sequence_length: T5 tokens (256 is FLUX.1-schnell's and SD3's; diffusers' ``FluxPipeline``
            defaults to 512, so pass 512 to compare with its default output).
        teacher_guidance: FLUX.1-dev's distilled guidance value, given to the teacher only.
        teacher_device, teacher_offload, compile, preset: see :class:`~distillpp.pipelines.GuidedPipeline`.

    Raises:
        ValueError: student and teacher are of different families or disagree on shared dimensions.
    """

    def __init__(
        self,
        pipe: Any,
        teacher: torch.nn.Module | None = None,
        guidance: TeacherGuidance | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 0.0,
        teacher_guidance: float | None = FLUX_DEV_GUIDANCE,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        **kwargs: Any,
    ):
        family = flow_family(getattr(pipe, "transformer", None))
        options: dict[str, Any] = {"prompt_2": None, "max_sequence_length": max_sequence_length}
        if family == "flux":
            options["teacher_guidance"] = teacher_guidance
        else:
            options.update(prompt_3=None, clip_skip=None)
        super().__init__(_FAMILY_CLASSES[family](pipe, teacher, options),
                         guidance=guidance if guidance is not None else _FAMILY_DEFAULTS[family],
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                         width=width, **kwargs)

    @property
    def teacher_guidance(self) -> float | None:
        """FLUX.1-dev's guidance value for the teacher (``None`` for SD3)."""
        return self.family.options.get("teacher_guidance")

    @classmethod
    def from_pretrained(
        cls,
        student: str,
        teacher: str | None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> "FlowDistillppPipeline":
        """Load a student pipeline and only the transformer of its teacher (the rest is shared).

        Args:
            student: id or folder of a ``FluxPipeline`` / ``StableDiffusion3Pipeline``.
            teacher: id or folder whose ``transformer`` subfolder is the teacher (``None``: no teacher).
            torch_dtype: e.g. ``torch.bfloat16``.
            device: where the student goes.
            **kwargs: pipeline options (``guidance=``, ``num_inference_steps=``, ``teacher_device=``...) and
                ``from_pretrained`` options (``local_files_only``, ``revision``, ``token``...).

        Raises:
            ValueError: the teacher's config is not of the student's family or disagrees on shared
                dimensions (checked before its weights load).
        """
        from diffusers import DiffusionPipeline

        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _PIPELINE_OPTIONS}
        pipe = DiffusionPipeline.from_pretrained(student, dtype=torch_dtype, **kwargs)
        if not hasattr(pipe, "transformer"):
            raise ValueError(f"student {student!r} is not a FLUX or SD3 pipeline (it has no transformer)")
        teacher_tf = _load_teacher(pipe, student, teacher, torch_dtype, kwargs) if teacher is not None else None
        if device is not None:
            pipe.to(device)
            if teacher_tf is not None and own.get("teacher_device") is None and own.get("teacher_offload") is None:
                teacher_tf.to(device)
        return cls(pipe, teacher_tf, **own)

    preset_families = ("flux", "sd3")


_PIPELINE_OPTIONS = ("guidance", "num_inference_steps", "guidance_scale", "teacher_guidance", "height", "width",
                     "max_sequence_length", "teacher_device", "teacher_offload", "compile", "preset")
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
    model = cls.from_pretrained(teacher, subfolder="transformer", dtype=torch_dtype, **hub)
    check_flow_pair(pipe.transformer, model)
    return model


# ---------------------------------------------------------------------------------------------------
# Presets

_FLUX_FILES = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
               "tokenizer_2/*", "transformer/*", "vae/*")
_SD3_FILES = _FLUX_FILES + ("text_encoder_3/*", "tokenizer_3/*")


def load_flow_preset(preset: Preset, opts: LoadOptions, **pipeline_kwargs: Any) -> FlowDistillppPipeline:
    """Loader of the ``flux`` and ``sd3`` preset families (see :func:`~distillpp.pipelines.from_preset`).

    Args:
        preset: the preset.
        opts: the :class:`~distillpp.pipelines.presets.LoadOptions`; ``base`` or ``student`` name the student
            pipeline, ``teacher`` the teacher (its ``transformer`` subfolder is loaded; ``"none"``: no teacher).
        **pipeline_kwargs: pipeline defaults overriding the preset's (``num_inference_steps=``...).

    Raises:
        MissingWeightsError: weights are missing or incomplete (the message says how to get them).
        ValueError: the teacher is not of the student's family or disagrees on shared dimensions.
    """
    student_repo = opts.student or opts.base or preset.base
    teacher_repo = preset.teacher if opts.teacher is None else opts.teacher
    if teacher_repo in ("none", ""):
        teacher_repo = None
    files = _FLUX_FILES if preset.family == "flux" else _SD3_FILES
    refs = [WeightsRef(student_repo, role="student pipeline", allow_patterns=files)]
    if teacher_repo is not None:
        refs.append(WeightsRef(teacher_repo, role="teacher transformer",
                               allow_patterns=("transformer/*", "model_index.json")))
    paths = check_weights(refs, local_files_only=not opts.download, what=f"preset {preset.name}")
    extra = dict(preset.extra)
    defaults: dict[str, Any] = dict(
        guidance=preset.guidance, num_inference_steps=preset.num_inference_steps,
        guidance_scale=preset.guidance_scale, height=preset.height, width=preset.width,
        max_sequence_length=extra.get("max_sequence_length", 256),
        teacher_guidance=extra.get("teacher_guidance", FLUX_DEV_GUIDANCE),
    )
    defaults.update(pipeline_kwargs)
    with loading_errors(f"preset {preset.name!r}", paths.values(), refs):
        return FlowDistillppPipeline.from_pretrained(
            paths[refs[0]], paths[refs[1]] if teacher_repo is not None else None, torch_dtype=opts.torch_dtype,
            device=opts.device, teacher_device=opts.teacher_device, teacher_offload=opts.teacher_offload,
            compile=opts.compile,
            preset=preset, local_files_only=not opts.download, **defaults,
        )


register_family("flux", load_flow_preset)
register_family("sd3", load_flow_preset)

# Steps, student guidance and token counts follow the model cards (FLUX.1-schnell: 4 steps, guidance 0,
# 256 T5 tokens; SD3.5-Large-Turbo: 4 steps, guidance 0; SD3.5-Large: CFG 3.5). Strength 0.05 in x0
# space with one guided step is the paper's range for Euler students (docs/method.md); it has not been
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
