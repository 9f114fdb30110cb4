"""LoRA students: the teacher is the same network with its adapters switched off.

No second copy of the weights: :class:`AdapterOffNet` disables every peft adapter layer for the
teacher's call and restores the previous state afterwards. A LoRA fused into the weights cannot be
switched off; :func:`ensure_adapter_switchable` detects that and refuses (or unfuses on request).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = ["LoraState", "lora_state", "ensure_adapter_switchable", "AdapterOffNet"]


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
