"""Named student/teacher pairs with their settings, and a registry.

A :class:`Preset` is data: which weights make the student and the teacher, which scheduler the
student samples with, and the default guidance knobs (a :class:`~distillpp.TeacherGuidance`).
Each model family module registers a loader (:func:`register_family`) and its presets
(:func:`register_preset`); :func:`from_preset` dispatches on ``preset.family``.

Guidance defaults of the diffusers presets are the values seen in the authors' reference code
(docs/method.md, "Reference settings"); they were not validated on real weights here. Presets whose
student is not in that table (Hyper-SD) borrow the values of the closest solver and say so in ``notes``.
A preset-override file (JSON) adjusts a preset without code; see :func:`load_overrides`.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from ..guidance import TeacherGuidance
from .weights import WeightsRef

__all__ = [
    "Preset",
    "PRESETS",
    "register_preset",
    "get_preset",
    "list_presets",
    "register_family",
    "from_preset",
    "FAMILY_MODULES",
    "load_overrides",
    "apply_overrides",
    "OVERRIDABLE",
    "LoadOptions",
]


@dataclass(frozen=True)
class Preset:
    """A student/teacher pair and how to sample it.

    Attributes:
        name: registry key, e.g. ``"sdxl-lightning-4step-lora"``.
        family: model family, selects the loader: ``"sd15"``, ``"sd2"``, ``"sdxl"`` (:mod:`.sd`);
            ``"flux"``, ``"sd3"`` (:mod:`.flow`); ``"pixart"`` (:mod:`.pixart`); ``"zoo"`` (:mod:`.zoo`).
        base: repo (or folder) of the diffusers pipeline that provides text encoders, tokenizers, VAE
            and scheduler config; for ``student_kind="pipeline"`` it is the student itself.
        student_kind: ``"lora"`` (adapter on the base model), ``"unet"`` (a replacement denoising
            network: ``student`` is a diffusers folder/repo or a single state-dict file) or
            ``"pipeline"`` (``base`` is the student).
        student: the student weights (``None`` for ``"pipeline"``).
        teacher: repo/folder of the teacher (its ``unet``/``transformer`` and ``scheduler`` subfolders),
            ``"base"`` for the base pipeline's own network, or ``"adapter-off"`` (LoRA students: the
            same network with the adapter disabled), or ``"none"`` (the student alone).
        scheduler: diffusers scheduler class the student samples with.
        scheduler_config: overrides applied to the base scheduler config (``timestep_spacing``...).
        num_inference_steps: student steps.
        timesteps: explicit student timesteps (DMD2), or ``None``.
        guidance_scale: the student's CFG scale in diffusers' convention (LCM: its guidance embedding
            uses ``guidance_scale - 1``); ``<= 1`` means no student CFG.
        guidance: default teacher-guidance knobs.
        height, width: default image size.
        variant: weight variant to prefer in the base/teacher repos (``"fp16"``).
        lora_scale: scale of a LoRA student.
        extra: family-specific settings (e.g. flow-model shift, max sequence length).
        notes: where the numbers come from.
    """

    name: str
    family: str
    base: str
    student_kind: str
    student: WeightsRef | None
    teacher: str
    scheduler: str
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    num_inference_steps: int = 4
    timesteps: tuple[int, ...] | None = None
    guidance_scale: float = 0.0
    guidance: TeacherGuidance = TeacherGuidance(strength=0.05, guided_steps=1, space="x0", teacher_cfg=7.5)
    height: int = 1024
    width: int = 1024
    variant: str | None = "fp16"
    lora_scale: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if self.student_kind not in ("lora", "unet", "pipeline"):
            raise ValueError(f"student_kind must be 'lora', 'unet' or 'pipeline', got {self.student_kind!r}")
        if self.student_kind != "pipeline" and self.student is None:
            raise ValueError(f"preset {self.name}: student_kind={self.student_kind!r} needs student weights")
        if self.teacher == "adapter-off" and self.student_kind != "lora":
            raise ValueError(f"preset {self.name}: teacher='adapter-off' needs a LoRA student")

    def with_overrides(self, **changes: Any) -> "Preset":
        """A copy with some fields replaced (``guidance`` accepts a dict of knob overrides).

        Raises:
            ValueError: an unknown field or guidance knob, or an invalid value (naming it).
        """
        unknown = set(changes) - {f for f in self.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown preset fields {sorted(unknown)}; overridable: {', '.join(OVERRIDABLE)}")
        if isinstance(changes.get("guidance"), Mapping):
            knobs = dict(changes["guidance"])
            bad = set(knobs) - set(TeacherGuidance.__dataclass_fields__) - {"steps"}
            if bad:
                raise ValueError(f"unknown guidance knobs {sorted(bad)}; knobs: "
                                 f"{', '.join(TeacherGuidance.__dataclass_fields__)}")
            changes["guidance"] = replace(self.guidance, **knobs)
        return replace(self, **changes)


@dataclass(frozen=True)
class LoadOptions:
    """The loader options every family takes (see :func:`from_preset`).

    Attributes:
        base, student, teacher: local folders/files or Hugging Face ids overriding the preset's weights.
        torch_dtype: weights dtype (e.g. ``torch.float16``); samples stay float32.
        device: where the student runs.
        download: allow downloads (default: local folders and the Hugging Face cache only).
        teacher_device: run a separate teacher on another device; teacher_offload: ``"cpu"`` offloading.
        compile: ``"none"``, ``"graphs"`` or ``"inductor"`` (the GPU fast path).
    """

    base: str | None = None
    student: str | None = None
    teacher: str | None = None
    torch_dtype: Any = None
    device: Any = None
    download: bool = False
    teacher_device: Any = None
    teacher_offload: str | None = None
    compile: str = "none"


PRESETS: dict[str, Preset] = {}

# family -> module that registers its loader (imported on first use).
FAMILY_MODULES: dict[str, str] = {
    "sd15": "distillpp.pipelines.sd",
    "sd2": "distillpp.pipelines.sd",
    "sdxl": "distillpp.pipelines.sd",
    "flux": "distillpp.pipelines.flow",
    "sd3": "distillpp.pipelines.flow",
    "pixart": "distillpp.pipelines.pixart",
    "zoo": "distillpp.pipelines.zoo",
}
# Preset fields an override file may change.
OVERRIDABLE = ("guidance", "num_inference_steps", "timesteps", "guidance_scale", "height", "width")
_LOADERS: dict[str, Callable[..., Any]] = {}
_FAMILIES_IMPORTED = False


def register_preset(preset: Preset, overwrite: bool = False) -> Preset:
    """Add a preset to :data:`PRESETS`.

    Raises:
        ValueError: the name is taken and ``overwrite`` is false.
    """
    if preset.name in PRESETS and not overwrite and PRESETS[preset.name] != preset:
        raise ValueError(f"preset {preset.name!r} is already registered; pass overwrite=True to replace it")
    PRESETS[preset.name] = preset
    return preset


def register_family(family: str, loader: Callable[..., Any]) -> None:
    """Register ``loader(preset, opts: LoadOptions, **family_kwargs) -> pipeline`` for a model family."""
    _LOADERS[family] = loader


def _import_families() -> None:
    """Import the family modules once, so their presets and loaders are registered."""
    global _FAMILIES_IMPORTED
    if _FAMILIES_IMPORTED:
        return
    _FAMILIES_IMPORTED = True
    for module in sorted(set(FAMILY_MODULES.values())):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a missing dependency inside an existing module is a real error
                raise


def list_presets(family: str | None = None) -> list[str]:
    """Names of the registered presets (optionally of one family)."""
    _import_families()
    return sorted(n for n, p in PRESETS.items() if family is None or p.family == family)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _import_families()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def load_overrides(overrides: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a preset-override file (or mapping): ``{"preset": NAME?, "guidance": {knobs}, FIELD: value}``.

    ``distillpp tune`` writes such files; ``generate``, ``batch`` and the UI accept them. Only the fields in
    :data:`OVERRIDABLE` may be given; ``"preset"`` (optional) names the preset the file was made for.

    Raises:
        ValueError: unreadable JSON, unknown fields (naming them).
    """
    if isinstance(overrides, Mapping):
        data = dict(overrides)
    else:
        try:
            with open(overrides, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"overrides file {os.fspath(overrides)!r} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("overrides must be a JSON object with 'guidance' and preset fields")
    unknown = set(data) - set(OVERRIDABLE) - {"preset"}
    if unknown:
        raise ValueError(f"overrides has unknown fields {sorted(unknown)}; allowed: preset, {', '.join(OVERRIDABLE)}")
    if "timesteps" in data and data["timesteps"] is not None:
        data["timesteps"] = tuple(data["timesteps"])
    return data


def apply_overrides(preset: Preset, overrides: str | os.PathLike | Mapping[str, Any]) -> Preset:
    """``preset`` with a preset-override file (or mapping) applied (see :func:`load_overrides`).

    Raises:
        ValueError: the file names another preset, or has unknown fields or invalid values.
    """
    data = load_overrides(overrides)
    made_for = data.pop("preset", None)
    if made_for is not None and made_for != preset.name:
        raise ValueError(f"overrides were made for preset {made_for!r}, not {preset.name!r}")
    return preset.with_overrides(**data)


def from_preset(name: str | Preset, overrides: str | os.PathLike | Mapping[str, Any] | None = None,
                **kwargs: Any) -> Any:
    """Load the pipeline of a preset with its family's loader.

    Args:
        name: a preset name or a :class:`Preset`.
        overrides: a preset-override file or mapping (see :func:`load_overrides`) applied first.
        **kwargs: loader options: ``base=``, ``student=``, ``teacher=`` (local folders or ids that
            override the preset's), ``torch_dtype=``, ``device=``, ``download=`` (default ``False``:
            local files and the Hugging Face cache only), ``teacher_device=``, ``teacher_offload=``,
            ``compile=`` (``"none"``, ``"graphs"``, ``"inductor"``).

    Raises:
        ValueError: unknown preset, or an override file that names another preset or unknown fields.
        MissingWeightsError: weights are missing (the message lists them and how to get them).
    """
    preset = get_preset(name) if isinstance(name, str) else name
    if overrides is not None:
        preset = apply_overrides(preset, overrides)
    if preset.family not in _LOADERS:
        _import_families()
    if preset.family not in _LOADERS:
        raise ValueError(f"no loader registered for family {preset.family!r} (preset {preset.name!r})")
    opts = LoadOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in LoadOptions.__dataclass_fields__})
    return _LOADERS[preset.family](preset, opts, **kwargs)
