"""An offline model zoo on Fashion-MNIST: teachers, distilled students and a classifier.

Five small class-conditional UNets (about 2.7M parameters each) trained by
``distillpp train ...`` (see :mod:`distillpp.zoo.train` and ``benchmarks/zoo_gpu.sh``):

============== ====== ============ ===== ===== ==============================================
name           family sampler      steps CFG   what it is
============== ====== ============ ===== ===== ==============================================
teacher        vp     ddim         50    2.0   eps-prediction DDPM, linear betas, trailing grid
lcm            vp     consistency  4     baked consistency distillation of the CFG teacher
pd             vp     ddim         4     baked progressive distillation of the CFG teacher
flow-teacher   flow   euler        50    2.0   rectified flow, velocity ``eps - x0``
flow-student   flow   euler        4     baked reflow of the CFG flow teacher
============== ====== ============ ===== ===== ==============================================

Students have the teacher's CFG scale baked in and run conditional-only (``default_cfg=1``).
Class 10 is the null label. Example::

    import torch
    from distillpp import zoo, sample, TeacherGuidance

    student, teacher = zoo.load("lcm"), zoo.load("teacher")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8) % 10
    sigmas = student.sigmas()  # lcm: 4 steps, t = 999, 759, 499, 259
    x = student.initial(torch.randn(8, 1, 32, 32, generator=gen), sigmas)
    out = sample(student.denoiser, x, sigmas, sampler=student.sampler, extra_args=student.args(labels),
                 teacher=teacher.denoiser, guidance=TeacherGuidance(strength=0.1), generator=gen)
    images = zoo.to_images(out)  # uint8 [8, 1, 28, 28]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..denoisers import CFGDenoiser, DiscreteVPDenoiser, FlowDenoiser, LCMDenoiser, unet_fn
from ..schedules import DiscreteVPSchedule, ddim_sigmas, flow_time_to_sigma, initial_sample, lcm_sigmas
from .data import NULL_LABEL

__all__ = [
    "ZOO_NAMES",
    "CLASS_NAMES",
    "NULL_LABEL",
    "TEACHER_OF",
    "MODELS_DIR",
    "TEACHER_CFG",
    "ZooModel",
    "load",
    "load_classifier",
    "to_images",
    "flow_grid",
    "model_dir",
]

ZOO_NAMES = ("teacher", "lcm", "pd", "flow-teacher", "flow-student")
# Fashion-MNIST's classes, by label; prompts of the zoo presets.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Each student's teacher.
TEACHER_OF = {"lcm": "teacher", "pd": "teacher", "flow-student": "flow-teacher"}
MODELS_DIR = Path(__file__).resolve().parent / "models"
# The teachers' CFG scale w in D_u + w (D_c - D_u); the students were distilled with it baked in.
TEACHER_CFG = 2.0


@dataclass(frozen=True)
class _Spec:
    family: str  # "vp" or "flow"
    denoiser: str  # "vp", "lcm" or "flow"
    sampler: str
    default_steps: int
    default_cfg: float
    grid: str  # "trailing" (DDIM trailing timesteps), "lcm" (LCMScheduler) or "flow" (uniform flow time)


_SPECS = {
    "teacher": _Spec("vp", "vp", "ddim", 50, TEACHER_CFG, "trailing"),
    "lcm": _Spec("vp", "lcm", "consistency", 4, 1.0, "lcm"),
    "pd": _Spec("vp", "vp", "ddim", 4, 1.0, "trailing"),
    "flow-teacher": _Spec("flow", "flow", "euler", 50, TEACHER_CFG, "flow"),
    "flow-student": _Spec("flow", "flow", "euler", 4, 1.0, "flow"),
}


def flow_grid(steps: int) -> torch.Tensor:
    """VE sigmas of ``steps`` Euler steps evenly spaced in flow time, ``s = 1, 1 - 1/n, ..., 1/n``, then 0.

    Unlike ``FlowMatchEulerDiscreteScheduler`` (whose last step runs from ``s = 1/1000`` to 0, so
    4 steps are effectively 3) every step covers the same flow time.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = 1.0 - np.arange(steps, dtype=np.float64) / steps
    return torch.cat([flow_time_to_sigma(s), torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


@dataclass
class ZooModel:
    """A loaded zoo model with everything needed to sample it.

    Attributes:
        name: one of :data:`ZOO_NAMES`.
        family: ``"vp"`` or ``"flow"``.
        denoiser: a :class:`~distillpp.CFGDenoiser` over the family denoiser, scale ``default_cfg``.
        sampler: the sampler the model is meant for (a :data:`distillpp.SAMPLERS` key).
        default_steps: its usual number of steps.
        default_cfg: the teacher's CFG scale; 1.0 for students (their CFG is baked in).
        schedule: the discrete VP noise table, or ``None`` for flow models.
        net: the underlying ``UNet2DModel``.
        clip: the x0 clamp of its scheduler config (:func:`clip_range`), or ``None``.
    """

    name: str
    family: str
    denoiser: CFGDenoiser
    sampler: str
    default_steps: int
    default_cfg: float
    schedule: DiscreteVPSchedule | None
    net: Any = None
    grid: str = "trailing"
    clip: float | None = None

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The grid this model is meant for, with ``steps`` steps (default :attr:`default_steps`).

        Teacher and ``pd``: DDIM with ``timestep_spacing="trailing"`` (4 steps: t = 999, 749, 499, 249);
        ``lcm``: ``LCMScheduler`` (4 steps: t = 999, 759, 499, 259); flow models: :func:`flow_grid`.
        """
        n = self.default_steps if steps is None else int(steps)
        if self.grid == "flow":
            return flow_grid(n)
        assert self.schedule is not None
        if self.grid == "lcm":
            return lcm_sigmas(self.schedule, n)
        return ddim_sigmas(self.schedule, n, timestep_spacing="trailing")

    def initial(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The starting sample at ``sigmas[0]`` for unit Gaussian ``noise`` (pure noise for both families)."""
        return initial_sample(noise, sigmas, self.family)

    def args(self, labels: torch.Tensor | Sequence[int] | int) -> dict[str, Any]:
        """``extra_args`` for :func:`distillpp.sample`: the class labels and the null label for CFG."""
        device = next(self.net.parameters()).device if self.net is not None else None
        y = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        return {"cond": {"class_labels": y}, "uncond": {"class_labels": torch.full_like(y, NULL_LABEL)}}


def model_dir(name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """The folder of one zoo model (or ``"classifier"``); raises a clear error when it holds no weights."""
    from .nets import WEIGHTS_NAME

    root = Path(models_dir) if models_dir is not None else MODELS_DIR
    folder = root / name
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / "config.json").is_file():
        out = "" if models_dir is None else f" --out {root}"
        raise FileNotFoundError(
            f"no weights for zoo model {name!r}: {folder} has no config.json + {WEIGHTS_NAME}. Train them with "
            f"`distillpp train {name}{out}` (students need their teacher first), or run "
            "benchmarks/zoo_gpu.sh on a GPU and copy its models folder there."
        )
    return folder


def clip_range(config: dict[str, Any]) -> float | None:
    """The x0 clamp a scheduler config asks for: ``clip_sample_range`` (default 1) when ``clip_sample``
    is true, else ``None``.

    The VP teacher clamps its x0 estimate to the data range ``[-1, 1]``, as DDPM pixel models do (and
    diffusers' DDIM ``clip_sample``). Without it, the briefly trained eps-prediction teacher at CFG 2 puts
    x0 estimates far outside the data range at the high-noise steps (samples reached -2.4..5.0), and
    DDIM carries the excess into isolated saturated pixels: the salt-and-pepper speckle of the earlier
    zoo. Students distilled from it inherit the flag through their scheduler config.
    """
    return float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else None


def load(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    models_dir: str | os.PathLike | None = None,
) -> ZooModel:
    """Load a zoo model as a ready-to-sample :class:`ZooModel`.

    Args:
        name: one of :data:`ZOO_NAMES`.
        device: where to put the network.
        dtype: network dtype (samples and sigma arithmetic stay float32).
        models_dir: folder holding ``<name>/`` (default: the package's :data:`MODELS_DIR`).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the weights are missing (says how to train them).
    """
    from diffusers import UNet2DModel

    if name not in _SPECS:
        raise ValueError(f"name must be one of {', '.join(repr(n) for n in ZOO_NAMES)}; got {name!r}")
    spec = _SPECS[name]
    folder = model_dir(name, models_dir)
    unet = UNet2DModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval().requires_grad_(False)
    schedule, clip = None, None
    if spec.family == "vp":
        config = json.loads((folder / "scheduler_config.json").read_text())
        schedule = DiscreteVPSchedule.from_config(config)
        clip = clip_range(config)
        cls = LCMDenoiser if spec.denoiser == "lcm" else DiscreteVPDenoiser
        inner = cls(unet_fn(unet), schedule, config.get("prediction_type", "epsilon"), dtype=dtype)
    else:
        inner = FlowDenoiser(unet_fn(unet), timestep_scale=1000.0, dtype=dtype)
    return ZooModel(
        name=name, family=spec.family, denoiser=CFGDenoiser(inner, spec.default_cfg, clip=clip), sampler=spec.sampler,
        default_steps=spec.default_steps, default_cfg=spec.default_cfg, schedule=schedule, net=unet, grid=spec.grid,
        clip=clip,
    )


def load_classifier(device: torch.device | str = "cpu", models_dir: str | os.PathLike | None = None):
    """The zoo's Fashion-MNIST classifier (:class:`~distillpp.zoo.nets.ZooClassifier`), float32, eval mode."""
    from .nets import ZooClassifier

    folder = model_dir("classifier", models_dir)
    return ZooClassifier.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)


def to_images(x: torch.Tensor, crop: bool = True) -> torch.Tensor:
    """Samples in [-1, 1] to uint8 in 0..255 on the CPU, same layout.

    ``crop`` removes the 2-pixel padding of 32 x 32 samples (back to Fashion-MNIST's 28 x 28).
    """
    if crop and x.shape[-1] == 32 and x.shape[-2] == 32:
        x = x[..., 2:30, 2:30]
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
