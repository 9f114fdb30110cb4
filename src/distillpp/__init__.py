"""distillpp: inference-time teacher guidance for few-step distilled diffusion models.

Implements Distillation++ (Park, Lee, Ye, ICCV 2025, arXiv 2412.08871) over one denoiser
contract ``D(x, sigma, **cond) -> x0`` and pure-function samplers over explicit sigmas.
"""

from . import denoisers, schedules, samplers
from .api import check_sigmas, sample
from .denoisers import CFGDenoiser, DiscreteVPDenoiser, FlowDenoiser, LCMDenoiser, unet_fn
from .guidance import GuidanceInfo, NonFiniteError, TeacherGuidance
from .samplers import SAMPLERS
from .schedules import DiscreteVPSchedule

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
    "denoisers",
    "schedules",
    "samplers",
]
