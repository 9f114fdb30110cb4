"""``distillpp tune``: choose the teacher-guidance knobs of a student-teacher pair without any data.

The tuner sees only the two models and a handful of prompts (zoo: class names). It samples

- the **teacher reference**: the teacher alone, ``reference_steps`` deterministic (ODE) steps with its
  own CFG, from the same initial noise and prompts the candidates use. Made once and reused by every
  candidate; its cost is ``reference_steps`` teacher forwards per image (twice that with CFG);
- each **candidate** setting (strength 0, the plain student, is always the first): the guided student
  through the pipeline, from the same noise with the same per-image generators;

and scores a candidate by the **energy distance** (Szekely & Rizzo; ``distillpp.analytic.energy_distance``)
between its samples and the teacher reference in a feature space the teacher provides: the teacher
network's mid-level activations (UNet ``mid_block``, or the middle transformer block), spatially averaged,
for the sample re-noised to the smallest noise level of the reference grid (the same fresh noise for
every candidate), each feature standardised by the reference. Lower is better. docs/method.md
("Tuning") says why this criterion and not a per-sample distance; the per-sample RMS distance to the
teacher's sample from the same noise is reported beside it.

Search (a stated space, within a budget of model calls; the teacher at its own CFG scale unless said):
the plain student; each strength of :data:`STRENGTHS` with one guided step (renoise ``next``, fusion in
x0); each with two guided steps; the second step alone (``(0, lam)``) at the two best one-step
strengths; renoise ``same`` and ``random`` for the two best guided settings so far; the teacher without
CFG (scale 1) for the two best so far. It stops
before a candidate that would pass the budget. Forwards are counted as network evaluations times
images (a CFG forward counts twice, like :func:`distillpp.zoo.harness.sample_forwards`), student,
teacher and feature passes alike. The choice is the guided setting with the lowest criterion among those
that beat the plain student by more than ``margin`` bootstrap standard errors of the paired difference;
where none does, the plain student ("guidance does not pay for this pair").

The choice is written as a preset-override file (:func:`distillpp.pipelines.presets.load_overrides`)
that ``generate --overrides``, ``batch --overrides`` and ``from_preset(name, overrides=...)`` accept.
Tuning seeds (:data:`TUNE_SEED`) are separate from the evaluation seeds of ``benchmarks/fmnist_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from .cli import HelpFormatter, Parser, check_device, int_at_least, staged_outputs

__all__ = ["tune", "Setting", "Trial", "TuneResult", "PipelinePair", "STRENGTHS", "TUNE_SEED", "DEFAULT_BUDGET",
           "ZOO_IMAGES_PER_PROMPT", "add_arguments", "run", "main"]

# Strengths tried with one and with two guided steps (x0 fusion: the paper's space; eps fusion needs strengths ~100x
# smaller and is refused at flow time 1, so one grid cannot serve both).
STRENGTHS = (0.25, 0.5, 0.75, 1.0)
# Tuning seed: image k's generator is seeded image_seed(TUNE_SEED, k); benchmarks/fmnist_eval.py reports
# on seeds 0-2 and selects on 100-101.
TUNE_SEED = 7919
# Image-forwards (network evaluations x images). The zoo default (10 classes x 2 images, a 20-step
# teacher reference with CFG, the whole search: 17 candidates) needs about 3300 of them.
DEFAULT_BUDGET = 3500
# Images per prompt by default: 20 zoo images keep a CPU run short; only large effects are significant.
ZOO_IMAGES_PER_PROMPT = 2
DEFAULT_REFERENCE_STEPS = 20
# Prompts for text-to-image presets when none are given.
TEXT_PROMPTS = ("a photo of a cat sitting on a sofa", "a red sports car on a city street",
                "a bowl of fruit on a wooden table", "a mountain lake at sunrise")


@dataclass(frozen=True)
class Setting:
    """One candidate: the knobs the tuner varies (fusion space x0, one teacher draw, the preset's noise).

    Attributes:
        strength: ``lam``, or one ``lam`` per guided step (a tuple; ``(0, lam)`` guides the second step
            only); 0 is the plain student.
        guided_steps: leading steps guided (0 for the plain student).
        renoise: ``"next"``, ``"same"`` or ``"random"``.
        teacher_cfg: the teacher's CFG scale during guidance (``None``: the preset's).
    """

    strength: float | tuple[float, ...]
    guided_steps: int = 1
    renoise: str = "next"
    teacher_cfg: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.strength, list):  # from JSON (the dataclass is frozen: set the field directly)
            object.__setattr__(self, "strength", tuple(self.strength))

    @property
    def plain(self) -> bool:
        lams = self.strength if isinstance(self.strength, tuple) else (self.strength,)
        return all(v == 0 for v in lams) or self.guided_steps == 0

    def knobs(self) -> dict[str, Any]:
        """The ``"guidance"`` entry of a preset-override file."""
        if self.plain:
            return {"strength": 0.0, "guided_steps": 0}
        strength = list(self.strength) if isinstance(self.strength, tuple) else self.strength
        out: dict[str, Any] = {"strength": strength, "guided_steps": self.guided_steps,
                               "renoise": self.renoise, "space": "x0", "samples": 1}
        if self.teacher_cfg is not None:
            out["teacher_cfg"] = self.teacher_cfg
        return out

    def label(self) -> str:
        if self.plain:
            return "plain student (strength 0)"
        cfg = "" if self.teacher_cfg is None else f", teacher cfg {self.teacher_cfg:g}"
        lam = "/".join(f"{v:g}" for v in self.strength) if isinstance(self.strength, tuple) else f"{self.strength:g}"
        return f"x0 lam={lam}, {self.guided_steps} step{'s' if self.guided_steps > 1 else ''}, " \
               f"renoise {self.renoise}{cfg}"


@dataclass
class Trial:
    """One candidate's result: the criterion (energy distance to the teacher reference, lower is better),
    its paired bootstrap standard error against the plain student, the RMS distance to the teacher's sample
    from the same noise, and the forwards it used."""

    setting: Setting
    criterion: float
    se_vs_plain: float
    rms_to_teacher: float
    forwards: int
    seconds: float
    stage: str

    def as_dict(self) -> dict[str, Any]:
        return {"setting": asdict(self.setting), "label": self.setting.label(), "knobs": self.setting.knobs(),
                "criterion": self.criterion, "se_vs_plain": self.se_vs_plain, "rms_to_teacher": self.rms_to_teacher,
                "forwards": self.forwards, "seconds": round(self.seconds, 3), "stage": self.stage}


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        preset: the preset's name.
        chosen: the chosen :class:`Setting`.
        overrides: the preset-override mapping (what ``--out`` holds).
        trials: every candidate tried, in order.
        forwards: image-forwards used in all (reference, candidates, features).
        reference_forwards: of which the teacher reference.
        budget: the budget.
        seconds: wall time.
        reason: one sentence on why ``chosen`` was chosen.
        info: the run's parameters (prompts, images, seed, reference steps and CFG, feature layer, device).
    """

    preset: str
    chosen: Setting
    overrides: dict[str, Any]
    trials: list[Trial]
    forwards: int
    reference_forwards: int
    budget: int
    seconds: float
    reason: str
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "chosen": asdict(self.chosen), "chosen_label": self.chosen.label(),
                "overrides": self.overrides, "reason": self.reason, "forwards": self.forwards,
                "reference_forwards": self.reference_forwards, "budget": self.budget,
                "seconds": round(self.seconds, 2), "info": self.info, "trials": [t.as_dict() for t in self.trials]}

    def table(self) -> str:
        """The trials as a Markdown table (the chosen row marked)."""
        lines = ["| setting | energy distance to teacher ↓ | ± SE vs plain | RMS to teacher sample | forwards |",
                 "|---|---:|---:|---:|---:|"]
        for t in self.trials:
            mark = " **(chosen)**" if t.setting == self.chosen else ""
            se = "–" if t.setting.plain else f"{t.se_vs_plain:.4f}"
            lines.append(f"| {t.setting.label()}{mark} | {t.criterion:.4f} | {se} | {t.rms_to_teacher:.4f} | "
                         f"{t.forwards} |")
        return "\n".join(lines)


