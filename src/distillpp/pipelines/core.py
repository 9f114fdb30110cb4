"""One guided pipeline for every model family.

:class:`GuidedPipeline` owns everything the families share: argument checks (before any model
runs), the guidance knobs (one :class:`~distillpp.TeacherGuidance`, overridable per call), skipping
the teacher when every guided step has strength 0, teacher placement (same device, another device,
CPU offload, or the student's own network with its LoRA switched off), the guided run through
:func:`distillpp.sample`, decoding and the diffusers-style output.

A model family is a small :class:`ModelFamily` adapter with a few hooks: encode the conditioning,
give the sigmas and the initial sample (through its noise family, :mod:`.noise`), build the student
and teacher denoisers, decode, and check that a student and a teacher fit together. Adding a family
is one module that subclasses :class:`ModelFamily` and registers its presets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..accel import COMPILE_MODES, check_compile
from ..api import sample
from ..guidance import TeacherGuidance
from .lora import AdapterOffNet, ensure_adapter_switchable
from .placement import TEACHER_OFFLOAD, place_teacher_net

__all__ = [
    "DistillppPipelineOutput",
    "Call",
    "Conditioning",
    "ModelFamily",
    "DiffusersFamily",
    "GuidedPipeline",
    "GUIDANCE_KNOBS",
    "OUTPUT_TYPES",
    "COMPILE_MODES",
    "resolve_guidance",
    "module_dtype",
    "check_generator",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The per-call overrides a pipeline accepts: TeacherGuidance's fields, under the same names.
GUIDANCE_KNOBS = tuple(f.name for f in dataclasses.fields(TeacherGuidance))

try:  # diffusers' BaseOutput gives attribute, key and index access like every diffusers output.
    from diffusers.utils import BaseOutput as _BaseOutput
except ImportError:  # pragma: no cover - diffusers is a dependency
    _BaseOutput = object  # type: ignore[assignment,misc]


@dataclass
class DistillppPipelineOutput(_BaseOutput):  # type: ignore[misc]
    """Output of a distillpp pipeline (diffusers style: ``out.images``, ``out[0]``).

    Attributes:
        images: list of PIL images, or a numpy array / tensor, as ``output_type`` asks.
        nsfw_content_detected: per image, where the student pipeline has a safety checker.
    """

    images: Any
    nsfw_content_detected: list[bool] | None = None


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """A module's parameter dtype, read from its first parameter (diffusers' ``.dtype`` walks every submodule)."""
    for p in module.parameters():
        return p.dtype
    return torch.float32


def resolve_guidance(default: TeacherGuidance, guidance: Any = None, **overrides: Any) -> TeacherGuidance:
    """The guidance of one call: ``guidance`` (or the pipeline's default) with the non-``None`` overrides.

    Raises:
        ValueError: ``guidance`` is not a :class:`~distillpp.TeacherGuidance`, or an override is invalid.
    """
    if guidance is not None and not isinstance(guidance, TeacherGuidance):
        raise ValueError(f"guidance must be a distillpp.TeacherGuidance or None, got {type(guidance).__name__}")
    base = default if guidance is None else guidance
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **changes) if changes else base


def check_generator(generator: Any, batch: int) -> None:
    """``None``, one ``torch.Generator``, or one per image (a list of ``batch`` generators)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} generators but the call makes {batch} images "
                             "(one generator per image)")
        return
    raise ValueError("generator must be a torch.Generator, a list of them (one per image) or None, "
                     f"got {type(generator).__name__}")


def _as_list(value: Any, name: str, n: int | None = None) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a non-empty string or list of strings, got {value!r}")
    if n is not None and len(items) == 1 and isinstance(value, str):
        items = items * n
    if n is not None and len(items) != n:
        raise ValueError(f"{name} has {len(items)} entries but prompt has {n}")
    return items


