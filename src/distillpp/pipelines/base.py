"""Family-neutral core of the diffusers pipelines: one guided run, teacher placement, LoRA switching.

Every model family (SD1.5/SDXL UNets in :mod:`.sd`, FLUX/SD3 transformers in :mod:`.flow`) turns
its diffusers components into a :class:`GuidedRun` (student and teacher denoisers, explicit sigmas,
the initial sample, conditioning, a decoder) and hands it to :func:`run_guided`, which calls
:func:`distillpp.sample` and decodes. Nothing in this file knows about UNets, text encoders or
latent layouts.

The helpers below wrap a *network* ``net(model_input, timestep, **cond)`` (the thing
:func:`distillpp.unet_fn` returns) rather than a denoiser, so that they compose with any denoiser
wrapper:

- :class:`AdapterOffNet`: the same LoRA-carrying model with its adapters disabled for the call
  (the teacher of a LoRA student, without a second copy of the weights);
- :class:`PlacedNet`: the teacher on another device, inputs and outputs moved across;
- :class:`OffloadedNet`: the teacher's weights kept in pinned CPU memory and copied to the
  execution device only for its call.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from ..api import sample
from ..guidance import TeacherGuidance

__all__ = [
    "DistillppPipelineOutput",
    "GuidedRun",
    "GuidanceDefaults",
    "GuidedPipeline",
    "run_guided",
    "make_guidance",
    "move_to",
    "AdapterOffNet",
    "PlacedNet",
    "OffloadedNet",
    "place_teacher_net",
    "LoraState",
    "lora_state",
    "ensure_adapter_switchable",
    "WeightsRef",
    "MissingWeightsError",
    "offline_mode",
    "check_weights",
    "resolve_weights",
]


# --------------------------------------------------------------------------------------------
# Output and the one guided run.
# --------------------------------------------------------------------------------------------

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


@dataclass
class GuidedRun:
    """Everything one call of :func:`distillpp.sample` needs, plus how to decode its result.

    Attributes:
        student: student denoiser ``D(x, sigma, **extra_args) -> x0``.
        x: initial sample at ``sigmas[0]`` in VE coordinates.
        sigmas: descending noise levels ending in 0.
        sampler: a key of :data:`distillpp.SAMPLERS`.
        teacher: teacher denoiser (usually a :class:`distillpp.CFGDenoiser`), or ``None``.
        extra_args: student conditioning.
        teacher_args: teacher conditioning (e.g. ``{"cond": ..., "uncond": ...}``).
        decode: ``decode(latents) -> images``; ``None`` returns the latents.
        sampler_kwargs: solver knobs (``eta``...).
    """

    student: Callable[..., torch.Tensor]
    x: torch.Tensor
    sigmas: torch.Tensor
    sampler: str
    teacher: Callable[..., torch.Tensor] | None = None
    extra_args: dict[str, Any] = field(default_factory=dict)
    teacher_args: dict[str, Any] | None = None
    decode: Callable[[torch.Tensor], Any] | None = None
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)


def run_guided(
    run: GuidedRun,
    guidance: TeacherGuidance | None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = True,
    decode: bool = True,
) -> tuple[torch.Tensor, Any]:
    """Sample a :class:`GuidedRun` (teacher-guided where ``guidance`` says so) and decode it.

    Args:
        run: the prepared run.
        guidance: teacher-guidance knobs; ``None`` (or ``run.teacher is None``) samples the student alone.
        generator: the generator for every random draw of the sampler and the guidance.
        callback: per-step callback of :func:`distillpp.sample`.
        disable: disable the progress bar.
        decode: call ``run.decode`` on the final latents.

    Returns:
        ``(latents, decoded)``; ``decoded`` is ``None`` when not decoding.
    """
    latents = sample(
        run.student, run.x, run.sigmas, sampler=run.sampler, teacher=run.teacher, guidance=guidance,
        generator=generator, extra_args=run.extra_args, teacher_args=run.teacher_args, callback=callback,
        disable=disable, **run.sampler_kwargs,
    )
    decoded = run.decode(latents) if decode and run.decode is not None else None
    return latents, decoded


@dataclass(frozen=True)
class GuidanceDefaults:
    """Default teacher-guidance knobs of a pipeline or preset (SPEC section 4)."""

    strength: float = 0.05
    guided_steps: int = 1
    space: str = "x0"
    teacher_cfg: float = 7.5
    renoise: str = "next"
    noise: str = "random"
    samples: int = 1


def make_guidance(
    defaults: GuidanceDefaults,
    strength: Any = None,
    guided_steps: int | None = None,
    teacher_cfg: float | None = None,
    renoise: str | None = None,
    noise: str | None = None,
    space: str | None = None,
    samples: int | None = None,
) -> TeacherGuidance:
    """A :class:`TeacherGuidance` from a pipeline's defaults and the per-call overrides (``None`` = default)."""

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return TeacherGuidance(
        strength=pick(strength, defaults.strength),
        steps=pick(guided_steps, defaults.guided_steps),
        renoise=pick(renoise, defaults.renoise),
        noise=pick(noise, defaults.noise),
        space=pick(space, defaults.space),
        teacher_cfg=pick(teacher_cfg, defaults.teacher_cfg),
        samples=pick(samples, defaults.samples),
    )


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_call_args(generator: Any, num_images_per_prompt: Any, output_type: str | None = None) -> None:
    """The call arguments every family checks before any model runs (a ValueError naming the argument)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            "generator must be one torch.Generator or None (it drives every random draw), "
            f"got {type(generator).__name__}"
        )
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")


class GuidedPipeline(Protocol):
    """What every family's pipeline offers, so the CLI and benchmarks drive them alike."""

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
    ) -> DistillppPipelineOutput: ...

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "GuidedPipeline": ...


