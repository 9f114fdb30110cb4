"""PixArt-alpha and PixArt-Sigma students: a DiT with a T5 text encoder on discrete VP noise.

One model family module: :class:`PixArtFamily` adapts a ``PixArtAlphaPipeline`` or
``PixArtSigmaPipeline`` holding the student transformer (and its scheduler) and a teacher
``PixArtTransformer2DModel`` sharing the student's T5 encoder and VAE. The transformer predicts eps
and a learned variance (``2C`` output channels; the denoiser keeps the first ``C``) and takes its
timestep by keyword; the noise family is the same discrete VP one as SD's, read from the student's
scheduler. With ``strength=0`` a run equals the student's own diffusers pipeline called with
``use_resolution_binning=False`` (we sample the size asked for; bin and resize before if you want
diffusers' aspect-ratio binning).

Presets:

- ``pixart-alpha-lcm``: PixArt-LCM-XL-2-1024-MS (4 consistency steps, no CFG) guided by
  PixArt-XL-2-1024-MS with CFG 4.5 (its pipeline's default scale).
- ``pixart-alpha-dmd-512``: the one-step PixArt-alpha DMD student at 512 px (its model card samples one
  step at timestep 400) guided by PixArt-XL-2-512x512.

Their guidance strengths are the reference settings of the closest SDXL students (LCM, DMD2); they
were not validated on real PixArt weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..denoisers import CFGDenoiser
from ..guidance import TeacherGuidance
from .core import Call, Conditioning, DiffusersFamily, GuidedPipeline, module_dtype
from .noise import VPNoise
from .presets import LoadOptions, Preset, register_family, register_preset
from .weights import WeightsRef, check_weights, from_pretrained_variant, loading_errors

__all__ = ["PixArtFamily", "check_pixart_pair", "load_pixart_preset"]

_SHARED = {
    "in_channels": "latent channels of the shared VAE",
    "patch_size": "patch size",
    "caption_channels": "text-embedding width of the shared T5 encoder",
    "sample_size": "latent size the model was trained at (its micro-conditioning depends on it)",
}


def _learned_sigma(model: Any) -> bool:
    cfg = model.config
    return cfg.get("out_channels") is not None and cfg["out_channels"] == 2 * cfg["in_channels"]


def check_pixart_pair(student: Any, teacher: Any) -> None:
    """Raise a ValueError when a PixArt teacher transformer cannot guide the student's latents and text."""
    for who, model in (("student", student), ("teacher", teacher)):
        if type(model).__name__ != "PixArtTransformer2DModel":
            raise ValueError(f"the {who} must be a PixArtTransformer2DModel, got {type(model).__name__}")
    for key, what in _SHARED.items():
        s, t = student.config.get(key), teacher.config.get(key)
        if s != t:
            raise ValueError(f"teacher transformer {key}={t} differs from the student's {key}={s} ({what})")


class PixArtFamily(DiffusersFamily):
    """A PixArt-alpha/Sigma student pipeline and its teacher transformer.

    Args:
        pipe: the student ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` with the scheduler it samples with.
        teacher: the teacher ``PixArtTransformer2DModel`` (or ``None``).
        teacher_scheduler: scheduler (or config) with the teacher's noise table (default: the student's).
        max_sequence_length: T5 tokens (default: the pipeline's own, 120 for alpha, 300 for Sigma).
    """

    name = "pixart"
    component = "transformer"

    def __init__(self, pipe: Any, teacher: torch.nn.Module | None, teacher_scheduler: Any = None,
                 max_sequence_length: int | None = None):
        if type(getattr(pipe, "transformer", None)).__name__ != "PixArtTransformer2DModel":
            raise ValueError(f"pipe must be a PixArtAlphaPipeline or PixArtSigmaPipeline, got {type(pipe).__name__}")
        self.owner = pipe
        self.student_module = pipe.transformer
        self.teacher_module = teacher
        self.teacher_kind = "separate" if teacher is not None else "none"
        self.noise = VPNoise.from_scheduler(pipe.scheduler)
        self.teacher_noise = VPNoise.teacher_table(
            teacher_scheduler.config if hasattr(teacher_scheduler, "config") else (teacher_scheduler or
                                                                                   pipe.scheduler.config))
        if max_sequence_length is None:
            max_sequence_length = 300 if type(pipe).__name__ == "PixArtSigmaPipeline" else 120
        self.options = {"max_sequence_length": max_sequence_length}
        self.size_multiple = pipe.vae_scale_factor * self.student_module.config.patch_size

    def check_pair(self) -> None:
        if self.teacher_module is not None:
            check_pixart_pair(self.student_module, self.teacher_module)

    def default_size(self) -> tuple[int, int]:
        side = self.student_module.config.sample_size * self.owner.vae_scale_factor
        return side, side

    def default_guidance_scale(self) -> float:
        return 4.5  # PixArt pipelines' default

    def default_guidance(self) -> TeacherGuidance:
        return TeacherGuidance(strength=0.05, guided_steps=1, space="x0", teacher_cfg=4.5)

    def _micro(self, call: Call, batch: int, dtype: torch.dtype) -> dict[str, Any]:
        """PixArt's 1024 px micro-conditioning (image size and aspect ratio); ``None`` at other sizes."""
        if self.student_module.config.sample_size != 128:
            return {"resolution": None, "aspect_ratio": None}
        res = torch.tensor([call.height, call.width]).repeat(batch, 1).to(self.device, dtype)
        ratio = torch.tensor([float(call.height / call.width)]).repeat(batch, 1).to(self.device, dtype)
        return {"resolution": res, "aspect_ratio": ratio}

    def encode(self, call: Call, student_cfg: bool, teacher: bool) -> Conditioning:
        def encode(negative: list[str] | None, with_uncond: bool) -> tuple[dict, dict | None]:
            e, mask, ne, nmask = self.owner.encode_prompt(
                call.prompts, do_classifier_free_guidance=with_uncond,
                negative_prompt=negative if negative is not None else "",
                num_images_per_prompt=call.num_images_per_prompt,
                device=self.device, clean_caption=False, max_sequence_length=call.options["max_sequence_length"])
            micro = self._micro(call, e.shape[0], e.dtype)
            c = {"encoder_hidden_states": e, "encoder_attention_mask": mask, "added_cond_kwargs": micro}
            u = {"encoder_hidden_states": ne, "encoder_attention_mask": nmask, "added_cond_kwargs": dict(micro)}
            return c, (u if with_uncond else None)

        return self.cfg_conditioning(call, student_cfg, teacher, encode)

    def student_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        inner = self.noise.denoiser(net, module_dtype(self.student_module),
                                    learned_sigma=_learned_sigma(self.student_module))
        return CFGDenoiser(inner, call.guidance_scale)

    def teacher_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        inner = self.teacher_noise.teacher_denoiser(net, module_dtype(self.teacher_module),
                                                    learned_sigma=_learned_sigma(self.teacher_module))
        return CFGDenoiser(inner, call.state["teacher_cfg"])

    def decode(self, latents: torch.Tensor, call: Call) -> tuple[Any, Any]:
        if call.output_type == "latent":
            return latents, None
        vae = self.owner.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.owner.image_processor.postprocess(image, output_type=call.output_type), None


