"""distillpp: inference-time teacher guidance for few-step distilled diffusion models.

Implements Distillation++ (Park, Lee, Ye, ICCV 2025, arXiv 2412.08871) over one denoiser
contract ``D(x, sigma, **cond) -> x0`` and pure-function samplers over explicit sigmas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names resolve on first use (PEP 562): importing the package costs no torch import, so the
# ``distillpp`` command answers --help and argument errors at once.
_LAZY = {
    "sample": "api", "check_sigmas": "api",
    "CFGDenoiser": "denoisers", "DiscreteVPDenoiser": "denoisers", "FlowDenoiser": "denoisers",
    "LCMDenoiser": "denoisers", "unet_fn": "denoisers", "transformer_fn": "denoisers",
    "GuidanceInfo": "guidance", "NonFiniteError": "guidance", "TeacherGuidance": "guidance",
    "SAMPLERS": "samplers",
    "DiscreteVPSchedule": "schedules",
    "tune": "tuning",
}
_SUBMODULES = ("denoisers", "schedules", "samplers")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
    from . import denoisers, samplers, schedules
    from .api import check_sigmas, sample
    from .denoisers import CFGDenoiser, DiscreteVPDenoiser, FlowDenoiser, LCMDenoiser, transformer_fn, unet_fn
    from .guidance import GuidanceInfo, NonFiniteError, TeacherGuidance
    from .samplers import SAMPLERS
    from .schedules import DiscreteVPSchedule
    from .tuning import tune

__version__ = "0.1.0"

__all__ = [
    "sample",
    "check_sigmas",
    "TeacherGuidance",
    "GuidanceInfo",
    "NonFiniteError",
    "SAMPLERS",
    "DiscreteVPSchedule",
    "DiscreteVPDenoiser",
    "LCMDenoiser",
    "FlowDenoiser",
    "CFGDenoiser",
    "unet_fn",
    "transformer_fn",
    "denoisers",
    "schedules",
    "samplers",
    "tune",
]