@dataclass
class Call:
    """One validated pipeline call: what a family needs to prepare its run.

    Attributes:
        prompts: one prompt per row.
        negative: the student's negative prompts (``None``: the family's default).
        teacher_negative: the teacher's CFG negative prompts (``None``: ``negative``).
        num_images_per_prompt: images per prompt; the batch is ``len(prompts) * num_images_per_prompt``.
        height, width: image size in pixels (the family's default filled in).
        num_inference_steps: student steps.
        timesteps: explicit student timesteps (discrete VP students), or ``None``.
        guidance_scale: the student's own CFG scale (diffusers' convention; LCM: its embedding).
        generator: ``None``, a generator, or one per image.
        latents: initial unit noise in the family's layout, or ``None`` to draw it.
        output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        options: family-specific keyword arguments (``prompt_2``, ``max_sequence_length``...).
        state: the family's scratch space for one call (e.g. FLUX's position ids, made while drawing
            the noise and read by the denoisers).
    """

    prompts: list[str]
    negative: list[str] | None
    teacher_negative: list[str] | None
    num_images_per_prompt: int
    height: int
    width: int
    num_inference_steps: int
    timesteps: tuple[int, ...] | None
    guidance_scale: float
    generator: Any
    latents: torch.Tensor | None
    output_type: str
    options: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


@dataclass
class Conditioning:
    """The conditioning of one run: the student's ``extra_args`` and the teacher's ``teacher_args``."""

    student: dict[str, Any]
    teacher: dict[str, Any] | None = None


