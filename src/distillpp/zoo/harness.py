"""Sampling the Fashion-MNIST zoo for evaluation: a method is a zoo model, a step count, and
optional teacher guidance; every method draws the same initial noise for the same seed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..api import sample
from ..guidance import TeacherGuidance
from . import TEACHER_OF

__all__ = [
    "TEACHER_OF",
    "Method",
    "get_zoo",
    "load_test_set",
    "ModelCache",
    "initial_noise",
    "generate",
    "sample_forwards",
    "teacher_calls",
    "image_seed",
]



def get_zoo() -> Any:
    """The :mod:`distillpp.zoo` module (imported lazily: it loads weights from the package)."""
    from .. import zoo

    return zoo


def load_test_set(zoo: Any = None, data_dir: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST test images (``[N, 1, 32, 32]`` in [-1, 1]) and labels, through the zoo's data module.

    Raises:
        FileNotFoundError: the data set is not installed (the message says how to install it).
    """
    data = (zoo if zoo is not None else get_zoo()).data
    load = getattr(data, "load_fashion_mnist", None) or data.load_split
    images, labels = load("test", data_dir=data_dir)
    return torch.as_tensor(images).float().cpu(), torch.as_tensor(labels).long().cpu()


@dataclass(frozen=True)
class Method:
    """One way of sampling a zoo model.

    Args:
        model: zoo name (``"teacher"``, ``"lcm"``, ``"pd"``, ``"flow-teacher"``, ``"flow-student"``).
        steps: sampler steps (``None``: the model's default).
        cfg: CFG scale of the sampled model (``None``: the model's default for teachers, 1.0 for
            students, which have CFG distilled in).
        guidance: :class:`~distillpp.TeacherGuidance` keyword arguments (JSON-able: ``strength`` a number
            or a list), or ``None`` for the model alone. ``teacher_cfg=None`` means the teacher's default.
        label: display name (default: built from the fields).
    """

    model: str
    steps: int | None = None
    cfg: float | None = None
    guidance: Mapping[str, Any] | None = field(default=None, hash=False)
    label: str | None = field(default=None, compare=False)

    @property
    def teacher(self) -> str | None:
        return TEACHER_OF.get(self.model) if self.guidance else None

    def key(self) -> str:
        """A stable string identifying the method (for result caches)."""
        d = {"model": self.model, "steps": self.steps, "cfg": self.cfg,
             "guidance": dict(sorted(self.guidance.items())) if self.guidance else None}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def describe(self, model: Any = None) -> str:
        """A one-line name, e.g. ``lcm (consistency, 4 steps) + guided (x0 λ=0.3, 1 step)``.

        Args:
            model: the loaded zoo model, to name its sampler, default steps and CFG scale.
        """
        if self.label:
            return self.label
        if model is not None:
            cfg = self.resolved_cfg(model)
            text = f"{self.model} ({model.sampler}, {self.resolved_steps(model)} steps"
            text += (f", CFG {cfg:g})" if cfg != 1.0 else ")")
        else:
            text = self.model + (f" {self.steps} steps" if self.steps else "")
            if self.cfg is not None:
                text += f" cfg {self.cfg:g}"
        if self.guidance:
            g = self.guidance
            lam = g.get("strength")
            lam = "/".join(f"{v:g}" for v in lam) if isinstance(lam, (list, tuple)) else f"{lam:g}"
            text += f" + guided ({g.get('space', 'x0')} λ={lam}, {g.get('steps', 1)} step"
            text += "s" if g.get("steps", 1) != 1 else ""
            for name, default in (("renoise", "next"), ("samples", 1), ("noise", "random")):
                if g.get(name, default) != default:
                    text += f", {name} {g[name]}"
            if g.get("teacher_cfg") is not None:
                text += f", teacher cfg {g['teacher_cfg']:g}"
            text += ")"
        return text

    def build_guidance(self, teacher: Any) -> TeacherGuidance | None:
        if not self.guidance:
            return None
        kw = dict(self.guidance)
        if kw.get("teacher_cfg") is None:
            kw["teacher_cfg"] = teacher.default_cfg
        if isinstance(kw.get("strength"), list):
            kw["strength"] = tuple(kw["strength"])
        return TeacherGuidance(**kw)

    def resolved_steps(self, model: Any) -> int:
        return int(self.steps if self.steps is not None else model.default_steps)

    def resolved_cfg(self, model: Any) -> float:
        if self.cfg is not None:
            return float(self.cfg)
        return 1.0 if self.model in TEACHER_OF else float(model.default_cfg)