def load_pixart_preset(preset: Preset, opts: LoadOptions, **pipeline_kwargs: Any) -> GuidedPipeline:
    """Load a PixArt preset: the student pipeline and only the teacher's transformer (and scheduler config).

    Args:
        preset: a ``pixart`` preset.
        opts: the :class:`~distillpp.pipelines.presets.LoadOptions`; ``base`` or ``student`` name the student
            pipeline, ``teacher`` the teacher pipeline (its ``transformer``/``scheduler`` subfolders are read).
        **pipeline_kwargs: passed to the student pipeline's ``from_pretrained``.

    Raises:
        MissingWeightsError: weights are missing (the message lists them and how to get them).
    """
    import diffusers

    files = ("model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "transformer/*", "vae/*")
    refs = [WeightsRef(opts.student or opts.base or preset.base, role="student pipeline", allow_patterns=files),
            WeightsRef(opts.teacher or preset.teacher, role="teacher transformer",
                       allow_patterns=("transformer/*", "scheduler/*"))]
    paths = check_weights(refs, local_files_only=not opts.download, what=f"preset {preset.name!r}")
    with loading_errors(f"preset {preset.name!r}", paths.values(), refs):
        pipe = from_pretrained_variant(diffusers.DiffusionPipeline.from_pretrained, paths[refs[0]], preset.variant,
                                       dtype=opts.torch_dtype, local_files_only=not opts.download, **pipeline_kwargs)
        teacher_model = diffusers.PixArtTransformer2DModel.from_pretrained(
            paths[refs[1]], subfolder="transformer", dtype=opts.torch_dtype, local_files_only=not opts.download)
        teacher_sched = diffusers.DDPMScheduler.load_config(paths[refs[1]], subfolder="scheduler",
                                                            local_files_only=not opts.download)
    import diffusers as d

    pipe.scheduler = getattr(d, preset.scheduler).from_config(pipe.scheduler.config, **dict(preset.scheduler_config))
    if opts.device is not None:
        pipe.to(opts.device)
        if opts.teacher_device is None and opts.teacher_offload is None:
            teacher_model.to(opts.device)
    return GuidedPipeline(PixArtFamily(pipe, teacher_model, teacher_sched), preset=preset,
                          teacher_device=opts.teacher_device, teacher_offload=opts.teacher_offload,
                          compile=opts.compile)


register_family("pixart", load_pixart_preset)

register_preset(Preset(
    name="pixart-alpha-lcm", family="pixart", base="PixArt-alpha/PixArt-LCM-XL-2-1024-MS", student_kind="pipeline",
    student=None, teacher="PixArt-alpha/PixArt-XL-2-1024-MS", scheduler="LCMScheduler", num_inference_steps=4,
    guidance_scale=0.0, guidance=TeacherGuidance(strength=0.01, guided_steps=1, space="eps", teacher_cfg=4.5),
    height=1024, width=1024, variant=None,
    notes="PixArt-LCM (4 steps, no CFG) guided by PixArt-alpha 1024 with CFG 4.5; strength from the SDXL LCM "
          "reference row, unvalidated on PixArt weights.",
))
register_preset(Preset(
    name="pixart-alpha-dmd-512", family="pixart", base="PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",
    student_kind="pipeline", student=None, teacher="PixArt-alpha/PixArt-XL-2-512x512", scheduler="LCMScheduler",
    num_inference_steps=1, timesteps=(400,), guidance_scale=0.0,
    guidance=TeacherGuidance(strength=0.01, guided_steps=1, space="eps", teacher_cfg=4.5), height=512, width=512,
    variant=None,
    notes="One-step PixArt-alpha DMD student (model card: one step at timestep 400) guided by PixArt-alpha 512 "
          "with CFG 4.5; strength from the SDXL DMD2 reference row, unvalidated on PixArt weights.",
))