class ModelFamily:
    """A model family's adapter: the hooks where families differ. Subclasses set the attributes and
    override the hooks; :class:`GuidedPipeline` calls them in this order for each call:
    :meth:`check_options`, :meth:`sigmas`, :meth:`encode`, :meth:`initial`, :meth:`student_denoiser`,
    :meth:`teacher_denoiser` (only when the teacher runs), :meth:`decode`.

    Attributes:
        name: the family's name (``"sd"``, ``"sdxl"``, ``"flux"``, ``"zoo"``...).
        noise: its noise family (:class:`~distillpp.pipelines.noise.VPNoise` or ``FlowNoise``).
        student_module: the student's denoising network (a ``torch.nn.Module``).
        teacher_module: the teacher's network, the student's own (``teacher_kind="adapter-off"``) or ``None``.
        teacher_kind: ``"separate"``, ``"adapter-off"`` (LoRA students) or ``"none"``.
        options: family-specific call keywords and their defaults.
        size_multiple: height and width must be positive multiples of it.
    """

    name: str = ""
    noise: Any = None
    student_module: torch.nn.Module | None = None
    teacher_module: torch.nn.Module | None = None
    teacher_kind: str = "none"
    options: dict[str, Any] = {}
    size_multiple: int = 8
    component: str = "unet"  # attribute name of the network in the owner pipeline (LoRA messages)
    owner: Any = None  # the diffusers pipeline holding the student, if any (its ``fused_loras`` record)
    unfuse: bool = False  # adapter-off with a fused LoRA: unfuse it (with a warning) instead of raising

    # --- set-up -------------------------------------------------------------------------------

    def network(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """``module`` as a network ``net(model_input, timestep, **cond)`` (:func:`distillpp.unet_fn` style)."""
        raise NotImplementedError

    def check_pair(self) -> None:
        """Raise a ValueError when student and teacher cannot share inputs and conditioning."""

    def text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        """``(name, module)`` of each text encoder :meth:`encode` calls (graphed under ``compile=``)."""
        return []

    @property
    def device(self) -> torch.device:
        """The execution device (where the student runs), looked up once and again after :meth:`to`.

        diffusers' ``_execution_device`` walks every module of every component; asked on every use it
        cost about 50 ms of host time per call on a GPU machine.
        """
        cached = self.__dict__.get("_device")
        if cached is None:
            cached = self.__dict__["_device"] = self.find_device()
        return cached

    def find_device(self) -> torch.device:
        """Where the student runs (default: its weights' device)."""
        for p in self.student_module.parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Move the student's components (the pipeline moves a separate teacher itself)."""
        self.student_module.to(device=device, dtype=dtype)

    def moved(self) -> None:
        """Forget the cached device (called after the pipeline moved its components)."""
        self.__dict__.pop("_device", None)

    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels when the call gives none."""
        raise NotImplementedError

    def default_guidance_scale(self) -> float:
        """The student's CFG scale when neither the call nor a preset gives one (0: no student CFG)."""
        return 0.0

    def default_guidance(self) -> TeacherGuidance:
        """The guidance knobs when neither the call nor a preset gives them."""
        return TeacherGuidance(strength=0.05, guided_steps=1, space="x0")

    # --- one call -----------------------------------------------------------------------------

    def check_options(self, call: Call) -> None:
        """Validate ``call.options`` (family keywords); raise a ValueError naming the bad one."""

    def sigmas(self, call: Call) -> torch.Tensor:
        """The student's grid for this call."""
        return self.noise.sigmas(call.num_inference_steps, call.timesteps)

    def encode(self, call: Call, student_cfg: bool, teacher_cfg: bool) -> Conditioning:
        """The student's and (when ``teacher_cfg`` is not ``None``) the teacher's conditioning.

        Args:
            call: the call.
            student_cfg: the student runs classifier-free guidance (needs its ``uncond``).
            teacher_cfg: whether the teacher runs (``False``: return no teacher conditioning); the
                family reads the teacher's CFG scale from ``call.state["teacher_cfg"]``.
        """
        raise NotImplementedError

    def student_uses_cfg(self, call: Call) -> bool:
        """Whether the student runs classifier-free guidance (diffusers: ``guidance_scale > 1``)."""
        return call.guidance_scale > 1

    def noise_dtype(self, cond: Conditioning) -> torch.dtype:
        """The dtype initial noise is drawn in (diffusers draws it in the prompt embeddings' dtype)."""
        return torch.float32

    def latent_shape(self, call: Call) -> tuple[int, ...]:
        """The shape of the initial unit noise (``call.latents`` must have it)."""
        raise NotImplementedError

    def draw_noise(self, call: Call, dtype: torch.dtype) -> torch.Tensor:
        """Unit noise for the batch: one draw per image from its own generator when given a list."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self.latent_shape(call), generator=call.generator, device=self.device, dtype=dtype)

    def initial(self, call: Call, sigmas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The sample at ``sigmas[0]`` (VE coordinates, float32)."""
        shape = self.latent_shape(call)
        if call.latents is not None:
            if tuple(call.latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(call.latents.shape)}")
            noise = call.latents.to(self.device)
        else:
            noise = self.draw_noise(call, dtype)
        # The grid stays on the host: the start scale is one float of it, and a device copy read
        # back here would synchronise with the GPU.
        return self.noise.initial(noise.to(self.device, torch.float32), sigmas)

    def student_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        """The student denoiser over ``net`` (the student network, possibly accelerated)."""
        raise NotImplementedError

    def teacher_denoiser(self, net: Callable[..., torch.Tensor], call: Call) -> Callable[..., torch.Tensor]:
        """The teacher denoiser over ``net`` (the placed teacher network)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, call: Call) -> tuple[Any, Any]:
        """``(images, nsfw_flags)`` for ``call.output_type``."""
        raise NotImplementedError

    def check_guidance(self, guidance: TeacherGuidance, sigmas: torch.Tensor) -> None:
        """Family-specific limits on the guidance (e.g. no eps fusion at flow time 1)."""

    def sampler(self, call: Call) -> tuple[str, dict[str, Any]]:
        """``(sampler, sampler_kwargs)`` for :func:`distillpp.sample`."""
        return self.noise.sampler, dict(self.noise.sampler_kwargs)


class DiffusersFamily(ModelFamily):
    """A family whose student is a diffusers pipeline (``owner``): its text encoders and VAE serve the teacher too."""

    def network(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """A diffusers transformer as a network (timestep by keyword); UNet families override it."""
        from ..denoisers import transformer_fn

        return transformer_fn(module)

    def find_device(self) -> torch.device:
        return self.owner._execution_device

    def text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [(n, getattr(self.owner, n)) for n in names if isinstance(getattr(self.owner, n, None), torch.nn.Module)]

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> None:
        self.owner.to(device=device, dtype=dtype) if dtype is not None else self.owner.to(device)

    def noise_dtype(self, cond: Conditioning) -> torch.dtype:
        return cond.student["cond"]["encoder_hidden_states"].dtype

    def latent_shape(self, call: Call) -> tuple[int, ...]:
        f = self.owner.vae_scale_factor
        return (call.batch, self.student_module.config.in_channels, call.height // f, call.width // f)

    @staticmethod
    def cfg_conditioning(call: Call, student_cfg: bool, teacher: bool,
                         encode: Callable[[list[str] | None, bool], tuple[dict, dict | None]]) -> Conditioning:
        """Student and teacher conditioning with as few text-encoder passes as possible.

        Args:
            encode: ``encode(negative_prompts, with_uncond) -> (cond, uncond)`` (uncond ``None`` without).
        """
        teacher_cfg_on = teacher and call.state["teacher_cfg"] != 1.0
        t_negative = call.teacher_negative if call.teacher_negative is not None else call.negative
        # One encode gives cond and one uncond; a second only when student and teacher negatives differ.
        cond, uncond = encode(call.negative if student_cfg else t_negative, student_cfg or teacher_cfg_on)
        t_uncond = uncond
        if student_cfg and teacher_cfg_on and t_negative != call.negative:
            _, t_uncond = encode(t_negative, True)
        student = {"cond": cond, "uncond": uncond, "cfg_scale": call.guidance_scale} if student_cfg else {"cond": cond}
        if not teacher:
            return Conditioning(student)
        return Conditioning(student, {"cond": cond, "uncond": t_uncond} if teacher_cfg_on else {"cond": cond})


class GuidedPipeline:
    """A few-step student with inference-time teacher guidance (Distillation++), diffusers style.

    Args:
        family: the model family adapter holding the student (and teacher).
        preset: the :class:`~distillpp.pipelines.presets.Preset` it was loaded from, if any.
        guidance: default teacher-guidance knobs (default: the preset's).
        num_inference_steps, timesteps, guidance_scale, height, width: student defaults (default: the
            preset's, else the family's).
        teacher_device: run a separate teacher on this device (e.g. ``"cuda:1"``).
        teacher_offload: ``"cpu"``: keep a separate teacher in CPU memory, copied in for its call.
        compile: ``"none"`` (eager), ``"graphs"`` (replay captured CUDA graphs) or ``"inductor"``
            (``torch.compile``) for the student's and teacher's networks; the text encoders replay
            graphs under both (:meth:`fast_encoders`); see :mod:`distillpp.accel`.

    Raises:
        ValueError: invalid placement or compile mode, or a student/teacher that do not fit together.
    """

    def __init__(
        self,
        family: ModelFamily,
        *,
        preset: Any = None,
        guidance: TeacherGuidance | None = None,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        teacher_device: str | torch.device | None = None,
        teacher_offload: str | None = None,
        compile: str = "none",
    ):
        if teacher_offload not in TEACHER_OFFLOAD:
            raise ValueError(f"teacher_offload must be None or 'cpu', got {teacher_offload!r}")
        if teacher_offload is not None and teacher_device is not None:
            raise ValueError("give teacher_device or teacher_offload, not both")
        if family.teacher_kind != "separate" and (teacher_device is not None or teacher_offload is not None):
            raise ValueError(f"teacher_device/teacher_offload apply to a separate teacher model; this pipeline's "
                             f"teacher is {family.teacher_kind!r}")
        compile = check_compile(compile)
        family.check_pair()
        self.family = family
        self.preset = preset
        self.guidance = guidance if guidance is not None else (
            preset.guidance if preset is not None else family.default_guidance())
        if not isinstance(self.guidance, TeacherGuidance):
            raise ValueError(f"guidance must be a distillpp.TeacherGuidance, got {type(self.guidance).__name__}")
        self.num_inference_steps = num_inference_steps or (preset.num_inference_steps if preset else 4)
        self.timesteps = tuple(timesteps) if timesteps is not None else (
            tuple(preset.timesteps) if preset is not None and preset.timesteps else None)
        self.guidance_scale = guidance_scale if guidance_scale is not None else (
            preset.guidance_scale if preset is not None else family.default_guidance_scale())
        self.height = height or (preset.height if preset is not None else None)
        self.width = width or (preset.width if preset is not None else None)
        self.teacher_device = teacher_device
        self.teacher_offload = teacher_offload
        self.compile = compile
        self._progress_disable = True
        self._student_net: Callable[..., torch.Tensor] | None = None
        self._teacher_net: Callable[..., torch.Tensor] | None = None
        self._encoders: list[tuple[torch.nn.Module, Callable[..., Any]]] = []
        if family.teacher_kind == "adapter-off":
            ensure_adapter_switchable(family.teacher_module, family.owner, unfuse=family.unfuse,
                                      component=family.component)
        self._place()

    # ----------------------------------------------------------------------------------------
    # Placement and acceleration.

    @property
    def has_teacher(self) -> bool:
        return self.family.teacher_kind != "none"

    @property
    def device(self) -> torch.device:
        """The execution device (the student's)."""
        return self.family.device

    def _accelerate(self, net: Callable[..., torch.Tensor], module: torch.nn.Module,
                    name: str) -> Callable[..., torch.Tensor]:
        if self.compile == "none":
            return net
        from ..accel import accelerate_net

        return accelerate_net(net, self.compile, module=module, name=name)

    def _place(self) -> None:
        fam = self.family
        self._student_net = self._accelerate(fam.network(fam.student_module), fam.student_module, "student")
        if fam.teacher_kind == "adapter-off":
            self._teacher_net = self._accelerate(
                AdapterOffNet(fam.network(fam.teacher_module), fam.teacher_module), fam.teacher_module, "teacher")
        elif fam.teacher_kind == "separate":
            net = place_teacher_net(fam.network(fam.teacher_module), fam.teacher_module, self.device,
                                    self.teacher_device, self.teacher_offload)
            self._teacher_net = net if self.teacher_offload else self._accelerate(net, fam.teacher_module, "teacher")
        else:
            self._teacher_net = None
        # Text encoders run inside the family's (diffusers') own encode code: their forwards are
        # routed through graphs for the duration of each encode (see fast_encoders).
        self._encoders = []
        if self.compile != "none":
            from ..accel import accelerate_module

            for name, module in fam.text_encoders():
                fast = accelerate_module(module, self.compile, name)
                if fast is not None:
                    self._encoders.append((module, fast))

    def fast_encoders(self) -> Any:
        """A context manager inside which the text encoders run on the fast path (replayed graphs).

        Every pipeline call encodes its prompts inside it. Encoders are graphed, not compiled, under
        both ``"graphs"`` and ``"inductor"``; with ``compile="none"``, on a CPU, or for an encoder
        with accelerate offload hooks it changes nothing. Prompts are encoded anew on every call
        (nothing is cached across calls): what is reused is the recorded kernels.
        """
        from ..accel import routed_forwards

        return routed_forwards(self._encoders)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "GuidedPipeline":
        """Move the student (and a teacher kept beside it) like ``DiffusionPipeline.to``."""
        self.family.to(device, dtype)
        self.family.moved()
        teacher = self.family.teacher_module
        if self.family.teacher_kind == "separate" and self.teacher_offload is None:
            if dtype is not None:
                teacher.to(dtype=dtype)
        self._place()
        return self

    @property
    def sampler(self) -> str:
        """The distillpp sampler the student runs (a :data:`distillpp.SAMPLERS` key)."""
        return self.family.noise.sampler

    def sigmas(self, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """The student's sigma grid for these settings (default: the pipeline's), equal to its scheduler's."""
        dh, dw = self.family.default_size()
        call = self._call("x", None, None, num_inference_steps, timesteps, None, self.height or dh,
                          self.width or dw, 1, None, None, "latent", {}, check_family=False)
        return self.family.sigmas(call)

    # Preset families a subclass loads (``DistillppPipeline``: SD; empty: any).
    preset_families: tuple[str, ...] = ()

    @classmethod
    def from_preset(cls, name: Any, **kwargs: Any) -> "GuidedPipeline":
        """Load a preset; see :func:`distillpp.pipelines.from_preset` for the options."""
        from .presets import from_preset, get_preset

        preset = get_preset(name) if isinstance(name, str) else name
        if cls.preset_families and preset.family not in cls.preset_families:
            raise ValueError(f"preset {preset.name!r} is a {preset.family} preset; use distillpp.pipelines.from_preset")
        return from_preset(preset, **kwargs)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """``disable=False`` shows a sampling progress bar (diffusers' method name)."""
        self._progress_disable = kwargs.get("disable", True)

    # ----------------------------------------------------------------------------------------
    # One call.

    def _call(self, prompt: Any, negative_prompt: Any, teacher_negative_prompt: Any, num_inference_steps: Any,
              timesteps: Any, guidance_scale: Any, height: Any, width: Any, num_images_per_prompt: Any,
              generator: Any, latents: Any, output_type: Any, options: dict[str, Any],
              check_family: bool = True) -> Call:
        prompts = _as_list(prompt, "prompt")
        if prompts is None:
            raise ValueError("prompt must be a non-empty string or list of strings, got None")
        negative = _as_list(negative_prompt, "negative_prompt", len(prompts))
        teacher_negative = _as_list(teacher_negative_prompt, "teacher_negative_prompt", len(prompts))
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(repr(o) for o in OUTPUT_TYPES)}, "
                             f"got {output_type!r}")
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if timesteps is None and num_inference_steps is None:
            timesteps = self.timesteps
        dh, dw = self.family.default_size()
        height = height if height is not None else (self.height or dh)
        width = width if width is not None else (self.width or dw)
        m = self.family.size_multiple
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < m or v % m:
                raise ValueError(f"height and width must be positive multiples of {m}; got {name}={v!r}")
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"guidance_scale must be a number, got {scale!r}")
        unknown = set(options) - set(self.family.options)
        if unknown:
            allowed = ", ".join(sorted(self.family.options)) or "none"
            raise ValueError(f"unexpected arguments {sorted(unknown)}; {self.family.name} pipelines also accept: "
                             f"{allowed}")
        opts = {**self.family.options, **{k: v for k, v in options.items() if v is not None}}
        call = Call(prompts, negative, teacher_negative, num_images_per_prompt, height, width, steps,
                    tuple(timesteps) if timesteps is not None else None, float(scale), generator, latents,
                    output_type, opts)
        check_generator(generator, call.batch)
        if check_family:  # prompts and family options (not needed to ask for the grid)
            self.family.check_options(call)
        return call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        guidance: TeacherGuidance | None = None,
        strength: Any = None,
        guided_steps: int | None = None,
        renoise: str | None = None,
        noise: str | None = None,
        space: str | None = None,
        teacher_cfg: float | None = None,
        samples: int | None = None,
        noise_mix: float | None = None,
        teacher_negative_prompt: str | list[str] | None = None,
        timesteps: Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        return_dict: bool = True,
        **options: Any,
    ) -> DistillppPipelineOutput | tuple:
        """Generate images with the student, teacher-guided during its first steps.

        Args:
            prompt: a prompt or a list of prompts (zoo: class names).
            negative_prompt: negative prompt(s) for the student's CFG and, unless
                ``teacher_negative_prompt`` is given, for the teacher's CFG.
            num_inference_steps: student steps (default: the preset's).
            generator: a ``torch.Generator`` for every random draw, or one per image (then each image's
                noise comes from its own generator and does not depend on the batch).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            height, width: image size (default: the preset's, else the family's).
            num_images_per_prompt: images per prompt.
            guidance_scale: the student's own CFG scale, diffusers' convention (LCM: guidance embedding).
            guidance: a :class:`distillpp.TeacherGuidance` replacing the pipeline's default.
            strength, guided_steps, renoise, noise, space, teacher_cfg, samples, noise_mix: override one
                knob of the guidance (see :class:`distillpp.TeacherGuidance`); ``strength=0`` runs the
                student alone, bit-identical to its plain sampler.
            teacher_negative_prompt: negative prompt(s) for the teacher's CFG only.
            timesteps: explicit student timesteps (e.g. DMD2's ``[999, 749, 499, 249]``).
            latents: initial unit noise in the family's layout instead of drawing it.
            callback: called every step with :func:`distillpp.sample`'s dict (``guidance`` holds a
                :class:`distillpp.GuidanceInfo` on guided steps).
            return_dict: return a :class:`DistillppPipelineOutput` (else a tuple).
            **options: family-specific keywords (``prompt_2``, ``max_sequence_length``...).

        Raises:
            ValueError: invalid arguments, before any model is called.
        """
        call = self._call(prompt, negative_prompt, teacher_negative_prompt, num_inference_steps, timesteps,
                          guidance_scale, height, width, num_images_per_prompt, generator, latents, output_type,
                          options)
        g = resolve_guidance(self.guidance, guidance, strength=strength, guided_steps=guided_steps,
                             renoise=renoise, noise=noise, space=space, teacher_cfg=teacher_cfg, samples=samples,
                             noise_mix=noise_mix)
        fam = self.family
        sigmas = fam.sigmas(call)
        uses_teacher = g.teacher_calls(sigmas) > 0
        if not self.has_teacher:
            asked = guidance is not None or strength is not None or guided_steps is not None
            if asked and (callable(g.strength) or any(v != 0 for v in np.atleast_1d(g.strength))):
                raise ValueError(f"this {fam.name} pipeline has no teacher, so strength must be 0 "
                                 f"(got strength={g.strength!r})")
            uses_teacher = False  # the default knobs of a teacher-less pipeline: the student alone
        if uses_teacher:
            fam.check_guidance(g, sigmas)
        call.state["teacher_cfg"] = g.teacher_cfg if g.teacher_cfg is not None else self.guidance.teacher_cfg
        student_cfg = fam.student_uses_cfg(call)
        with self.fast_encoders():
            cond = fam.encode(call, student_cfg, uses_teacher)
        x = fam.initial(call, sigmas, fam.noise_dtype(cond))
        student = fam.student_denoiser(self._student_net, call)
        teacher = fam.teacher_denoiser(self._teacher_net, call) if uses_teacher else None
        sampler, sampler_kwargs = fam.sampler(call)
        latents_out = sample(
            student, x, sigmas, sampler=sampler, teacher=teacher, guidance=g if uses_teacher else None,
            generator=generator, extra_args=cond.student, teacher_args=cond.teacher, callback=callback,
            disable=self._progress_disable, **sampler_kwargs,
        )
        images, nsfw = fam.decode(latents_out, call)
        if not return_dict:
            return (images,)
        return DistillppPipelineOutput(images=images, nsfw_content_detected=nsfw)
