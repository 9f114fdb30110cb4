"""SD1.5 / SD2 / SDXL students and teachers on diffusers, sampled through :func:`distillpp.sample`.

:class:`DistillppPipeline` takes a loaded student pipeline (``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``, with the student's UNet and scheduler) and a teacher: another UNet
sharing the student's text encoders and VAE, or ``"adapter-off"`` for LoRA students (the student's
own UNet with the adapter switched off for the teacher call). The student's scheduler is read once
into explicit sigmas and a sampler; prompts are encoded and latents decoded by the student
pipeline's own methods, so ``strength=0`` reproduces the student's diffusers pipeline.

Scheduler -> sampler: ``EulerDiscreteScheduler`` -> ``euler``, ``EulerAncestralDiscreteScheduler`` ->
``euler_ancestral``, ``LCMScheduler`` -> ``consistency`` (with LCM's boundary condition and, for UNets
with ``time_cond_proj_dim``, its guidance embedding), ``DDIMScheduler`` -> ``ddim``.

Known differences from diffusers, all outside the presets: DDIM with ``n`` steps that do not divide
1000 (diffusers steps to ``t - 1000 // n``, one timestep off its own grid); ``clip_sample`` /
``thresholding`` (ignored, with a warning); fp16 students (our sampler state stays float32, diffusers'
is fp16, so images differ by fp16 rounding).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch

from ..denoisers import CFGDenoiser, DiscreteVPDenoiser, LCMDenoiser, lcm_guidance_embedding, unet_fn
from ..schedules import DiscreteVPSchedule, sigmas_from_scheduler, timestep_sigmas
from .base import (
    AdapterOffNet,
    DistillppPipelineOutput,
    GuidanceDefaults,
    GuidedRun,
    MissingWeightsError,
    WeightsRef,
    check_call_args,
    check_weights,
    ensure_adapter_switchable,
    make_guidance,
    place_teacher_net,
    run_guided,
)
from .presets import Preset, register_family

__all__ = ["DistillppPipeline", "SCHEDULER_SAMPLERS", "check_pair", "student_scheduler", "load_sd_preset"]

# diffusers scheduler class -> distillpp sampler.
SCHEDULER_SAMPLERS = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "LCMScheduler": "consistency",
    "DDIMScheduler": "ddim",
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _config(obj: Any) -> dict[str, Any]:
    cfg = getattr(obj, "config", obj)
    return dict(cfg) if cfg is not None else {}


def _is_sdxl(pipe: Any) -> bool:
    return hasattr(pipe, "text_encoder_2") and hasattr(pipe, "tokenizer_2")


def check_pair(student_unet: Any, teacher_unet: Any, student_prediction: str, teacher_prediction: str) -> None:
    """Raise a ValueError when a student and teacher UNet cannot share latents and conditioning.

    Checks latent channels, text-conditioning width (``cross_attention_dim``: 768 SD1.5, 1024 SD2,
    2048 SDXL), SDXL's added conditioning (``addition_embed_type``, its input width) and the
    prediction types.
    """
    s, t = _config(student_unet), _config(teacher_unet)
    for pred, who in ((student_prediction, "student"), (teacher_prediction, "teacher")):
        if pred not in PREDICTION_TYPES:
            raise ValueError(
                f"{who} prediction_type {pred!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}"
            )
    problems = []
    for key, what in (("in_channels", "latent input channels"), ("out_channels", "latent output channels")):
        if s.get(key) != t.get(key):
            problems.append(f"{what} differ (student {key}={s.get(key)}, teacher {key}={t.get(key)})")
    if s.get("cross_attention_dim") != t.get("cross_attention_dim"):
        problems.append(
            f"text conditioning widths differ (student cross_attention_dim={s.get('cross_attention_dim')}, teacher "
            f"{t.get('cross_attention_dim')}; SD1.5 uses 768, SD2 1024, SDXL 2048)"
        )
    if s.get("addition_embed_type") != t.get("addition_embed_type"):
        problems.append(
            f"added conditioning differs (student addition_embed_type={s.get('addition_embed_type')!r}, teacher "
            f"{t.get('addition_embed_type')!r}; SDXL UNets use 'text_time')"
        )
    elif s.get("addition_embed_type") == "text_time":
        for key in ("projection_class_embeddings_input_dim", "addition_time_embed_dim"):
            if s.get(key) != t.get(key):
                problems.append(
                    f"SDXL added-conditioning sizes differ (student {key}={s.get(key)}, teacher {t.get(key)})"
                )
    if problems:
        raise ValueError(
            "teacher and student are not a matching pair (a teacher must share the student's latent space and text "
            "encoders, e.g. an SDXL teacher for an SDXL student): " + "; ".join(problems)
        )


def _check_scheduler(scheduler: Any) -> str:
    name = type(scheduler).__name__
    if name not in SCHEDULER_SAMPLERS:
        raise ValueError(
            f"student scheduler {name} is not supported; use one of {', '.join(SCHEDULER_SAMPLERS)} "
            "(e.g. pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
            "timestep_spacing='trailing'))"
        )
    cfg = _config(scheduler)
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"):
        if cfg.get(key):
            raise ValueError(f"student scheduler {name} with {key}=True is not supported")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"student scheduler {name} with timestep_type={cfg.get('timestep_type')!r} is not supported")
    if cfg.get("clip_sample") and name in ("DDIMScheduler", "LCMScheduler") or cfg.get("thresholding"):
        warnings.warn(f"{name}: clip_sample/thresholding are ignored; outputs differ from diffusers'", stacklevel=3)
    return SCHEDULER_SAMPLERS[name]


def student_scheduler(preset: Preset, base_scheduler: Any) -> Any:
    """The preset's student scheduler, built from the base pipeline's scheduler config."""
    import diffusers

    cls = getattr(diffusers, preset.scheduler)
    return cls.from_config(_config(base_scheduler), **dict(preset.scheduler_config))


class DistillppPipeline:
    """A few-step SD/SDXL student with inference-time teacher guidance (Distillation++), diffusers style.

    Args:
        student: the student pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) with
            the scheduler it samples with. Its text encoders and VAE serve the teacher too.
        teacher: a ``UNet2DConditionModel`` (or a pipeline, whose ``unet`` and ``scheduler`` are used), or
            ``"adapter-off"``: the student's UNet with its LoRA adapter disabled for the teacher call.
        teacher_scheduler: scheduler (or config) giving the teacher's noise table and prediction type;
            default: the teacher pipeline's, else the student's.
        preset: a :class:`~distillpp.pipelines.presets.Preset` supplying defaults.
        num_inference_steps, timesteps, guidance_scale: student defaults (``guidance_scale`` is diffusers'
            CFG scale; for LCM UNets with ``time_cond_proj_dim`` it feeds the guidance embedding).
        guidance: default teacher-guidance knobs.
        teacher_device: run a separate teacher on this device (e.g. ``"cuda:1"``).
        teacher_offload: ``"cpu"``: keep a separate teacher in CPU memory, copied in for its call.
        unfuse: for ``"adapter-off"`` with a fused LoRA: unfuse it (with a precision warning) instead of
            raising.

    Raises:
        ValueError: mismatched student/teacher, unsupported scheduler or prediction type, a fused or
            missing LoRA with ``"adapter-off"``, invalid placement.
    """

    def __init__(
        self,
        student: Any,
        teacher: Any,
        teacher_scheduler: Any = None,
        *,
        preset: Preset | None = None,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        guidance_scale: float | None = None,
        guidance: GuidanceDefaults | None = None,
        teacher_device: str | torch.device | None = None,
        teacher_offload: str | None = None,
        unfuse: bool = False,
    ):
        if not hasattr(student, "unet") or not hasattr(student, "encode_prompt") or not hasattr(student, "vae"):
            raise ValueError(
                f"student must be a StableDiffusionPipeline or StableDiffusionXLPipeline, got {type(student).__name__}"
            )
        self.student = student
        self.is_sdxl = _is_sdxl(student)
        self.preset = preset
        self.sampler = _check_scheduler(student.scheduler)
        self.num_inference_steps = num_inference_steps or (preset.num_inference_steps if preset else 4)
        self.timesteps = list(timesteps) if timesteps is not None else (
            list(preset.timesteps) if preset and preset.timesteps else None
        )
        unet = student.unet
        self.lcm_embedding_dim = _config(unet).get("time_cond_proj_dim")
        if guidance_scale is None:
            guidance_scale = preset.guidance_scale if preset else (8.0 if self.lcm_embedding_dim else 0.0)
        self.guidance_scale = guidance_scale
        self.guidance = guidance or (preset.guidance if preset else GuidanceDefaults())
        self.teacher_device = teacher_device
        self.teacher_offload = teacher_offload

        self.adapter_off = isinstance(teacher, str)
        if self.adapter_off:
            if teacher != "adapter-off":
                raise ValueError(f"teacher must be a UNet, a pipeline or 'adapter-off', got {teacher!r}")
            if teacher_device is not None or teacher_offload is not None:
                raise ValueError(
                    "teacher='adapter-off' shares the student's UNet; teacher_device/teacher_offload do not apply"
                )
            ensure_adapter_switchable(unet, student, unfuse=unfuse, component="unet")
            self.teacher_unet = unet
        else:
            if hasattr(teacher, "unet"):  # a teacher pipeline
                teacher_scheduler = teacher_scheduler if teacher_scheduler is not None else teacher.scheduler
                teacher = teacher.unet
            if not isinstance(teacher, torch.nn.Module) or not hasattr(teacher, "config"):
                raise ValueError(f"teacher must be a UNet2DConditionModel, got {type(teacher).__name__}")
            self.teacher_unet = teacher
        if teacher_scheduler is None:
            teacher_scheduler = student.scheduler
        tcfg = _config(teacher_scheduler)
        scfg = _config(student.scheduler)
        self.student_prediction = scfg.get("prediction_type", "epsilon")
        self.teacher_prediction = tcfg.get("prediction_type", "epsilon")
        check_pair(unet, self.teacher_unet, self.student_prediction, self.teacher_prediction)
        self.student_schedule = DiscreteVPSchedule.from_config(scfg)
        self.teacher_schedule = DiscreteVPSchedule.from_config(tcfg)
        self._teacher_net: Callable[..., torch.Tensor] | None = None
        self._place_teacher()

    @classmethod
    def from_preset(cls, name: str | Preset, **kwargs: Any) -> "DistillppPipeline":
        """Load an SD1.5/SD2/SDXL preset; see :func:`distillpp.pipelines.from_preset` for the options."""
        from .presets import get_preset

        preset = get_preset(name) if isinstance(name, str) else name
        if preset.family not in ("sd15", "sd2", "sdxl"):
            raise ValueError(f"preset {preset.name!r} is a {preset.family} preset; use distillpp.pipelines.from_preset")
        return load_sd_preset(preset, **kwargs)

    # ----------------------------------------------------------------------------------------
    # Devices.

    @property
    def device(self) -> torch.device:
        """The execution device (the student's)."""
        return self.student._execution_device

    def _place_teacher(self) -> None:
        if self.adapter_off:
            self._teacher_net = AdapterOffNet(unet_fn(self.teacher_unet), self.teacher_unet)
        else:
            self._teacher_net = place_teacher_net(
                unet_fn(self.teacher_unet), self.teacher_unet, self.device, self.teacher_device, self.teacher_offload
            )

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "DistillppPipeline":
        """Move the student pipeline (and a teacher kept beside it) like ``DiffusionPipeline.to``."""
        self.student.to(device=device, dtype=dtype) if dtype is not None else self.student.to(device)
        if not self.adapter_off and self.teacher_offload is None:
            if dtype is not None:
                self.teacher_unet.to(dtype=dtype)
            self._place_teacher()
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """``disable=False`` shows a sampling progress bar (diffusers' method name)."""
        self._progress_disable = kwargs.get("disable", True)

    # ----------------------------------------------------------------------------------------
    # Building blocks of a call.

    def sigmas(self, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """The student's sigma grid, equal to its diffusers scheduler's for the same settings."""
        timesteps = timesteps if timesteps is not None else (self.timesteps if num_inference_steps is None else None)
        if timesteps is not None:
            return timestep_sigmas(self.student_schedule, timesteps)
        return sigmas_from_scheduler(self.student.scheduler, num_inference_steps or self.num_inference_steps)

    def initial_scale(self, sigmas: torch.Tensor) -> float:
        """Factor turning unit noise into the VE sample at ``sigmas[0]``, as the diffusers scheduler starts.

        Euler schedulers start at ``noise * init_noise_sigma`` (``sigma_max`` for linspace/trailing spacing,
        ``sqrt(1 + sigma_max^2)`` otherwise); LCM and DDIM start from VP noise, ``sqrt(1 + sigma_0^2)`` in VE.
        """
        s0 = float(sigmas[0])
        name = type(self.student.scheduler).__name__
        spacing = _config(self.student.scheduler).get("timestep_spacing", "linspace")
        euler = name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
        if euler and spacing in ("linspace", "trailing"):
            return s0
        return math.sqrt(1 + s0**2)

    def student_denoiser(self) -> Callable[..., torch.Tensor]:
        """The student UNet as a denoiser (LCM boundary condition for ``LCMScheduler`` students)."""
        cfg = _config(self.student.scheduler)
        name = type(self.student.scheduler).__name__
        # Off-grid sigmas (Karras, linspace's fractional timesteps) need fractional timesteps.
        quantize = not (cfg.get("use_karras_sigmas") or (
            name.startswith("Euler") and cfg.get("timestep_spacing", "linspace") == "linspace"
        ))
        unet = self.student.unet
        if name == "LCMScheduler":
            inner = LCMDenoiser(
                unet_fn(unet), self.student_schedule, self.student_prediction, quantize=True, dtype=unet.dtype,
                timestep_scaling=cfg.get("timestep_scaling", 10.0),
            )
        else:
            inner = DiscreteVPDenoiser(unet_fn(unet), self.student_schedule, self.student_prediction,
                                       quantize=quantize, dtype=unet.dtype)
        return CFGDenoiser(inner)

    def teacher_denoiser(self) -> Callable[..., torch.Tensor]:
        """The teacher UNet (placed, or adapter-off) as a CFG denoiser."""
        inner = DiscreteVPDenoiser(self._teacher_net, self.teacher_schedule, self.teacher_prediction,
                                   dtype=self.teacher_unet.dtype)
        return CFGDenoiser(inner, scale=self.guidance.teacher_cfg)

    def _encode(
        self, prompt: list[str], negative: list[str] | None, num_images: int, do_cfg: bool, size: tuple[int, int]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(cond, uncond)`` UNet keyword arguments for a batch of prompts (uncond ``None`` without CFG)."""
        pipe, device = self.student, self.device
        if not self.is_sdxl:
            pos, neg = pipe.encode_prompt(prompt, device, num_images, do_cfg, negative_prompt=negative)
            return {"encoder_hidden_states": pos}, ({"encoder_hidden_states": neg} if do_cfg else None)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative,
        )
        h, w = size
        proj = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=pos.dtype, text_encoder_projection_dim=proj)
        time_ids = time_ids.to(device).repeat(pos.shape[0], 1)
        cond = {"encoder_hidden_states": pos, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        if not do_cfg:
            return cond, None
        uncond = {"encoder_hidden_states": neg,
                  "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids.clone()}}
        return cond, uncond

    def decode(self, latents: torch.Tensor, output_type: str = "pil", generator: Any = None) -> tuple[Any, Any]:
        """Latents -> images exactly as the student's diffusers pipeline decodes them."""
        pipe = self.student
        if output_type == "latent":
            return latents, None
        vae = pipe.vae
        if self.is_sdxl:
            needs_upcast = vae.dtype == torch.float16 and _config(vae).get("force_upcast", False)
            if needs_upcast:
                vae.to(dtype=torch.float32)
            vdtype = next(iter(vae.post_quant_conv.parameters())).dtype
            latents = latents.to(vdtype)
            cfg = _config(vae)
            if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
                mean = torch.tensor(cfg["latents_mean"]).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(cfg["latents_std"]).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / cfg["scaling_factor"] + mean
            else:
                latents = latents / cfg["scaling_factor"]
            image = vae.decode(latents, return_dict=False)[0]
            if needs_upcast:
                vae.to(dtype=torch.float16)
            if getattr(pipe, "watermark", None) is not None:
                image = pipe.watermark.apply_watermark(image)
            return pipe.image_processor.postprocess(image, output_type=output_type), None
        latents = latents.to(vae.dtype)
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, self.device, vae.dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm), nsfw

    # ----------------------------------------------------------------------------------------

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
        timesteps: Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        return_dict: bool = True,
    ) -> DistillppPipelineOutput | tuple:
        """Generate images with the student, teacher-guided during its first steps.

        Args:
            prompt: a prompt or a list of prompts.
            negative_prompt: negative prompt(s) for the student's CFG (when ``guidance_scale > 1``) and,
                unless ``teacher_negative_prompt`` is given, for the teacher's CFG.
            num_inference_steps: student steps (default: the preset's).
            generator: one ``torch.Generator`` for the initial noise and every later random draw.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            height, width: image size (default: the preset's, else the UNet's sample size).
            num_images_per_prompt: images per prompt.
            guidance_scale: student CFG scale in diffusers' convention (LCM UNets: guidance embedding).
            strength: teacher weight ``lam`` (constant, per-step list or callable); 0 = the plain student.
            guided_steps: how many leading steps the teacher guides.
            teacher_cfg: the teacher's CFG scale.
            renoise, noise, space, samples: see :class:`distillpp.TeacherGuidance`.
            teacher_negative_prompt: negative prompt(s) for the teacher's CFG only.
            timesteps: explicit student timesteps (e.g. DMD2's ``[999, 749, 499, 249]``).
            latents: initial unit noise ``[B * num_images, C, H / f, W / f]`` instead of drawing it.
            callback: called every step with :func:`distillpp.sample`'s dict (``guidance`` holds a
                :class:`distillpp.GuidanceInfo` on guided steps).
            return_dict: return a :class:`DistillppPipelineOutput` (else a tuple).

        Raises:
            ValueError: invalid arguments, before any model is called.
        """
        pipe = self.student
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a non-empty string or list of strings")

        def as_list(neg: Any, name: str) -> list[str] | None:
            if neg is None:
                return None
            negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(negs) != len(prompts):
                raise ValueError(f"{name} has {len(negs)} entries but prompt has {len(prompts)}")
            return negs

        negs = as_list(negative_prompt, "negative_prompt")
        teacher_negs = as_list(teacher_negative_prompt, "teacher_negative_prompt") or negs
        check_call_args(generator, num_images_per_prompt, output_type)
        factor = pipe.vae_scale_factor
        default_h = self.preset.height if self.preset else pipe.unet.config.sample_size * factor
        default_w = self.preset.width if self.preset else pipe.unet.config.sample_size * factor
        height, width = int(height or default_h), int(width or default_w)
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        guidance_scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)

        if timesteps is None and num_inference_steps is None:
            timesteps = self.timesteps
        sigmas = self.sigmas(num_inference_steps, timesteps)
        guidance = make_guidance(self.guidance, strength, guided_steps, teacher_cfg, renoise, noise, space, samples)
        uses_teacher = any(lam != 0 for lam in guidance.strengths(sigmas))

        # Conditioning: the student's (with CFG or LCM's embedding) and the teacher's (always CFG-ready).
        student_cfg = guidance_scale > 1 and self.lcm_embedding_dim is None
        cond, uncond = self._encode(prompts, negs, num_images_per_prompt, student_cfg, (height, width))
        batch = cond["encoder_hidden_states"].shape[0]
        embeds_dtype = cond["encoder_hidden_states"].dtype
        extra_args: dict[str, Any] = {"cond": dict(cond), "uncond": uncond, "cfg_scale": guidance_scale}
        if self.lcm_embedding_dim is not None:
            emb = lcm_guidance_embedding(guidance_scale - 1, self.lcm_embedding_dim, batch=batch)
            extra_args["cond"]["timestep_cond"] = emb.to(self.device, embeds_dtype)
        teacher_args = None
        if uses_teacher:
            t_cfg = guidance.teacher_cfg if guidance.teacher_cfg is not None else self.guidance.teacher_cfg
            t_uncond = None
            if t_cfg != 1:
                t_uncond = uncond if (student_cfg and teacher_negs == negs) else \
                    self._encode(prompts, teacher_negs, num_images_per_prompt, True, (height, width))[1]
            teacher_args = {"cond": cond, "uncond": t_uncond}

        # Initial noise drawn exactly like the student's diffusers pipeline draws its latents.
        shape = (batch, pipe.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=embeds_dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(self.device, torch.float32) * self.initial_scale(sigmas)

        run = GuidedRun(
            student=self.student_denoiser(), x=x, sigmas=sigmas, sampler=self.sampler,
            teacher=self.teacher_denoiser() if uses_teacher else None, extra_args=extra_args,
            teacher_args=teacher_args,
        )
        out, _ = run_guided(run, guidance if uses_teacher else None, generator=generator, callback=callback,
                            disable=getattr(self, "_progress_disable", True))
        images, nsfw = self.decode(out, output_type, generator)
        if not return_dict:
            return (images,)
        return DistillppPipelineOutput(images=images, nsfw_content_detected=nsfw)


# --------------------------------------------------------------------------------------------
# Loading presets.
# --------------------------------------------------------------------------------------------


def _pipeline_class(family: str) -> Any:
    import diffusers

    return diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline


def _override(ref: WeightsRef, value: str | None) -> WeightsRef:
    """``ref`` with its repo replaced by a local folder/file or another id (keeping the file name if present)."""
    if value is None:
        return ref
    import os

    if os.path.isfile(value):
        return WeightsRef(value, role=ref.role)
    if os.path.isdir(value) and ref.filename and not os.path.exists(os.path.join(value, ref.filename)):
        return WeightsRef(value, role=ref.role)  # a diffusers folder instead of a single file
    return WeightsRef(value, ref.filename, ref.subfolder, ref.role, ref.allow_patterns)


def _from_pretrained(loader: Callable[..., Any], path: str, variant: str | None, **kwargs: Any) -> Any:
    """``loader(path, variant=...)``, falling back to the default weights when the variant is absent."""
    if variant is None:
        return loader(path, **kwargs)
    try:
        return loader(path, variant=variant, **kwargs)
    except (OSError, ValueError):
        return loader(path, **kwargs)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _unet_from_file(like: Any, path: str, dtype: torch.dtype) -> Any:
    """A UNet with ``like``'s config and the state dict in ``path`` (Lightning/DMD2 single files)."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(dict(like.config))
    try:
        unet.load_state_dict(_load_state_dict(path), strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a UNet state dict matching the base UNet config: {str(e)[:500]}") from e
    return unet.to(dtype=dtype)


def load_sd_preset(
    preset: Preset,
    *,
    base: str | None = None,
    student: str | None = None,
    teacher: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    download: bool = False,
    teacher_device: str | torch.device | None = None,
    teacher_offload: str | None = None,
    unfuse: bool = False,
    **pipeline_kwargs: Any,
) -> DistillppPipeline:
    """Load an SD1.5/SD2/SDXL preset (see :func:`distillpp.pipelines.from_preset`).

    Args:
        preset: the preset.
        base, student, teacher: local folders/files or Hugging Face ids overriding the preset's.
        torch_dtype: weights dtype (e.g. ``torch.float16``).
        device: move the pipeline there.
        download: allow downloads (default: local folders and the Hugging Face cache only, so a missing
            model fails at once instead of waiting on the network).
        teacher_device, teacher_offload, unfuse: see :class:`DistillppPipeline`.
        **pipeline_kwargs: passed to the base pipeline's ``from_pretrained`` (e.g. ``safety_checker=None``).

    Raises:
        MissingWeightsError: weights are missing; the message lists them and the download commands.
    """
    import diffusers

    local_only = not download
    weights = f"*/*.{preset.variant}.safetensors" if preset.variant else "*/*.safetensors"
    role = "student pipeline" if preset.student_kind == "pipeline" else "base pipeline (text encoders, VAE, teacher)"
    base_ref = WeightsRef(base or preset.base, role=role, allow_patterns=("*.json", "*.txt", weights))
    refs = [base_ref]
    student_ref = _override(preset.student, student) if preset.student is not None else None
    if student_ref is not None:
        refs.append(student_ref)
    teacher_ref = None
    if preset.teacher not in ("adapter-off", "base") or teacher is not None:
        teacher_ref = WeightsRef(teacher or (preset.base if preset.teacher == "base" else preset.teacher),
                                 role="teacher (its unet/ and scheduler/ folders)",
                                 allow_patterns=("unet/config.json", "unet/*.safetensors", "scheduler/*"))
        if preset.teacher == "adapter-off":
            raise ValueError(f"preset {preset.name} uses the student's own UNet as teacher; teacher= does not apply")
        refs.append(teacher_ref)
    paths = check_weights(refs, local_files_only=local_only, what=f"preset {preset.name!r}")

    common = {"torch_dtype": torch_dtype, "local_files_only": local_only}
    try:
        pipe = _from_pretrained(_pipeline_class(preset.family).from_pretrained, paths[base_ref], preset.variant,
                                **common, **pipeline_kwargs)
        base_scheduler = pipe.scheduler
        teacher_model: Any
        teacher_sched: Any = base_scheduler
        if preset.student_kind == "lora":
            lora_path = paths[student_ref]
            import os

            if os.path.isfile(lora_path):
                pipe.load_lora_weights(os.path.dirname(lora_path), weight_name=os.path.basename(lora_path),
                                       adapter_name="student")
            else:
                pipe.load_lora_weights(lora_path, adapter_name="student")
            if preset.lora_scale != 1.0:
                pipe.set_adapters(["student"], [preset.lora_scale])
            teacher_model = "adapter-off" if teacher_ref is None else None
        elif preset.student_kind == "unet":
            upath = paths[student_ref]
            import os

            if os.path.isfile(upath):
                unet = _unet_from_file(pipe.unet, upath, torch_dtype or pipe.unet.dtype)
            else:
                unet = _from_pretrained(diffusers.UNet2DConditionModel.from_pretrained, upath, preset.variant,
                                        subfolder=student_ref.subfolder, **common)
            teacher_model = pipe.unet if teacher_ref is None else None
            pipe = type(pipe)(**{**pipe.components, "unet": unet})
        else:
            teacher_model = None
        if teacher_model is None:  # a separate teacher repo/folder
            tpath = paths[teacher_ref]
            teacher_model = _from_pretrained(diffusers.UNet2DConditionModel.from_pretrained, tpath, preset.variant,
                                             subfolder="unet", **common)
            teacher_sched = diffusers.DDPMScheduler.load_config(tpath, subfolder="scheduler",
                                                                local_files_only=local_only)
    except MissingWeightsError:
        raise
    except (OSError, EnvironmentError) as e:
        raise MissingWeightsError(
            f"could not load preset {preset.name!r} from {', '.join(paths.values())}: {e}\n"
            "get the weights with:\n" + "\n".join("  " + r.download_command() for r in refs if r.is_hub_id)
        ) from e
    pipe.scheduler = student_scheduler(preset, base_scheduler)
    out = DistillppPipeline(pipe, teacher_model, teacher_sched, preset=preset, unfuse=unfuse,
                            teacher_device=None, teacher_offload=None)
    if device is not None:
        out.to(device)
    if teacher_device is not None or teacher_offload is not None:
        out.teacher_device, out.teacher_offload = teacher_device, teacher_offload
        if out.adapter_off:
            raise ValueError("teacher_device/teacher_offload do not apply to an adapter-off teacher")
        out._place_teacher()
    return out


for _family in ("sd15", "sd2", "sdxl"):
    register_family(_family, load_sd_preset)
