"""diffusers pipelines with teacher guidance: real students and teachers, presets, CLI.

- :mod:`.base`: the family-neutral core (:class:`GuidedRun`, :func:`run_guided`, teacher placement,
  LoRA adapter switching, weights resolution);
- :mod:`.presets`: named student/teacher pairs (:data:`PRESETS`, :func:`register_preset`,
  :func:`from_preset`);
- :mod:`.sd`: SD1.5 / SD2 / SDXL UNets (:class:`DistillppPipeline`);
- :mod:`.flow`: FLUX / SD3 transformers (:class:`FlowDistillppPipeline`);
- :mod:`.cli`: ``distillpp generate``.
"""

from __future__ import annotations

from typing import Any

from .base import (
    DistillppPipelineOutput,
    GuidanceDefaults,
    GuidedRun,
    MissingWeightsError,
    WeightsRef,
    run_guided,
)
from .presets import PRESETS, Preset, from_preset, get_preset, list_presets, register_family, register_preset

__all__ = [
    "DistillppPipeline",
    "FlowDistillppPipeline",
    "DistillppPipelineOutput",
    "GuidanceDefaults",
    "GuidedRun",
    "MissingWeightsError",
    "WeightsRef",
    "run_guided",
    "PRESETS",
    "Preset",
    "from_preset",
    "get_preset",
    "list_presets",
    "register_family",
    "register_preset",
]


def __getattr__(name: str) -> Any:
    # The SD pipeline imports diffusers' pipeline classes; load it only when asked for.
    if name == "DistillppPipeline":
        from .sd import DistillppPipeline

        return DistillppPipeline
    if name == "FlowDistillppPipeline":
        from .flow import FlowDistillppPipeline

        return FlowDistillppPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