class ModelCache:
    """Loads each zoo model (and the classifier) once.

    Args:
        zoo: the zoo module (or a stand-in with the same ``load``/``load_classifier``).
        device, dtype, models_dir: passed to ``zoo.load``.
    """

    def __init__(self, zoo: Any = None, device: Any = "cpu", dtype: torch.dtype = torch.float32, models_dir=None):
        self.zoo = zoo if zoo is not None else get_zoo()
        self.device, self.dtype, self.models_dir = torch.device(device), dtype, models_dir
        self._models: dict[str, Any] = {}
        self._classifier: Any = None

    def __getitem__(self, name: str) -> Any:
        if name not in self._models:
            self._models[name] = self.zoo.load(name, device=self.device, dtype=self.dtype, models_dir=self.models_dir)
        return self._models[name]

    def classifier(self) -> Any:
        if self._classifier is None:
            clf = self.zoo.load_classifier(device=self.device, models_dir=self.models_dir)
            self._classifier = clf.eval() if hasattr(clf, "eval") else clf
        return self._classifier


def initial_noise(seed: int, n: int, shape: tuple[int, ...] = (1, 32, 32)) -> torch.Tensor:
    """``[n, *shape]`` unit Gaussian noise from a CPU generator seeded ``seed`` (same on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s generator in a run seeded ``seed`` (sampler and guidance noise).

    Mixed by numpy's ``SeedSequence`` into 32 bits: torch's CPU generator keys its stream on the low
    32 bits of a seed only, so packing ``(seed, index)`` into one large integer would repeat streams.
    """
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(index), 1_000_003]).generate_state(1)[0])


def teacher_calls(method: Method, models: ModelCache) -> int:
    """Guided steps that run the teacher: a step whose strength is 0 does not (the guide skips it), so
    strengths ``(0, lam)`` cost one call."""
    if not method.guidance:
        return 0
    m = models[method.model]
    g = method.build_guidance(models[method.teacher])
    return g.teacher_calls(m.sigmas(method.resolved_steps(m)))


def sample_forwards(method: Method, models: ModelCache) -> int:
    """Network evaluations per image (a CFG forward counts twice, K teacher draws K times; a guided step
    whose strength is 0 does not call the teacher)."""
    m = models[method.model]
    n = method.resolved_steps(m) * (2 if method.resolved_cfg(m) != 1.0 else 1)
    if method.guidance:
        g = method.build_guidance(models[method.teacher])
        n += teacher_calls(method, models) * g.samples * (2 if float(g.teacher_cfg) != 1.0 else 1)
    return n


def _with_cfg(args: Mapping[str, Any], cfg: float) -> dict[str, Any]:
    return {**args, "cfg_scale": cfg}


@torch.no_grad()
def generate(
    method: Method,
    models: ModelCache,
    labels: torch.Tensor,
    noise: torch.Tensor,
    seed: int,
    batch_size: int = 1000,
    progress: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Sample ``method`` for ``labels`` from the given initial ``noise``.

    Args:
        method: what to sample.
        models: loaded zoo models.
        labels: ``[N]`` class labels.
        noise: ``[N, C, H, W]`` unit Gaussian noise (see :func:`initial_noise`); scaled to the model's
            first sigma by ``model.initial``.
        seed: seeds each image's generator (:func:`image_seed`: fresh noise of ancestral/consistency
            steps, re-noising), so a sample depends on its seed and index, not on ``batch_size``.
        batch_size: images per sampler call.
        progress: called with the number of images finished after each batch.

    Returns:
        ``[N, C, H, W]`` float32 samples on the CPU.
    """
    model = models[method.model]
    device = models.device
    steps, cfg = method.resolved_steps(model), method.resolved_cfg(model)
    sigmas = model.sigmas(steps)
    teacher = models[method.teacher] if method.guidance else None
    guidance = method.build_guidance(teacher) if teacher is not None else None
    out = []
    for start in range(0, labels.shape[0], batch_size):
        y = labels[start : start + batch_size].to(device)
        x = model.initial(noise[start : start + batch_size].to(device), sigmas)
        # One generator per image, seeded by (seed, image index): a sample does not depend on the batch size.
        generators = [torch.Generator(device=device).manual_seed(image_seed(seed, start + k)) for k in range(len(y))]
        x = sample(
            model.denoiser, x, sigmas, sampler=model.sampler, generator=generators,
            extra_args=_with_cfg(model.args(y), cfg),
            teacher=teacher.denoiser if teacher is not None else None, guidance=guidance,
            teacher_args=teacher.args(y) if teacher is not None else None,
        )
        out.append(x.float().cpu())
        if progress is not None:
            progress(y.shape[0])
    return torch.cat(out)
