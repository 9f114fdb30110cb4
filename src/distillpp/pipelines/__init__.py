"""Guided pipelines: one :class:`GuidedPipeline` over small model-family adapters, presets, CLI.

- :mod:`.core`: :class:`GuidedPipeline` (argument checks, guidance, teacher placement, the guided
  run, decoding) and the :class:`ModelFamily` hooks a family implements;
- :mod:`.noise`: noise families (discrete VP through the diffusers-scheduler registry; rectified flow);
- :mod:`.presets`: named student/teacher pairs (:data:`PRESETS`, :func:`from_preset`, override files);
- families, one module each: :mod:`.sd` (SD1.5/SD2/SDXL UNets), :mod:`.flow` (FLUX and SD3
  transformers), :mod:`.pixart` (PixArt-alpha/Sigma transformers), :mod:`.zoo` (the Fashion-MNIST zoo);
- :mod:`.lora` (a LoRA student's teacher is its network with the adapter off), :mod:`.placement`
  (teacher on another device or offloaded), :mod:`.weights` (local folders, the Hugging Face cache,
  clear errors for missing weights);
- :mod:`.cli`: ``distillpp generate``.
"""

from __future__ import annotations

from typing import Any

from .core import GUIDANCE_KNOBS, DistillppPipelineOutput, GuidedPipeline, ModelFamily
from .presets import (
    PRESETS,
    Preset,
    from_preset,
    get_preset,
    list_presets,
    load_overrides,
    register_family,
    register_preset,
)
from .weights import MissingWeightsError, WeightsRef

__all__ = [
    "GuidedPipeline",
    "ModelFamily",
    "DistillppPipeline",
    "FlowDistillppPipeline",
    "DistillppPipelineOutput",
    "GUIDANCE_KNOBS",
    "MissingWeightsError",
    "WeightsRef",
    "PRESETS",
    "Preset",
    "from_preset",
    "get_preset",
    "list_presets",
    "load_overrides",
    "register_family",
    "register_preset",
]


def __getattr__(name: str) -> Any:
    # Family modules import diffusers' pipeline classes; load them only when asked for.
    if name == "DistillppPipeline":
        from .sd import DistillppPipeline

        return DistillppPipeline
    if name == "FlowDistillppPipeline":
        from .flow import FlowDistillppPipeline

        return FlowDistillppPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