# --------------------------------------------------------------------------------------------
# Moving conditioning across devices.
# --------------------------------------------------------------------------------------------


def move_to(obj: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a nested dict/list/tuple to ``device`` (and floating tensors to ``dtype``)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype, non_blocking=True)
        return obj.to(device=device, non_blocking=True) if device is not None else obj
    if isinstance(obj, dict):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device, dtype) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# LoRA students: the teacher is the same model with its adapters switched off.
# --------------------------------------------------------------------------------------------


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@dataclass
class LoraState:
    """What peft/diffusers say about a model's LoRA adapters.

    Attributes:
        adapters: names of the adapters attached to the model.
        active: names of the active adapters.
        merged: adapters fused (merged) into the base weights while still attached.
        fused_and_unloaded: the owning pipeline reports fused LoRAs but the model has no adapter
            layers left (``fuse_lora()`` then ``unload_lora_weights()``): the base weights are gone.
        disabled: the adapters are currently switched off.
    """

    adapters: list[str]
    active: list[str]
    merged: list[str]
    fused_and_unloaded: bool
    disabled: bool

    @property
    def switchable(self) -> bool:
        return bool(self.adapters) and not self.merged and not self.fused_and_unloaded


def lora_state(model: torch.nn.Module, pipeline: Any = None) -> LoraState:
    """Inspect ``model``'s peft adapters (and ``pipeline.fused_loras`` when given)."""
    layers = _tuner_layers(model)
    adapters: set[str] = set()
    active: set[str] = set()
    merged: set[str] = set()
    for m in layers:
        for name in getattr(m, "adapter_layer_names", ()):
            adapters.update(getattr(m, name, {}).keys())
        act = m.active_adapter
        active.update([act] if isinstance(act, str) else act)
        merged.update(getattr(m, "merged_adapters", ()))
    fused = set(getattr(pipeline, "fused_loras", None) or ()) if pipeline is not None else set()
    disabled = bool(layers) and all(getattr(m, "disable_adapters", False) for m in layers)
    return LoraState(sorted(adapters), sorted(active), sorted(merged), bool(fused) and not layers, disabled)


def ensure_adapter_switchable(
    model: torch.nn.Module, pipeline: Any = None, unfuse: bool = False, component: str = "unet"
) -> LoraState:
    """Check that ``model``'s LoRA can be switched off for the teacher; unfuse it if asked.

    Args:
        model: the student's denoising network carrying the LoRA.
        pipeline: the owning diffusers pipeline (for its ``fused_loras`` record and ``unfuse_lora``).
        unfuse: unmerge a fused LoRA (with a warning about precision) instead of raising.
        component: the pipeline attribute holding ``model`` (``"unet"``, ``"transformer"``).

    Raises:
        ValueError: no adapter is attached, or the LoRA is fused and cannot (or may not) be undone.
    """
    state = lora_state(model, pipeline)
    if state.fused_and_unloaded:
        raise ValueError(
            f"teacher='adapter-off' needs the LoRA as a switchable adapter, but the pipeline reports fused "
            f"LoRAs {sorted(pipeline.fused_loras)} and the {component} has no adapter layers left (fuse_lora() then "
            "unload_lora_weights()): the base weights are gone. Reload the base model and load the LoRA with "
            "load_lora_weights() without fusing, or pass a separate teacher model."
        )
    if not state.adapters:
        raise ValueError(
            f"teacher='adapter-off' needs a LoRA adapter on the student {component}, but it has none; load one with "
            f"pipe.load_lora_weights(...) or pass a teacher model"
        )
    if state.merged:
        if not unfuse:
            raise ValueError(
                f"the LoRA adapter(s) {state.merged} are fused into the {component} weights, so they cannot be "
                "switched off for the teacher call. Load the LoRA without fuse_lora(), or pass unfuse=True to "
                "unmerge it (the recovered base weights carry the rounding error of fusing, larger in fp16)."
            )
        warnings.warn(
            f"unfusing LoRA adapter(s) {state.merged} from the {component} so the teacher can run with them off; the "
            "recovered base weights differ from the original by the rounding error of fuse/unfuse (larger in fp16); "
            "student steps are slightly slower unfused",
            stacklevel=3,
        )
        if pipeline is not None and hasattr(pipeline, "unfuse_lora"):
            pipeline.unfuse_lora(components=[component])
        else:
            for m in _tuner_layers(model):
                m.unmerge()
        state = lora_state(model, pipeline)
    if state.disabled:
        raise ValueError(
            f"the LoRA adapters of the student {component} are disabled, so the student would be the teacher; "
            "call enable_adapters() first"
        )
    return state


