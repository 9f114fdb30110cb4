"""The Fashion-MNIST zoo as a model family: class names as prompts, offline, through the one pipeline.

Presets ``zoo-lcm``, ``zoo-pd`` and ``zoo-flow-student`` are the shipped students with their teachers
(:mod:`distillpp.zoo`); ``zoo-teacher`` and ``zoo-flow-teacher`` run a teacher alone with its own
many-step sampler. Prompts are class names (``"Sneaker"``, case-insensitive) or digits ``"0"``..``"9"``.
Images are 28 x 28 grayscale, the 32 x 32 samples with their 2-pixel padding cropped.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import torch

from .. import zoo
from ..denoisers import CFGDenoiser, unet_fn
from ..diffusers_schedulers import scheduler_rule
from ..guidance import TeacherGuidance
from .core import Call, Conditioning, GuidedPipeline, ModelFamily, module_dtype
from .noise import FlowNoise, VPNoise
from .presets import LoadOptions, Preset, register_family, register_preset

__all__ = ["ZooFamily", "load_zoo_preset", "class_label"]

_BY_NAME = {name.lower(): i for i, name in enumerate(zoo.CLASS_NAMES)}


def class_label(prompt: str) -> int:
    """The Fashion-MNIST label of a class name (case-insensitive) or a digit string.

    Raises:
        ValueError: not a class of the zoo (the message lists them).
    """
    text = prompt.strip()
    if text.isdigit() and 0 <= int(text) < len(zoo.CLASS_NAMES):
        return int(text)
    if text.lower() in _BY_NAME:
        return _BY_NAME[text.lower()]
    raise ValueError(f"prompt {prompt!r} is not a Fashion-MNIST class; use one of "
                     f"{', '.join(repr(c) for c in zoo.CLASS_NAMES)} or a digit 0-9")


def _noise(model: zoo.ZooModel, models_dir: Any) -> Any:
    """The noise family of a zoo model: DDIM-trailing or LCM (VP), or uniform flow time."""
    if model.family == "flow":
        return FlowNoise(grid=zoo.flow_grid, timestep_scale=1000.0)
    # clip_sample is applied by the family's CFGDenoiser (model.clip), so the rule need not warn about it.
    config = {**json.loads((zoo.model_dir(model.name, models_dir) / "scheduler_config.json").read_text()),
              "clip_sample": False}
    if model.grid == "lcm":
        return VPNoise(scheduler_rule("LCMScheduler"), config)
    return VPNoise(scheduler_rule("DDIMScheduler"), {**config, "timestep_spacing": "trailing"})


class ZooFamily(ModelFamily):
    """A zoo student (or teacher alone) and its teacher.

    Args:
        student: a loaded :class:`distillpp.zoo.ZooModel`.
        teacher: its teacher, or ``None``.
        models_dir: folder of the zoo models (default: the package's).
    """

    name = "zoo"
    size_multiple = 28
    component = "net"

    def __init__(self, student: zoo.ZooModel, teacher: zoo.ZooModel | None = None, models_dir: Any = None):
        self.student = student
        self.teacher = teacher
        self.student_module = student.net
        self.teacher_module = teacher.net if teacher is not None else None
        self.teacher_kind = "separate" if teacher is not None else "none"
        self.noise = _noise(student, models_dir)
        self.teacher_noise = _noise(teacher, models_dir) if teacher is not None else None

    def network(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        return unet_fn(module)

    def check_pair(self) -> None:
        if self.teacher is not None and self.teacher.family != self.student.family:
            raise ValueError(f"zoo teacher {self.teacher.name!r} is a {self.teacher.family} model but the student "
                             f"{self.student.name!r} is {self.student.family}; pair VP with VP and flow with flow")

    def default_size(self) -> tuple[int, int]:
        return 28, 28

    def default_guidance_scale(self) -> float:
        return self.student.default_cfg

    def check_options(self, call: Call) -> None:
        if (call.height, call.width) != (28, 28):
            raise ValueError(f"height and width must be 28 for the Fashion-MNIST zoo, got {call.height}x{call.width}")
        if call.negative is not None or call.teacher_negative is not None:
            raise ValueError("negative_prompt does not apply to the zoo (its CFG is against the null class)")
        for p in call.prompts:
            class_label(p)

    def student_uses_cfg(self, call: Call) -> bool:
        return call.guidance_scale != 1

    def labels(self, call: Call) -> torch.Tensor:
        y = torch.tensor([class_label(p) for p in call.prompts], device=self.device)
        return y.repeat_interleave(call.num_images_per_prompt)

    def encode(self, call: Call, student_cfg: bool, teacher: bool) -> Conditioning:
        y = self.labels(call)
        cond = {"class_labels": y}
        uncond = {"class_labels": torch.full_like(y, zoo.NULL_LABEL)}
        student = {"cond": cond, "uncond": uncond, "cfg_scale": call.guidance_scale} if student_cfg else {"cond": cond}
        return Conditioning(student, {"cond": cond, "uncond": uncond} if teacher else None)

    def latent_shape(self, call: Call) -> tuple[int, ...]:
        return (call.batch, self.student_module.config.in_channels, 32, 32)

    def draw_noise(self, call: Call, dtype: torch.dtype) -> torch.Tensor:
        # Drawn on the generator's device (a CPU generator gives the same image on every device).
        shape = self.latent_shape(call)
        if isinstance(call.generator, (list, tuple)):
            return torch.stack([torch.randn(shape[1:], generator=g, device=g.device).cpu() for g in call.generator])
        where = call.generator.device if call.generator is not None else "cpu"
        return torch.randn(shape, generator=call.generator, device=where).cpu()

    def student_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        return CFGDenoiser(self.noise.denoiser(net, module_dtype(self.student_module)), clip=self.student.clip)

    def teacher_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        scale = call.state["teacher_cfg"]
        return CFGDenoiser(self.teacher_noise.teacher_denoiser(net, module_dtype(self.teacher_module)),
                           zoo.TEACHER_CFG if scale is None else scale, clip=self.teacher.clip)

    def decode(self, latents: torch.Tensor, call: Call) -> tuple[Any, Any]:
        if call.output_type == "latent":
            return latents, None
        images = zoo.to_images(latents).float() / 255.0  # [B, 1, 28, 28] in [0, 1]
        if call.output_type == "pt":
            return images, None
        array = images.permute(0, 2, 3, 1).numpy()
        if call.output_type == "np":
            return array, None
        from PIL import Image

        return [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8), mode="L") for a in array], None


def load_zoo_preset(preset: Preset, opts: LoadOptions, models_dir: Any = None,
                    **pipeline_kwargs: Any) -> GuidedPipeline:
    """Load a zoo preset (offline: the weights ship with the package).

    Args:
        preset: a ``zoo-*`` preset.
        opts: the :class:`~distillpp.pipelines.presets.LoadOptions` (``device``: default CPU; ``torch_dtype``:
            default float32; ``base``/``student``/``teacher`` are refused: the weights ship with the package;
            ``download`` is ignored).
        models_dir: a folder of retrained zoo models instead of the shipped ones.
        **pipeline_kwargs: :class:`~distillpp.pipelines.GuidedPipeline` options.
    """
    for name, value in (("base", opts.base), ("student", opts.student), ("teacher", opts.teacher)):
        if value is not None:
            raise ValueError(f"{name}= does not apply to zoo presets (their weights ship with distillpp); "
                             "pass models_dir= for retrained zoo models")
    dtype = opts.torch_dtype or torch.float32
    device = opts.device or "cpu"
    student = zoo.load(preset.base, device=device, dtype=dtype, models_dir=models_dir)
    teacher = zoo.load(preset.teacher, device=device, dtype=dtype, models_dir=models_dir) \
        if preset.teacher != "none" else None
    return GuidedPipeline(ZooFamily(student, teacher, models_dir), preset=preset, teacher_device=opts.teacher_device,
                          teacher_offload=opts.teacher_offload, compile=opts.compile, **pipeline_kwargs)


register_family("zoo", load_zoo_preset)

# Guidance defaults: the lowest-FID settings of the guidance study (benchmarks/fmnist_study.py, chosen on a
# selection seed, reported on seeds 0-2 x 10k; benchmarks/results/fmnist_study/fmnist_study.md). lcm: the
# second step only, full strength, fresh noise; pd: the first two steps at full strength with the unguided
# teacher. For flow-student no setting beat the plain student (best guided: FID 0.376 -> 0.381), so its
# preset runs unguided (strength 0: the teacher is never called); the other knobs are that best guided
# setting, which `strength=0.1` turns on. distillpp.demo.GUIDANCE_PRESETS shows the same settings.
_ZOO_STUDENTS = {
    "lcm": ("teacher", TeacherGuidance(strength=(0.0, 1.0), guided_steps=2, renoise="random", space="x0",
                                       teacher_cfg=2.0)),
    "pd": ("teacher", TeacherGuidance(strength=1.0, guided_steps=2, renoise="next", space="x0", teacher_cfg=1.0)),
    "flow-student": ("flow-teacher", TeacherGuidance(strength=0.0, guided_steps=1, renoise="random", space="x0",
                                                     teacher_cfg=1.0)),
}
for _name, (_teacher, _guidance) in _ZOO_STUDENTS.items():
    register_preset(Preset(
        name=f"zoo-{_name}", family="zoo", base=_name, student_kind="pipeline", student=None, teacher=_teacher,
        scheduler="zoo", num_inference_steps=4, guidance_scale=1.0, guidance=_guidance, height=28, width=28,
        variant=None, notes=f"Fashion-MNIST zoo: {_name} guided by {_teacher}; settings chosen on a selection seed "
                            "and reported on held-out seeds (benchmarks/results/fmnist_study/fmnist_study.md).",
    ))
for _name in ("teacher", "flow-teacher"):
    register_preset(Preset(
        name=f"zoo-{_name}", family="zoo", base=_name, student_kind="pipeline", student=None, teacher="none",
        scheduler="zoo", num_inference_steps=50, guidance_scale=zoo.TEACHER_CFG,
        guidance=TeacherGuidance(strength=0.0, guided_steps=0), height=28, width=28, variant=None,
        notes=f"Fashion-MNIST zoo: the {_name} alone, 50 steps, CFG {zoo.TEACHER_CFG}.",
    ))
del _name, _teacher, _guidance