class _Counted:
    """A network that counts image-forwards (rows of its first argument) as it runs."""

    def __init__(self, net: Callable[..., Any]):
        self.net, self.count = net, 0

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        self.count += int(x.shape[0])
        return self.net(x, *args, **kwargs)


def _feature_module(module: Any) -> Any:
    """The teacher's mid-level block whose activations are the features (``None``: use its x0 output)."""
    if module is None:
        return None
    mid = getattr(module, "mid_block", None)
    if mid is not None:
        return mid
    blocks = getattr(module, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        return blocks[len(blocks) // 2]
    return None


def _pool(t: Any) -> Any:
    """Activations ``[B, C, H, W]`` / tokens ``[B, T, C]`` -> ``[B, C]`` (mean over positions)."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    if t.ndim == 4:
        return t.float().mean((2, 3))
    if t.ndim == 3:
        return t.float().mean(1)
    return t.float().flatten(1)


class PipelinePair:
    """The tuner's view of a :class:`~distillpp.pipelines.GuidedPipeline`: the guided student's samples, the
    teacher's reference from the same noise, teacher features, and counted forwards.

    Works for any family whose pipeline has a separate or adapter-off teacher: it uses the family's own
    encoding, initial noise and denoisers. Samples are compared as the pipeline's ``output_type="latent"``
    (the zoo: the 32 x 32 sample itself; diffusers families: VAE latents, never decoded).

    Args:
        pipe: the pipeline (its networks are wrapped with counters while the pair lives; :meth:`close`
            restores them).
        prompts: the prompts; ``images_per_prompt`` images each.
        seed: the tuning seed (image ``k``'s generator: :func:`distillpp.zoo.harness.image_seed`).
        reference_steps: teacher ODE steps of the reference.
        reference_cfg: the teacher's CFG scale for the reference (``None``: the teacher's own default).
    """

    def __init__(self, pipe: Any, prompts: Sequence[str], images_per_prompt: int, seed: int,
                 reference_steps: int, reference_cfg: float | None = None):
        import torch

        self.torch = torch
        self.pipe, self.prompts, self.per_prompt, self.seed = pipe, list(prompts), images_per_prompt, seed
        self.n = len(self.prompts) * images_per_prompt
        self.reference_steps = reference_steps
        fam = pipe.family
        self.reference_cfg = reference_cfg if reference_cfg is not None else _teacher_default_cfg(pipe)
        self._nets = (pipe._student_net, pipe._teacher_net)
        self.student_net, self.teacher_net = _Counted(pipe._student_net), _Counted(pipe._teacher_net)
        pipe._student_net, pipe._teacher_net = self.student_net, self.teacher_net
        self.feature_layer = _feature_module(fam.teacher_module)
        self.ref_sigmas = self._reference_sigmas()
        positive = [float(s) for s in self.ref_sigmas if float(s) > 0]
        # The smallest level the teacher steps from: the image is nearly clean, the features see its detail.
        self.feature_sigma = min(positive)
        self._feature_noise: Any = None
        self._ref_stats: Any = None

    def close(self) -> None:
        """Put the pipeline's own networks back."""
        self.pipe._student_net, self.pipe._teacher_net = self._nets

    @property
    def forwards(self) -> int:
        return self.student_net.count + self.teacher_net.count

    def generators(self) -> list[Any]:
        """One CPU generator per image, seeded by (tuning seed, image index): the same for every candidate."""
        from .zoo.harness import image_seed

        return [self.torch.Generator().manual_seed(image_seed(self.seed, k)) for k in range(self.n)]

    def _call(self, generators: Any) -> Any:
        call = self.pipe._call(self.prompts, None, None, None, None, None, None, None, self.per_prompt, generators,
                               None, "latent", {})
        return call

    def _reference_sigmas(self) -> Any:
        fam = self.pipe.family
        table = getattr(fam, "teacher_noise", None)
        if table is not None and hasattr(table, "rule"):  # a discrete VP teacher: DDIM grid on its own table
            return table.sigmas(self.reference_steps)
        return self.pipe.sigmas(num_inference_steps=self.reference_steps)

    def student_uses_cfg(self) -> bool:
        return bool(self.pipe.family.student_uses_cfg(self._call(None)))

    def reference_cost(self) -> int:
        """Image-forwards of the teacher reference (its feature pass not included)."""
        return self.n * self.reference_steps * (2 if self.reference_cfg != 1.0 else 1)

    def candidate_cost(self, setting: Setting, student_per_image: int) -> int:
        """Image-forwards of one candidate: the student, its teacher calls and the feature pass."""
        per = student_per_image + 1
        if not setting.plain:
            cfg = setting.teacher_cfg if setting.teacher_cfg is not None else self.pipe.guidance.teacher_cfg
            cfg = self.reference_cfg if cfg is None else cfg
            from .guidance import TeacherGuidance

            calls = TeacherGuidance(**setting.knobs()).teacher_calls(self.pipe.sigmas())
            per += calls * (2 if cfg != 1.0 else 1)
        return self.n * per

    def reference(self) -> Any:
        """The teacher's samples: ``reference_steps`` Euler (= DDIM, eta 0) steps from the candidates' noise."""
        from .api import sample

        fam, torch = self.pipe.family, self.torch
        call = self._call(self.generators())
        call.state["teacher_cfg"] = self.reference_cfg
        with torch.no_grad():
            cond = fam.encode(call, False, True)
            x = fam.initial(call, self.ref_sigmas, fam.noise_dtype(cond))
            teacher = fam.teacher_denoiser(self.teacher_net, call)
            return sample(teacher, x, self.ref_sigmas, sampler="euler", extra_args=cond.teacher, disable=True)

    def sample(self, setting: Setting) -> Any:
        """The guided student's latents for ``setting`` (plain student when its strength is 0)."""
        kw: dict[str, Any] = {"strength": 0.0} if setting.plain else {
            "strength": setting.strength, "guided_steps": setting.guided_steps, "renoise": setting.renoise,
            "space": "x0", "samples": 1}
        if not setting.plain and setting.teacher_cfg is not None:
            kw["teacher_cfg"] = setting.teacher_cfg
        out = self.pipe(self.prompts, num_images_per_prompt=self.per_prompt, generator=self.generators(),
                        output_type="latent", **kw)
        return out.images

    def features(self, latents: Any) -> Any:
        """``[N, F]`` teacher features of ``latents`` (standardised by the reference's statistics)."""
        fam, torch = self.pipe.family, self.torch
        if self._feature_noise is None:
            g = torch.Generator().manual_seed(self.seed + 1)
            self._feature_noise = torch.randn(tuple(latents.shape), generator=g, dtype=torch.float32)
        call = self._call(None)
        call.state["teacher_cfg"] = 1.0  # the conditional branch alone: one forward per image
        captured: list[Any] = []
        hook = self.feature_layer.register_forward_hook(lambda m, i, o: captured.append(_pool(o))) \
            if self.feature_layer is not None else None
        try:
            with torch.no_grad():
                cond = fam.encode(call, False, True)
                teacher = fam.teacher_denoiser(self.teacher_net, call)
                x = latents.float() + self.feature_sigma * self._feature_noise.to(latents.device)
                sigma = torch.full((x.shape[0],), self.feature_sigma, dtype=torch.float32, device=x.device)
                x0 = teacher(x, sigma, **(cond.teacher or {}))
        finally:
            if hook is not None:
                hook.remove()
        feats = captured[-1] if captured else _pool(x0)
        feats = feats.double()
        if self._ref_stats is None:  # the first call is the reference's: it defines the scale
            std = feats.std(0)
            # A channel (nearly) constant over the reference would blow up any candidate's deviation in it.
            self._ref_stats = (feats.mean(0), std.clamp(min=1e-3 * float(std.median()) + 1e-12))
        mean, std = self._ref_stats
        return (feats - mean) / std


def _teacher_default_cfg(pipe: Any) -> float:
    """The teacher's own CFG scale: a zoo teacher's trained default, else the preset's guidance teacher CFG."""
    teacher = getattr(pipe.family, "teacher", None)
    if teacher is not None and hasattr(teacher, "default_cfg"):
        return float(teacher.default_cfg)
    cfg = pipe.guidance.teacher_cfg
    return 1.0 if cfg is None else float(cfg)


def _energy_matrix(a: Any, b: Any) -> Any:
    """``2 |a_i - b_j| - |a_i - a_j| - |b_i - b_j|``: the energy-distance kernel of two paired sample sets."""
    import torch

    return 2 * torch.cdist(a, b) - torch.cdist(a, a) - torch.cdist(b, b)


def _energy(m: Any, counts: Any = None) -> Any:
    """Energy distance ``2 E|a-b'| - E|a-a'| - E|b-b'|`` over pairs of different samples, from :func:`_energy_matrix`.

    Sample ``i`` of both sets comes from the same initial noise, so ``|a_i - b_i|`` is a per-sample
    distance, not one between independent draws; leaving it in (as a plain two-sample estimate would)
    would mix per-sample matching into the distributional criterion, so pairs ``i = j`` are left out.

    Args:
        m: ``[n, n]`` kernel matrix.
        counts: ``[B, n]`` multiplicities of bootstrap draws (``None``: the sample itself); a sample drawn
            twice is not paired with itself, as above. Returns ``[B]`` values then, else a float.
    """
    if counts is None:
        n = m.shape[0]
        return float((m.sum() - m.diagonal().sum()) / (n * n - n))
    c = counts.to(m.dtype)
    total = ((c @ m) * c).sum(1) - (c * c) @ m.diagonal()
    pairs = c.sum(1) ** 2 - (c * c).sum(1)
    return total / pairs


def _check_args(preset: Any, prompts: Sequence[str] | None, images_per_prompt: int, budget: int, reference_steps: int,
                strengths: Sequence[float], seed: int, margin: float) -> list[str]:
    from .guidance import as_count, as_number

    if preset.teacher == "none":
        raise ValueError(f"preset {preset.name!r} has no teacher to tune guidance for; pick a student preset "
                         "(e.g. zoo-lcm, zoo-pd, zoo-flow-student)")
    if prompts is None:
        if preset.family == "zoo":
            from .zoo import CLASS_NAMES

            prompts = list(CLASS_NAMES)
        else:
            prompts = list(TEXT_PROMPTS)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    if preset.family == "zoo":
        from .pipelines.zoo import class_label

        for p in prompts:
            try:
                class_label(p)
            except ValueError as e:
                raise ValueError(f"prompts: {e}") from None
    as_count(images_per_prompt, "images_per_prompt", 1)
    if len(prompts) * images_per_prompt < 4:
        raise ValueError(f"prompts x images_per_prompt must give at least 4 images for a distance between "
                         f"sample sets, got {len(prompts)} x {images_per_prompt}")
    as_count(budget, "budget", 1)
    as_count(reference_steps, "reference_steps", 2)
    as_count(seed, "seed", 0)
    if isinstance(strengths, (str, bytes)) or not strengths:
        raise ValueError(f"strengths must be a non-empty list of numbers in (0, 1], got {strengths!r}")
    for s in strengths:
        v = as_number(s, "strengths")
        if not 0.0 < v <= 1.0:
            raise ValueError(f"strengths must be numbers in (0, 1] (strength 0 is always tried), got {s!r}")
    m = as_number(margin, "margin")
    if not (m >= 0 and math.isfinite(m)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    return list(prompts)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with staged_outputs(path) as (tmp,):
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def tune(
    preset: str | Any = None,
    prompts: Sequence[str] | None = None,
    *,
    images_per_prompt: int | None = None,
    budget: int = DEFAULT_BUDGET,
    reference_steps: int = DEFAULT_REFERENCE_STEPS,
    reference_cfg: float | None = None,
    strengths: Sequence[float] = STRENGTHS,
    seed: int = TUNE_SEED,
    margin: float = 2.0,
    bootstrap: int = 200,
    out: str | os.PathLike | None = None,
    results: str | os.PathLike | None = None,
    pipe: Any = None,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
    **load_options: Any,
) -> TuneResult:
    """Choose guidance settings for a student-teacher preset from the two models alone (no data set).

    The criterion, the search space and the budget accounting are described in this module's docstring
    and docs/method.md ("Tuning").

    Args:
        preset: a preset name or :class:`~distillpp.pipelines.presets.Preset` with a teacher; ``None`` with
            ``pipe=`` a pipeline built by hand (the override file then names no preset).
        prompts: the prompts (zoo: class names; default: the ten classes, or four generic prompts).
        images_per_prompt: images per prompt (default: 2).
        budget: the most image-forwards (network evaluations x images; CFG counts twice) to spend, the
            teacher reference included. Candidates that would pass it are not run.
        reference_steps: deterministic teacher steps of the reference sample.
        reference_cfg: the teacher's CFG scale for the reference (default: the teacher's own).
        strengths: x0 strengths tried with one and with two guided steps (strength 0 is always tried first).
        seed: tuning seed (keep it apart from evaluation seeds).
        margin: a guided setting is chosen only if it beats the plain student by more than ``margin``
            bootstrap standard errors of the paired criterion difference.
        bootstrap: bootstrap draws for those standard errors.
        out: write the chosen settings here as a preset-override file.
        results: write the results JSON here, updated after every candidate.
        pipe: an already loaded pipeline of ``preset`` (else loaded with ``load_options``).
        progress: show a progress bar (in image-forwards).
        log: called with one line per candidate.
        **load_options: :func:`distillpp.pipelines.from_preset` options (``device=``, ``torch_dtype=``...).

    Returns:
        A :class:`TuneResult`.

    Raises:
        ValueError: a bad argument (naming it) or a budget below the reference plus the plain student,
            before any model runs.
    """
    import torch

    from .guidance import as_count
    from .pipelines.presets import from_preset, get_preset

    t0 = time.perf_counter()
    if pipe is not None and getattr(pipe, "preset", None) is not None:
        p = pipe.preset
    elif preset is None:
        if pipe is None:
            raise ValueError("preset must be a preset name or Preset (or pass pipe=, a loaded GuidedPipeline)")
        # A pipeline built by hand (e.g. DistillppPipeline(student_pipe, teacher_unet)): no preset to name.
        p = SimpleNamespace(name=None, family=pipe.family.name, teacher=pipe.family.teacher_kind)
    else:
        p = get_preset(preset) if isinstance(preset, str) else preset
    if images_per_prompt is None:
        images_per_prompt = ZOO_IMAGES_PER_PROMPT
    prompts = _check_args(p, prompts, images_per_prompt, budget, reference_steps, strengths, seed, margin)
    as_count(bootstrap, "bootstrap", 10)
    out_path = Path(out) if out is not None else None
    results_path = Path(results) if results is not None else None
    for name, path in (("out", out_path), ("results", results_path)):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            raise ValueError(f"{name} must be a file path in an existing folder, got {str(path)!r}")
    if pipe is None:
        pipe = from_preset(p, **load_options)
    if not pipe.has_teacher:
        raise ValueError(f"preset {p.name!r} has no teacher to tune guidance for")
    pair = PipelinePair(pipe, prompts, images_per_prompt, seed, reference_steps, reference_cfg)
    say = log or (lambda line: None)
    try:
        student_per_image = pipe.num_inference_steps * (2 if pair.student_uses_cfg() else 1)
        steps = pipe.num_inference_steps
        minimum = pair.reference_cost() + pair.n + pair.candidate_cost(Setting(0.0), student_per_image)
        if budget < minimum:
            raise ValueError(
                f"budget must be at least {minimum} image-forwards for {pair.n} images (teacher reference "
                f"{pair.reference_cost()} + features + plain student), got {budget}; lower images_per_prompt or "
                "reference_steps, or raise the budget")
        info = {"prompts": prompts, "images_per_prompt": images_per_prompt, "images": pair.n, "seed": seed,
                "reference_steps": reference_steps, "reference_cfg": pair.reference_cfg,
                "feature_layer": type(pair.feature_layer).__name__ if pair.feature_layer is not None else "x0 output",
                "feature_sigma": pair.feature_sigma, "student_steps": steps, "margin": margin,
                "strengths": list(strengths), "device": str(pipe.device),
                "criterion": "energy distance between teacher features of the guided student's and the teacher's "
                             "samples (lower is better)",
                "sample_space": "latent" if p.family != "zoo" else "sample (32x32, [-1, 1])"}
        trials: list[Trial] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=budget, desc=f"tune {p.name}", unit="fwd", dynamic_ncols=True)

        def advance() -> None:
            if bar is not None:
                bar.n = min(pair.forwards, budget)
                bar.refresh()

        def snapshot(chosen: Setting | None = None, reason: str = "running") -> dict[str, Any]:
            return {"preset": p.name, "status": reason, "forwards": pair.forwards, "budget": budget,
                    "seconds": round(time.perf_counter() - t0, 2), "info": info,
                    "chosen": asdict(chosen) if chosen else None, "trials": [t.as_dict() for t in trials]}

        ref = pair.reference()
        ref_feats = pair.features(ref)
        reference_forwards = pair.forwards
        advance()
        say(f"teacher reference: {pair.n} images, {reference_steps} steps, CFG {pair.reference_cfg:g}: "
            f"{reference_forwards} forwards ({time.perf_counter() - t0:.1f} s)")
        plain_matrix = None
        gen = torch.Generator().manual_seed(seed + 2)
        draws = torch.randint(0, pair.n, (bootstrap, pair.n), generator=gen)
        counts = torch.zeros(bootstrap, pair.n, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(bootstrap, pair.n, dtype=torch.float64)).to(ref_feats.device)
        tried: dict[Setting, Trial] = {}

        def evaluate(setting: Setting, stage: str) -> Trial | None:
            nonlocal plain_matrix
            if setting in tried:
                return tried[setting]
            cost = pair.candidate_cost(setting, student_per_image)
            if pair.forwards + cost > budget:
                say(f"skipped (budget): {setting.label()} needs {cost} forwards, {budget - pair.forwards} left")
                return None
            start, t = pair.forwards, time.perf_counter()
            x = pair.sample(setting)
            feats = pair.features(x)
            matrix = _energy_matrix(feats, ref_feats)
            crit = _energy(matrix)
            se = 0.0
            if plain_matrix is None:
                plain_matrix = matrix
            else:
                se = float((_energy(matrix, counts) - _energy(plain_matrix, counts)).std())
            rms = float((x.float().cpu() - ref.float().cpu()).flatten(1).pow(2).mean(1).sqrt().mean())
            trial = Trial(setting, crit, se, rms, pair.forwards - start, time.perf_counter() - t, stage)
            trials.append(trial)
            tried[setting] = trial
            advance()
            say(f"{setting.label():<52} energy {crit:8.4f}  SE vs plain {se:.4f}  RMS to teacher {rms:.4f}  "
                f"{trial.forwards} fwd")
            if results_path is not None:
                _write_json(results_path, snapshot())
            return trial

        # The teacher's CFG is explicit in every candidate (its own scale, then 1 below), so the search does not
        # depend on whatever guidance the preset carries.
        own = pair.reference_cfg
        plain = evaluate(Setting(0.0), "plain")
        assert plain is not None  # the minimum budget covers it
        for s in strengths:
            evaluate(Setting(float(s), 1, "next", own), "strength")

        def best_guided() -> Trial | None:
            guided = [t for t in trials if not t.setting.plain]
            return min(guided, key=lambda t: t.criterion) if guided else None

        def top(k: int, where: Callable[[Trial], bool] = lambda t: True) -> list[Trial]:
            return sorted((t for t in trials if not t.setting.plain and where(t)), key=lambda t: t.criterion)[:k]

        if steps >= 2:
            for s in strengths:
                evaluate(Setting(float(s), 2, "next", own), "guided steps")
            # Which step: the second step only, at the two best one-step strengths.
            for t in top(2, lambda t: t.setting.guided_steps == 1):
                evaluate(Setting((0.0, t.setting.strength), 2, "next", own), "second step only")
        for t in top(2):
            for renoise in ("same", "random"):
                evaluate(Setting(t.setting.strength, t.setting.guided_steps, renoise, own), "renoise")
        if own != 1.0:
            for t in top(2):
                evaluate(Setting(t.setting.strength, t.setting.guided_steps, t.setting.renoise, 1.0), "teacher cfg")
        b = best_guided()
        # Among the guided settings that beat the plain student by more than `margin` standard errors of the
        # paired difference, the lowest criterion; none: the plain student.
        paying = [t for t in trials if not t.setting.plain and t.criterion < plain.criterion - margin * t.se_vs_plain]
        if paying:
            win = min(paying, key=lambda t: t.criterion)
            chosen = win.setting
            reason = (f"it beats the plain student by {plain.criterion - win.criterion:.4g} "
                      f"(> {margin:g} x SE {win.se_vs_plain:.2g})")
        else:
            chosen = plain.setting
            reason = ("no guided setting beat the plain student by more than the noise of the criterion: "
                      "guidance does not pay for this pair" if b is not None else
                      "the budget allowed no guided candidate")
            if b is not None:
                reason += (f" (best guided: {b.setting.label()}, {plain.criterion - b.criterion:+.4g} vs "
                           f"{margin:g} x SE {b.se_vs_plain:.2g})")
        if bar is not None:
            bar.close()
        overrides = {"preset": p.name, "guidance": chosen.knobs()} if p.name else {"guidance": chosen.knobs()}
        if out_path is not None:
            _write_json(out_path, overrides)
        result = TuneResult(p.name, chosen, overrides, trials, pair.forwards, reference_forwards, budget,
                            time.perf_counter() - t0, reason, info)
        if results_path is not None:
            _write_json(results_path, {**snapshot(chosen, "done"), **result.as_dict()})
        return result
    finally:
        pair.close()


# ----------------------------------------------------------------------------- the command


def _strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in (0, 1], got {text!r}") from None
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in (0, 1], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tune`` options to ``parser``."""
    parser.description = (
        "Choose teacher-guidance settings for a student-teacher preset without any data set: candidates "
        "(strength 0 always among them) are scored by the energy distance between teacher features of the "
        "guided student's samples and the teacher's own many-step samples from the same noise. Prints what it "
        "tried and writes the choice as a preset-override file for generate/batch --overrides.")
    parser.add_argument("--preset", required=True, help="a student preset with a teacher (e.g. zoo-pd)")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                        help="prompts to tune on (zoo: class names; default: the ten classes, or four generic "
                             "prompts for text-to-image presets)")
    parser.add_argument("--images-per-prompt", type=int_at_least(1), default=ZOO_IMAGES_PER_PROMPT, metavar="N",
                        help="images per prompt")
    parser.add_argument("--budget", type=int_at_least(1), default=DEFAULT_BUDGET, metavar="N",
                        help="most image-forwards to spend (network evaluations x images, CFG counts twice; the "
                             "teacher reference included)")
    parser.add_argument("--reference-steps", type=int_at_least(2), default=DEFAULT_REFERENCE_STEPS, metavar="N",
                        help="deterministic teacher steps of the reference samples")
    parser.add_argument("--reference-cfg", type=float, default=None, metavar="W",
                        help="the teacher's CFG scale for the reference (default: the teacher's own)")
    parser.add_argument("--strengths", type=_strengths, default=list(STRENGTHS), metavar="LAM[,LAM...]",
                        help=f"x0 strengths tried with one and with two guided steps (default: "
                             f"{','.join(map(str, STRENGTHS))}; 0 is always tried)")
    parser.add_argument("--margin", type=float, default=2.0, metavar="K",
                        help="choose a guided setting only if it beats the plain student by > K bootstrap SEs")
    parser.add_argument("--seed", type=int_at_least(0), default=TUNE_SEED, help="tuning seed (keep it apart from "
                                                                                 "evaluation seeds)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="weights dtype (default: float32 on cpu, float16 on cuda)")
    parser.add_argument("--out", default="tuned_overrides.json", metavar="FILE",
                        help="preset-override file to write (for generate/batch --overrides)")
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="results JSON, updated after every candidate (default: next to --out, *_results.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-candidate lines")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``distillpp tune``; returns the exit status (2: bad arguments)."""
    from .pipelines.presets import get_preset

    prog = "distillpp tune"
    try:
        preset = get_preset(args.preset)
        out = Path(args.out)
        results = Path(args.results) if args.results else out.with_name(out.stem + "_results.json")
        for name, path in (("--out", out), ("--results", results)):
            if path.is_dir() or not path.parent.is_dir():
                raise ValueError(f"{name} must be a file in an existing folder, got {str(path)!r}")
        if args.margin < 0 or not math.isfinite(args.margin):
            raise ValueError(f"--margin must be a finite number >= 0, got {args.margin}")
        device = check_device(args.device)
        _check_args(preset, args.prompts, args.images_per_prompt, args.budget, args.reference_steps, args.strengths,
                    args.seed, args.margin)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else None)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        result = tune(preset, args.prompts, images_per_prompt=args.images_per_prompt, budget=args.budget,
                      reference_steps=args.reference_steps, reference_cfg=args.reference_cfg,
                      strengths=args.strengths, seed=args.seed, margin=args.margin, out=out, results=results,
                      progress=not args.quiet, log=log, device=device, torch_dtype=dtype)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    print()
    print(f"chosen: {result.chosen.label()}: {result.reason}")
    print(f"{result.forwards} of {result.budget} image-forwards ({result.reference_forwards} for the teacher "
          f"reference), {result.seconds:.1f} s")
    print(f"wrote {out} (use: distillpp generate --preset {preset.name} --overrides {out}) and {results}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distillpp.tuning``."""
    parser = add_arguments(Parser(prog="distillpp tune", formatter_class=HelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