class AdapterOffNet:
    """A network call with the model's LoRA adapters disabled, restored afterwards (no weight copy).

    Args:
        net: ``net(model_input, timestep, **cond)`` over ``model``.
        model: the peft-adapted model (the student's UNet/transformer).
    """

    def __init__(self, net: Callable[..., torch.Tensor], model: torch.nn.Module):
        self.net = net
        self.model = model
        self._layers = _tuner_layers(model)
        if not self._layers:
            raise ValueError("AdapterOffNet needs a model with peft adapter layers")

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        """Context with every adapter layer of the model disabled; the previous state is restored."""
        if any(getattr(m, "merged", False) for m in self._layers):
            # peft would silently unmerge a fused layer on a disabled forward.
            raise ValueError("a LoRA adapter was fused into the weights after the pipeline was built; unfuse it")
        was_off = [bool(getattr(m, "disable_adapters", False)) for m in self._layers]
        for m in self._layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m, off in zip(self._layers, was_off):
                if not off:
                    m.enable_adapters(True)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        with self.adapters_off():
            return self.net(sample, timestep, **cond)


class PlacedNet:
    """A network living on another device: inputs are moved to it, the output back.

    Args:
        net: the network on ``device``.
        device: where ``net``'s weights live (e.g. ``"cuda:1"``).
    """

    def __init__(self, net: Callable[..., torch.Tensor], device: torch.device | str):
        self.net = net
        self.device = torch.device(device)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        back = sample.device
        out = self.net(sample.to(self.device), timestep.to(self.device), **move_to(cond, self.device))
        return out.to(back)


