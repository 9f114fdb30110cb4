"""SD1.5 / SD2 / SDXL students and teachers on diffusers: the UNet model family and its presets.

:class:`SDFamily` adapts a loaded student pipeline (``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``, with the student's UNet and scheduler) and a teacher: another UNet
sharing the student's text encoders and VAE, or ``"adapter-off"`` for LoRA students (the student's
own UNet with the adapter switched off for the teacher call). The student's scheduler is read once
through :mod:`distillpp.diffusers_schedulers` into explicit sigmas, a sampler and a denoiser; prompts
are encoded and latents decoded by the student pipeline's own methods, so ``strength=0`` reproduces
the student's diffusers pipeline. :class:`DistillppPipeline` is the :class:`GuidedPipeline` over it.

Known differences from diffusers, all outside the presets: DDIM with ``n`` steps that do not divide
1000 (diffusers steps to ``t - 1000 // n``, one timestep off its own grid); ``clip_sample`` /
``thresholding`` (ignored, with a warning); fp16 students (our sampler state stays float32, diffusers'
is fp16, so images differ by fp16 rounding).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ..accel import host_to_device
from ..denoisers import CFGDenoiser, lcm_guidance_embedding, unet_fn
from ..diffusers_schedulers import SCHEDULERS, scheduler_config
from ..guidance import TeacherGuidance
from .core import Call, Conditioning, DiffusersFamily, GuidedPipeline, module_dtype
from .noise import VPNoise, _check_prediction
from .presets import LoadOptions, Preset, register_family, register_preset
from .weights import (
    WeightsRef,
    check_weights,
    from_pretrained_variant,
    load_state_dict_file,
    loading_errors,
    override_ref,
)

__all__ = ["SDFamily", "DistillppPipeline", "SCHEDULER_SAMPLERS", "check_pair", "student_scheduler", "load_sd_preset"]

# diffusers scheduler class -> distillpp sampler, for the discrete VP schedulers of the registry.
SCHEDULER_SAMPLERS = {name: rule.sampler for name, rule in SCHEDULERS.items() if rule.noise == "vp"}


def check_pair(student_unet: Any, teacher_unet: Any, student_prediction: str, teacher_prediction: str) -> None:
    """Raise a ValueError when a student and teacher UNet cannot share latents and conditioning.

    Checks latent channels, text-conditioning width (``cross_attention_dim``: 768 SD1.5, 1024 SD2,
    2048 SDXL), SDXL's added conditioning (``addition_embed_type``, its input width) and the
    prediction types.
    """
    s, t = scheduler_config(student_unet), scheduler_config(teacher_unet)  # objects or config mappings
    _check_prediction(student_prediction, "student")
    _check_prediction(teacher_prediction, "teacher")
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


def student_scheduler(preset: Preset, base_scheduler: Any) -> Any:
    """The preset's student scheduler, built from the base pipeline's scheduler config."""
    import diffusers

    cls = getattr(diffusers, preset.scheduler)
    return cls.from_config(scheduler_config(base_scheduler), **dict(preset.scheduler_config))


class SDFamily(DiffusersFamily):
    """An SD1.5/SD2/SDXL student pipeline and its teacher UNet.

    Args:
        student: the student pipeline with the scheduler it samples with.
        teacher: a ``UNet2DConditionModel`` (or a pipeline, whose ``unet`` and ``scheduler`` are used), or
            ``"adapter-off"``: the student's UNet with its LoRA adapter disabled for the teacher call.
        teacher_scheduler: scheduler (or config) giving the teacher's noise table and prediction type;
            default: the teacher pipeline's, else the student's.
        unfuse: for ``"adapter-off"`` with a fused LoRA: unfuse it (with a precision warning).
        eta: default stochasticity of the scheduler's step (diffusers' ``eta``: DDIM's eta, TCD's gamma);
            ``None``: diffusers' default (0). Also a per-call option.
    """

    def __init__(self, student: Any, teacher: Any, teacher_scheduler: Any = None, unfuse: bool = False,
                 eta: float | None = None):
        if not all(hasattr(student, a) for a in ("unet", "encode_prompt", "vae", "scheduler")):
            raise ValueError(
                f"student must be a StableDiffusionPipeline or StableDiffusionXLPipeline, got {type(student).__name__}"
            )
        self.owner = student
        self.unfuse = unfuse
        self.options = {"eta": eta}
        self.is_sdxl = hasattr(student, "text_encoder_2") and hasattr(student, "tokenizer_2")
        self.name = "sdxl" if self.is_sdxl else "sd"
        self.size_multiple = student.vae_scale_factor
        self.student_module = student.unet
        self.noise = VPNoise.from_scheduler(student.scheduler)
        self.noise.rule.warn_ignored_options(self.noise.config)
        self.lcm_embedding_dim = student.unet.config.get("time_cond_proj_dim")
        if isinstance(teacher, str):
            if teacher != "adapter-off":
                raise ValueError(f"teacher must be a UNet, a pipeline or 'adapter-off', got {teacher!r}")
            self.teacher_kind, self.teacher_module = "adapter-off", student.unet
        else:
            if hasattr(teacher, "unet"):  # a teacher pipeline
                teacher_scheduler = teacher_scheduler if teacher_scheduler is not None else teacher.scheduler
                teacher = teacher.unet
            if not isinstance(teacher, torch.nn.Module) or not hasattr(teacher, "config"):
                raise ValueError(f"teacher must be a UNet2DConditionModel, got {type(teacher).__name__}")
            self.teacher_kind, self.teacher_module = "separate", teacher
        self.teacher_noise = VPNoise.teacher_table(scheduler_config(teacher_scheduler if teacher_scheduler is not None
                                                           else student.scheduler))

    def network(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        return unet_fn(module)

    def check_pair(self) -> None:
        check_pair(self.student_module, self.teacher_module, self.noise.prediction, self.teacher_noise.prediction)

    def default_size(self) -> tuple[int, int]:
        side = self.student_module.config.sample_size * self.owner.vae_scale_factor
        return side, side

    def default_guidance_scale(self) -> float:
        return 8.0 if self.lcm_embedding_dim else 0.0

    def default_guidance(self) -> TeacherGuidance:
        return _EULER_X0

    def student_uses_cfg(self, call: Call) -> bool:
        return call.guidance_scale > 1 and self.lcm_embedding_dim is None

    def sampler(self, call: Call) -> tuple[str, dict[str, Any]]:
        """The scheduler's sampler, with diffusers' ``eta`` where the step has one (DDIM, TCD's gamma)."""
        name, kwargs = super().sampler(call)
        return name, {**kwargs, **self.noise.rule.eta_kwargs(call.options.get("eta"))}

    def _encode(self, call: Call, negative: list[str] | None, do_cfg: bool) -> tuple[dict, dict | None]:
        """``(cond, uncond)`` UNet keyword arguments for the batch (uncond ``None`` without CFG)."""
        pipe, device, n = self.owner, self.device, call.num_images_per_prompt
        if not self.is_sdxl:
            pos, neg = pipe.encode_prompt(call.prompts, device, n, do_cfg, negative_prompt=negative)
            return {"encoder_hidden_states": pos}, ({"encoder_hidden_states": neg} if do_cfg else None)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=call.prompts, device=device, num_images_per_prompt=n, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative,
        )
        size = (call.height, call.width)
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pos.dtype, text_encoder_projection_dim=proj)
        time_ids = host_to_device(time_ids, device).repeat(pos.shape[0], 1)  # no wait for the encoders' GPU work
        cond = {"encoder_hidden_states": pos, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        if not do_cfg:
            return cond, None
        return cond, {"encoder_hidden_states": neg,
                      "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids.clone()}}

    def encode(self, call: Call, student_cfg: bool, teacher: bool) -> Conditioning:
        teacher_uncond = teacher and call.state["teacher_cfg"] != 1
        same_negative = call.teacher_negative is None or call.teacher_negative == call.negative
        # One text-encoder pass gives both when only the teacher needs the negative (~20 ms each on a GPU).
        cond, uncond = self._encode(call, call.negative, student_cfg or (teacher_uncond and same_negative))
        emb_dtype = cond["encoder_hidden_states"].dtype
        student: dict[str, Any] = {"cond": dict(cond), "uncond": uncond if student_cfg else None,
                                   "cfg_scale": call.guidance_scale}
        if self.lcm_embedding_dim is not None:
            emb = lcm_guidance_embedding(call.guidance_scale - 1, self.lcm_embedding_dim, batch=call.batch)
            student["cond"]["timestep_cond"] = host_to_device(emb.to(emb_dtype), self.device)
        if not teacher:
            return Conditioning(student)
        t_uncond = None
        if teacher_uncond:
            t_uncond = uncond if same_negative else self._encode(call, call.teacher_negative, True)[1]
        return Conditioning(student, {"cond": cond, "uncond": t_uncond})

    def student_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        return CFGDenoiser(self.noise.denoiser(net, module_dtype(self.student_module)))

    def teacher_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        return CFGDenoiser(self.teacher_noise.teacher_denoiser(net, module_dtype(self.teacher_module)),
                           scale=call.state["teacher_cfg"])

    def decode(self, latents: torch.Tensor, call: Call) -> tuple[Any, Any]:
        """Latents -> images exactly as the student's diffusers pipeline decodes them."""
        pipe = self.owner
        if call.output_type == "latent":
            return latents, None
        vae = pipe.vae
        if self.is_sdxl:
            needs_upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
            if needs_upcast:
                vae.to(dtype=torch.float32)
            vdtype = next(iter(vae.post_quant_conv.parameters())).dtype
            latents = latents.to(vdtype)
            cfg = vae.config
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
            return pipe.image_processor.postprocess(image, output_type=call.output_type), None
        latents = latents.to(vae.dtype)
        generator = call.generator if isinstance(call.generator, torch.Generator) else None
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, self.device, vae.dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        return pipe.image_processor.postprocess(image, output_type=call.output_type, do_denormalize=denorm), nsfw


class DistillppPipeline(GuidedPipeline):
    """The guided pipeline of an SD1.5/SD2/SDXL student (see :class:`SDFamily` for the arguments).

    Args:
        student: the student pipeline with the scheduler it samples with.
        teacher: a teacher UNet or pipeline, or ``"adapter-off"`` for LoRA students.
        teacher_scheduler: the teacher's scheduler (noise table, prediction type).
        unfuse: unfuse a fused LoRA (``"adapter-off"``) instead of raising.
        eta: default ``eta`` of the scheduler's step (DDIM, TCD's gamma); per call as ``eta=``.
        **kwargs: :class:`GuidedPipeline` options (``preset``, ``guidance``, ``num_inference_steps``,
            ``timesteps``, ``guidance_scale``, ``teacher_device``, ``teacher_offload``, ``compile``).
    """

    def __init__(self, student: Any, teacher: Any, teacher_scheduler: Any = None, *, unfuse: bool = False,
                 eta: float | None = None, **kwargs: Any):
        super().__init__(SDFamily(student, teacher, teacher_scheduler, unfuse=unfuse, eta=eta), **kwargs)

    preset_families = ("sd15", "sd2", "sdxl")


# --------------------------------------------------------------------------------------------
# Loading presets.
# --------------------------------------------------------------------------------------------

SD_FAMILIES = ("sd15", "sd2", "sdxl")


def _unet_from_file(like: Any, path: str, dtype: torch.dtype) -> Any:
    """A UNet with ``like``'s config and the state dict in ``path`` (Lightning/DMD2 single files)."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(dict(like.config))
    try:
        unet.load_state_dict(load_state_dict_file(path), strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a UNet state dict matching the base UNet config: {str(e)[:500]}") from e
    return unet.to(dtype=dtype)


def load_sd_preset(preset: Preset, opts: LoadOptions, unfuse: bool = False,
                   **pipeline_kwargs: Any) -> DistillppPipeline:
    """Load an SD1.5/SD2/SDXL preset (see :func:`distillpp.pipelines.from_preset`).

    Args:
        preset: the preset.
        opts: the :class:`~distillpp.pipelines.presets.LoadOptions` (weights overrides, dtype, device,
            downloads, teacher placement, compile).
        unfuse: see :class:`DistillppPipeline`.
        **pipeline_kwargs: passed to the base pipeline's ``from_pretrained`` (e.g. ``safety_checker=None``).

    Raises:
        MissingWeightsError: weights are missing; the message lists them and the download commands.
    """
    import diffusers

    if preset.teacher == "adapter-off" and opts.teacher is not None:
        raise ValueError(f"preset {preset.name} uses the student's own UNet as teacher; teacher= does not apply")
    local_only = not opts.download
    weights = f"*/*.{preset.variant}.safetensors" if preset.variant else "*/*.safetensors"
    role = "student pipeline" if preset.student_kind == "pipeline" else "base pipeline (text encoders, VAE, teacher)"
    base_ref = WeightsRef(opts.base or preset.base, role=role, allow_patterns=("*.json", "*.txt", weights))
    refs = [base_ref]
    student_ref = override_ref(preset.student, opts.student) if preset.student is not None else None
    if student_ref is not None:
        refs.append(student_ref)
    teacher_ref = None
    if preset.teacher not in ("adapter-off", "base") or opts.teacher is not None:
        teacher_ref = WeightsRef(opts.teacher or (preset.base if preset.teacher == "base" else preset.teacher),
                                 role="teacher (its unet/ and scheduler/ folders)",
                                 allow_patterns=("unet/config.json", "unet/*.safetensors", "scheduler/*"))
        refs.append(teacher_ref)
    paths = check_weights(refs, local_files_only=local_only, what=f"preset {preset.name!r}")

    common = {"dtype": opts.torch_dtype, "local_files_only": local_only}
    with loading_errors(f"preset {preset.name!r}", paths.values(), refs):
        pipe = from_pretrained_variant(_pipeline_class(preset.family).from_pretrained, paths[base_ref],
                                       preset.variant, **common, **pipeline_kwargs)
        base_scheduler = pipe.scheduler
        teacher_model: Any = None
        teacher_sched: Any = base_scheduler
        if preset.student_kind == "lora":
            lora_path = paths[student_ref]
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
            if os.path.isfile(upath):
                unet = _unet_from_file(pipe.unet, upath, opts.torch_dtype or pipe.unet.dtype)
            else:
                unet = from_pretrained_variant(diffusers.UNet2DConditionModel.from_pretrained, upath, preset.variant,
                                               subfolder=student_ref.subfolder, **common)
            teacher_model = pipe.unet if teacher_ref is None else None
            pipe = type(pipe)(**{**pipe.components, "unet": unet})
        if teacher_model is None:  # a separate teacher repo/folder
            tpath = paths[teacher_ref]
            teacher_model = from_pretrained_variant(diffusers.UNet2DConditionModel.from_pretrained, tpath,
                                                    preset.variant, subfolder="unet", **common)
            teacher_sched = diffusers.DDPMScheduler.load_config(tpath, subfolder="scheduler",
                                                                local_files_only=local_only)
    pipe.scheduler = student_scheduler(preset, base_scheduler)
    if opts.device is not None:
        pipe.to(opts.device)
        if not isinstance(teacher_model, str) and opts.teacher_device is None and opts.teacher_offload is None:
            teacher_model.to(opts.device)
    return DistillppPipeline(pipe, teacher_model, teacher_sched, preset=preset, unfuse=unfuse,
                             eta=preset.extra.get("eta"),
                             teacher_device=opts.teacher_device, teacher_offload=opts.teacher_offload,
                             compile=opts.compile)


def _pipeline_class(family: str) -> Any:
    import diffusers

    return diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline


for _family in SD_FAMILIES:
    register_family(_family, load_sd_preset)
del _family

# --------------------------------------------------------------------------------------------
# Presets. Guidance defaults are the reference settings (docs/method.md); unvalidated on real weights.
# --------------------------------------------------------------------------------------------

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_TRAILING = {"timestep_spacing": "trailing"}

# LCM (SDXL): consistency, lam 0.01 in eps space, 1-2 guided steps, teacher CFG 8.
_LCM = TeacherGuidance(strength=0.01, guided_steps=1, space="eps", teacher_cfg=8.0)
# LCM-LoRA: lam 0.01-0.02 in eps space, 1 guided step, teacher CFG 3-8.
_LCM_LORA = TeacherGuidance(strength=0.02, guided_steps=1, space="eps", teacher_cfg=7.5)
# DMD2: lam 0.01 in eps space, 2 guided steps, teacher CFG 7.5.
_DMD2 = TeacherGuidance(strength=0.01, guided_steps=2, space="eps", teacher_cfg=7.5)
# SDXL-Lightning / Turbo: Euler (ancestral), lam 0.03-0.1 in x0 space, 1-2 guided steps, CFG 7.5.
_EULER_X0 = TeacherGuidance(strength=0.05, guided_steps=1, space="x0", teacher_cfg=7.5)

register_preset(Preset(
    name="sd15-lcm", family="sd15", base="SimianLuo/LCM_Dreamshaper_v7", student_kind="pipeline", student=None,
    teacher="Lykon/dreamshaper-7", scheduler="LCMScheduler", num_inference_steps=4, guidance_scale=8.0,
    guidance=_LCM, height=512, width=512, variant=None,
    notes="LCM distilled from Dreamshaper v7 (the LCM paper's SD1.5 model); guidance values from the SDXL LCM row.",
))
register_preset(Preset(
    name="sdxl-lcm", family="sdxl", base=SDXL_BASE, student_kind="unet",
    student=WeightsRef("latent-consistency/lcm-sdxl", role="student UNet",
                       allow_patterns=("config.json", "*.fp16.safetensors")),
    teacher="base", scheduler="LCMScheduler", num_inference_steps=4, guidance_scale=8.0, guidance=_LCM,
    notes="Reference settings, LCM (SDXL) row.",
))
register_preset(Preset(
    name="sd15-lcm-lora", family="sd15", base=SD15_BASE, student_kind="lora",
    student=WeightsRef("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors", role="student LoRA"),
    teacher="adapter-off", scheduler="LCMScheduler", num_inference_steps=4, guidance_scale=1.0,
    guidance=_LCM_LORA, height=512, width=512, variant=None,
    notes="Reference settings, LCM-LoRA row (SDXL values reused for SD1.5).",
))
register_preset(Preset(
    name="sdxl-lcm-lora", family="sdxl", base=SDXL_BASE, student_kind="lora",
    student=WeightsRef("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors", role="student LoRA"),
    teacher="adapter-off", scheduler="LCMScheduler", num_inference_steps=4, guidance_scale=1.0,
    guidance=_LCM_LORA, notes="Reference settings, LCM-LoRA (SDXL) row.",
))
for _n in (2, 4, 8):
    register_preset(Preset(
        name=f"sdxl-lightning-{_n}step", family="sdxl", base=SDXL_BASE, student_kind="unet",
        student=WeightsRef("ByteDance/SDXL-Lightning", f"sdxl_lightning_{_n}step_unet.safetensors",
                           role="student UNet"),
        teacher="base", scheduler="EulerDiscreteScheduler", scheduler_config=_TRAILING, num_inference_steps=_n,
        guidance_scale=0.0, guidance=_EULER_X0, notes="Reference settings, SDXL-Lightning row; Euler, trailing.",
    ))
    register_preset(Preset(
        name=f"sdxl-lightning-{_n}step-lora", family="sdxl", base=SDXL_BASE, student_kind="lora",
        student=WeightsRef("ByteDance/SDXL-Lightning", f"sdxl_lightning_{_n}step_lora.safetensors",
                           role="student LoRA"),
        teacher="adapter-off", scheduler="EulerDiscreteScheduler", scheduler_config=_TRAILING,
        num_inference_steps=_n, guidance_scale=0.0, guidance=_EULER_X0,
        notes="Reference settings, SDXL-Lightning LoRA row; Euler, trailing.",
    ))
register_preset(Preset(
    name="sdxl-dmd2-4step", family="sdxl", base=SDXL_BASE, student_kind="unet",
    student=WeightsRef("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin", role="student UNet"),
    teacher="base", scheduler="LCMScheduler", num_inference_steps=4, timesteps=(999, 749, 499, 249),
    guidance_scale=0.0, guidance=_DMD2, notes="Reference settings, DMD2 row; multistep consistency at 999/749/499/249.",
))
register_preset(Preset(
    name="sdxl-dmd2-4step-lora", family="sdxl", base=SDXL_BASE, student_kind="lora",
    student=WeightsRef("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors", role="student LoRA"),
    teacher="adapter-off", scheduler="LCMScheduler", num_inference_steps=4, timesteps=(999, 749, 499, 249),
    guidance_scale=0.0, guidance=_DMD2, notes="Reference settings, DMD2 row (LoRA variant).",
))
register_preset(Preset(
    name="sdxl-turbo", family="sdxl", base="stabilityai/sdxl-turbo", student_kind="pipeline", student=None,
    teacher=SDXL_BASE, scheduler="EulerAncestralDiscreteScheduler", scheduler_config=_TRAILING,
    num_inference_steps=4, guidance_scale=0.0, guidance=_EULER_X0, height=512, width=512,
    notes="Reference settings, SDXL-Turbo row; Euler ancestral, trailing, 512px like the student.",
))
register_preset(Preset(
    name="sd-turbo", family="sd2", base="stabilityai/sd-turbo", student_kind="pipeline", student=None,
    teacher="stabilityai/stable-diffusion-2-1-base", scheduler="EulerAncestralDiscreteScheduler",
    scheduler_config=_TRAILING, num_inference_steps=4, guidance_scale=0.0, guidance=_EULER_X0, height=512,
    width=512, notes="SDXL-Turbo row of the reference settings reused; SD-Turbo is distilled from SD 2.1; the 512px "
    "epsilon-prediction base is the teacher (teacher='stabilityai/stable-diffusion-2-1': the 768px v-prediction one).",
))
for _n in (4, 8):
    register_preset(Preset(
        name=f"sdxl-hyper-sd-{_n}step-lora", family="sdxl", base=SDXL_BASE, student_kind="lora",
        student=WeightsRef("ByteDance/Hyper-SD", f"Hyper-SDXL-{_n}steps-lora.safetensors", role="student LoRA"),
        teacher="adapter-off", scheduler="DDIMScheduler",
        # Hyper-SD samples with DDIM "trailing"; set_alpha_to_one lands the last step on sigma 0 and
        # latents are not clipped (DDIMScheduler's default clip_sample=True is for pixel models).
        scheduler_config={"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False},
        num_inference_steps=_n, guidance_scale=0.0, guidance=_EULER_X0,
        notes="Not in the reference code: DDIM is Euler in VE coordinates, so the Lightning row's values are used.",
    ))
del _n
register_preset(Preset(
    name="sdxl-hyper-sd-1step-lora", family="sdxl", base=SDXL_BASE, student_kind="lora",
    student=WeightsRef("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors", role="student LoRA"),
    teacher="adapter-off", scheduler="TCDScheduler", num_inference_steps=1, guidance_scale=0.0,
    guidance=_EULER_X0, extra={"eta": 1.0},
    notes="Hyper-SD's one-step LoRA with the TCD scheduler and eta 1.0, as its authors recommend; guidance values "
          "borrowed from the Lightning row (not in the reference code).",
))