class OffloadedNet:
    """A network whose weights stay in (pinned) CPU memory and visit the execution device per call.

    Only host-to-device copies happen: the CPU copy is kept, so returning the weights is a
    pointer swap. Pinned memory makes the copy run at full PCIe/NVLink-C2C bandwidth.

    Args:
        net: the network over ``module``.
        module: its ``torch.nn.Module`` (moved to CPU here).
        execution_device: where the call runs (the student's device).
        pin_memory: pin the CPU copy (only with CUDA available).
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        module: torch.nn.Module,
        execution_device: torch.device | str,
        pin_memory: bool = True,
    ):
        self.net = net
        self.module = module.to("cpu")
        self.execution_device = torch.device(execution_device)
        pin = pin_memory and torch.cuda.is_available() and self.execution_device.type == "cuda"
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in list(module.parameters()) + list(module.buffers()):
            host = t.data.pin_memory() if pin else t.data
            t.data = host
            self._tensors.append((t, host))

    @contextlib.contextmanager
    def onloaded(self) -> Iterator[None]:
        """Context with the weights on the execution device."""
        for t, host in self._tensors:
            t.data = host.to(self.execution_device, non_blocking=True)
        try:
            yield
        finally:
            for t, host in self._tensors:
                t.data = host

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        with self.onloaded():
            return self.net(sample, timestep, **cond)


def place_teacher_net(
    net: Callable[..., torch.Tensor],
    module: torch.nn.Module,
    execution_device: torch.device | str,
    teacher_device: torch.device | str | None = None,
    teacher_offload: str | None = None,
) -> Callable[..., torch.Tensor]:
    """Wrap a separate teacher network for its placement.

    Args:
        net: the teacher network ``net(model_input, timestep, **cond)``.
        module: its ``torch.nn.Module``.
        execution_device: the student's device.
        teacher_device: keep the teacher on this device (default: the student's); inputs and outputs
            are moved across.
        teacher_offload: ``"cpu"``: keep the teacher in CPU memory and copy it to ``execution_device``
            for each call.

    Raises:
        ValueError: both placements given, or an unknown ``teacher_offload``.
    """
    if teacher_offload is not None and teacher_offload != "cpu":
        raise ValueError(f"teacher_offload must be None or 'cpu', got {teacher_offload!r}")
    if teacher_offload is not None and teacher_device is not None:
        raise ValueError("give teacher_device or teacher_offload, not both")
    execution_device = torch.device(execution_device)
    if teacher_offload == "cpu":
        return OffloadedNet(net, module, execution_device)
    device = torch.device(teacher_device) if teacher_device is not None else execution_device
    module.to(device)
    if device != execution_device:
        return PlacedNet(net, device)
    return net


# --------------------------------------------------------------------------------------------
# Weights: local folders or Hugging Face ids, never a hanging download.
# --------------------------------------------------------------------------------------------


class MissingWeightsError(FileNotFoundError):
    """The weights a preset needs are neither local folders nor in the Hugging Face cache."""


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``DIFFUSERS_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) forbids downloads."""
    for var in ("HF_HUB_OFFLINE", "DIFFUSERS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


@dataclass(frozen=True)
class WeightsRef:
    """One set of weights a preset needs: a Hugging Face repo (or local path), optionally one file.

    Attributes:
        repo: Hugging Face id (``owner/name``) or a local folder/file.
        filename: a single file inside the repo (LoRA, UNet state dict); ``None`` for a whole folder.
        subfolder: subfolder of a diffusers repo (``"unet"``).
        role: what it is for, shown in errors (``"student LoRA"``, ``"teacher"``).
        allow_patterns: files of a folder repo that are needed (shown in the download hint).
    """

    repo: str
    filename: str | None = None
    subfolder: str | None = None
    role: str = ""
    allow_patterns: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.repo)

    @property
    def is_hub_id(self) -> bool:
        """Looks like a Hugging Face id (``owner/name``) rather than a filesystem path."""
        return bool(re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", self.repo)) and not self.is_local

    def download_command(self) -> str:
        if self.filename:
            return f"huggingface-cli download {self.repo} {self.filename}"
        include = (" --include " + " ".join(f'"{p}"' for p in self.allow_patterns)) if self.allow_patterns else ""
        return f"huggingface-cli download {self.repo}{include}"

    def describe(self) -> str:
        what = self.repo + (f" (file {self.filename})" if self.filename else "")
        return f"{self.role}: {what}" if self.role else what


def resolve_weights(ref: WeightsRef, local_files_only: bool = True) -> str:
    """Local path of ``ref``: the folder/file itself, or the cached (or downloaded) snapshot/file.

    Raises:
        MissingWeightsError: not local and not in the cache (or downloading failed).
    """
    if ref.is_local:
        path = os.path.join(ref.repo, ref.filename) if ref.filename and os.path.isdir(ref.repo) else ref.repo
        if not os.path.exists(path):
            raise MissingWeightsError(f"{ref.describe()}: {path} does not exist")
        return path
    if not ref.is_hub_id:
        raise MissingWeightsError(
            f"{ref.describe()}: {ref.repo} is neither an existing local path nor a Hugging Face id"
        )
    local_files_only = local_files_only or offline_mode()
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if ref.filename:
            return hf_hub_download(ref.repo, ref.filename, subfolder=ref.subfolder, local_files_only=local_files_only)
        return snapshot_download(
            ref.repo, local_files_only=local_files_only, allow_patterns=list(ref.allow_patterns) or None
        )
    except Exception as e:  # huggingface_hub raises several types (LocalEntryNotFound, HTTP, OS errors)
        raise MissingWeightsError(f"{ref.describe()}: {type(e).__name__}: {e}") from e


def check_weights(refs: Sequence[WeightsRef], local_files_only: bool = True, what: str = "") -> dict[WeightsRef, str]:
    """Resolve every ref, or raise one :class:`MissingWeightsError` listing all missing ones and how to get them."""
    found: dict[WeightsRef, str] = {}
    missing: list[tuple[WeightsRef, str]] = []
    for ref in refs:
        try:
            found[ref] = resolve_weights(ref, local_files_only)
        except MissingWeightsError as e:
            missing.append((ref, str(e)))
    if missing:
        lines = [f"missing weights{' for ' + what if what else ''}:"]
        for ref, why in missing:
            lines.append(f"  - {ref.describe()}")
        lines.append("get them with (or pass local folders instead of the ids):")
        for ref, _ in missing:
            if ref.is_hub_id:
                lines.append(f"  {ref.download_command()}")
        if local_files_only or offline_mode():
            lines.append("(no download was attempted: local files only; pass download=True / --download to fetch)")
        details = [why for _, why in missing if "LocalEntryNotFound" not in why]
        if details:
            lines.append("details: " + "; ".join(details))
        raise MissingWeightsError("\n".join(lines))
    return found
