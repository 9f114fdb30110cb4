"""``distillpp ui``: a local web app that shows what the teacher changes.

For one preset, prompt (zoo presets: a Fashion-MNIST class) and a few seeds it samples the few-step
student alone and the student with its teacher correcting the first steps (Distillation++, Park, Lee,
Ye, ICCV 2025, arXiv 2412.08871), from the same initial noise, side by side; optionally the teacher's
own many-step image for the same seeds; and plots how far each guided step moved the student's
estimate (``GuidanceInfo.correction``, the RMS of ``x0 - x0_student`` per image). The settings of each
result are shown as a ``distillpp generate`` command line and as Python. ``--overrides FILE`` starts the
app on a preset-override file's preset and settings (``distillpp tune`` writes such files), checked as
``distillpp generate --overrides`` checks them.

The app is offline: it listens on 127.0.0.1 unless ``--host`` says otherwise, Gradio's telemetry and
version check are off, share links are never made, and weights are only downloaded when
``--download`` is given. Gradio is an optional dependency (``pip install distillpp[ui]``).

Everything except :func:`build_app` and :func:`run` works without Gradio, so the sampling, input
checks and reproduction strings are tested directly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "Request",
    "Result",
    "Backend",
    "parse_request",
    "preset_defaults",
    "command_line",
    "python_code",
    "correction_rows",
    "build_app",
    "add_arguments",
    "run",
    "serve",
    "guided_presets",
    "teacher_preset",
    "read_overrides",
    "INSTALL_HINT",
]

INSTALL_HINT = "distillpp ui needs Gradio: pip install 'distillpp[ui]'"

DEFAULT_PRESET = "zoo-lcm"
MAX_SEEDS = 16
# Zoo images are 28 x 28: shown enlarged (nearest neighbour, so pixels stay crisp) or a browser blurs them.
MIN_DISPLAY_SIZE = 168

Strength = float | tuple[float, ...]


@dataclass(frozen=True)
class Request:
    """One set of UI settings, checked (see :func:`parse_request`).

    Attributes:
        preset: preset name.
        prompt: the prompt (zoo: a class name or "0".."9").
        seeds: one image per seed; the same seeds for student, guided student and teacher.
        strength: ``lam``, or one value per guided step.
        guided_steps, renoise, noise, space, teacher_cfg, samples, noise_mix: the TeacherGuidance knobs
            (``teacher_cfg=None``: the preset's; ``noise_mix`` is used, and passed on, with ``noise="hybrid"`` only).
        steps: student steps (``None``: the preset's).
        with_teacher: also sample the teacher alone (zoo presets).
        teacher_steps: the teacher's steps when sampled alone (``None``: its preset's).
    """

    preset: str
    prompt: str
    seeds: tuple[int, ...]
    strength: Strength
    guided_steps: int
    renoise: str = "next"
    noise: str = "random"
    space: str = "x0"
    teacher_cfg: float | None = None
    samples: int = 1
    noise_mix: float = 0.5
    steps: int | None = None
    with_teacher: bool = False
    teacher_steps: int | None = None

    def guidance_kwargs(self) -> dict[str, Any]:
        """The pipeline call's guidance overrides (TeacherGuidance field names)."""
        kw: dict[str, Any] = {
            "strength": list(self.strength) if isinstance(self.strength, tuple) else self.strength,
            "guided_steps": self.guided_steps, "renoise": self.renoise, "noise": self.noise,
            "space": self.space, "samples": self.samples,
        }
        if self.teacher_cfg is not None:
            kw["teacher_cfg"] = self.teacher_cfg
        if self.noise == "hybrid":
            kw["noise_mix"] = self.noise_mix
        return kw


@dataclass
class Result:
    """What one request produced.

    Attributes:
        request: the settings.
        student, guided: one PIL image per seed, the plain student and the teacher-guided student.
        teacher: the teacher's own images per seed, or ``None``.
        corrections: per student step, the correction size of each seed (0 where the step was not guided).
        seconds: wall time of each part (``"student"``, ``"guided"``, ``"teacher"``).
        notes: remarks shown under the images (e.g. why there is no teacher column).
    """

    request: Request
    student: list[Any]
    guided: list[Any]
    teacher: list[Any] | None
    corrections: list[list[float]]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _seeds(text: Any) -> tuple[int, ...]:
    from .cli import parse_int_list  # the seed syntax every distillpp command shares

    tokens = list(text) if isinstance(text, (list, tuple)) else str(text or "").split()
    seeds = parse_int_list(tokens, "seeds")
    if any(s >= 2**63 for s in seeds):
        raise ValueError(f"seeds must be below 2**63, got {max(seeds)}")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"seeds: at most {MAX_SEEDS} at once, got {len(seeds)}")
    return tuple(dict.fromkeys(seeds))


def _number(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _count(value: Any, name: str, low: int) -> int | None:
    v = _number(value, name)
    if v is None:
        return None
    if v != int(v) or v < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(v)


def _strength(strength: Any, per_step: Any) -> Strength:
    text = str(per_step or "").strip()
    if text:
        try:
            values = tuple(float(v) for v in text.replace(",", " ").split())
        except ValueError:
            raise ValueError(f"per-step strengths must be numbers separated by commas, got {text!r}") from None
        bad = [v for v in values if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"per-step strengths must each be in [0, 1], got {bad[0]:g}")
        return values[0] if len(values) == 1 else values
    v = _number(strength, "strength")
    if v is None:
        raise ValueError("strength is empty")
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise ValueError(f"strength must be in [0, 1], got {v:g}")
    return v


def parse_request(
    preset: Any,
    prompt: Any,
    seeds: Any,
    strength: Any = 0.1,
    per_step: Any = "",
    guided_steps: Any = 1,
    steps: Any = None,
    renoise: Any = "next",
    noise: Any = "random",
    space: Any = "x0",
    teacher_cfg: Any = None,
    samples: Any = 1,
    with_teacher: Any = False,
    teacher_steps: Any = None,
    noise_mix: Any = 0.5,
) -> Request:
    """Check raw UI values and build a :class:`Request`.

    Args:
        preset: a registered preset name.
        prompt: non-empty text (zoo: a class name or index; the pipeline checks which).
        seeds: ``"0, 1"``, ``"0 1"``, ``"0-3"`` or a list of integers (at most :data:`MAX_SEEDS`).
        strength: ``lam`` in [0, 1]; ignored when ``per_step`` is given.
        per_step: optional comma-separated strengths, one per guided step.
        guided_steps: leading steps the teacher guides (>= 0).
        steps: student steps, empty for the preset's.
        renoise, noise, space: TeacherGuidance choices (checked by it).
        teacher_cfg: teacher CFG scale, empty for the preset's.
        samples: K teacher draws per guided step (>= 1).
        with_teacher: also sample the teacher alone.
        teacher_steps: the teacher's own steps, empty for its preset's.
        noise_mix: weight of fresh noise in ``noise="hybrid"``, in [0, 1] (empty: 0.5).

    Raises:
        ValueError: a readable message naming the setting.
    """
    from .guidance import TeacherGuidance
    name = str(preset or "").strip()
    if not name:
        raise ValueError("preset is empty: pick one from the list")
    if name not in guided_presets():
        raise ValueError(f"preset {name!r} is not a student preset with a teacher; choose one of "
                         f"{', '.join(guided_presets())}")
    text = str(prompt or "").strip()
    if not text:
        raise ValueError("prompt is empty: type a prompt (zoo presets: a Fashion-MNIST class such as Sneaker)")
    n_guided = _count(guided_steps, "guided steps", 0)
    req = Request(
        preset=name,
        prompt=text,
        seeds=_seeds(seeds),
        strength=_strength(strength, per_step),
        guided_steps=1 if n_guided is None else n_guided,
        renoise=str(renoise),
        noise=str(noise),
        space=str(space),
        teacher_cfg=_number(teacher_cfg, "teacher CFG"),
        samples=_count(samples, "K (teacher samples)", 1) or 1,
        steps=_count(steps, "student steps", 1),
        with_teacher=bool(with_teacher),
        teacher_steps=_count(teacher_steps, "teacher steps", 1),
        noise_mix=_or(_number(noise_mix, "noise mix"), 0.5),
    )
    # The remaining range checks (choices, strength list length, finite CFG) are TeacherGuidance's own.
    kw = req.guidance_kwargs()
    TeacherGuidance(**{**kw, "teacher_cfg": kw.get("teacher_cfg"), "noise_mix": req.noise_mix})
    if isinstance(req.strength, tuple) and len(req.strength) < req.guided_steps:
        raise ValueError(f"per-step strengths: {req.guided_steps} guided steps need {req.guided_steps} values, "
                         f"got {len(req.strength)}")
    return req


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def preset_defaults(name: str, overrides: str | os.PathLike | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The UI's starting values for a preset: its steps and guidance knobs, and whether it is a zoo preset.

    Args:
        name: a preset name.
        overrides: a preset-override file or mapping applied to the preset first
            (:func:`~distillpp.pipelines.presets.apply_overrides`).

    A per-step strength (a tuple) fills ``per_step``; ``strength`` then holds its first value. So does a
    single strength off the slider's 0.01 grid (a tuned value), which a browser's slider would round.
    """
    from .pipelines import get_preset
    from .pipelines.presets import apply_overrides

    p = get_preset(name)
    if overrides is not None:
        p = apply_overrides(p, overrides)
    g = p.guidance
    teacher = teacher_preset(name)
    strength = getattr(g, "strength", 0.1)
    values = [float(v) for v in strength] if isinstance(strength, (list, tuple)) else [float(strength)]
    on_grid = len(values) == 1 and abs(values[0] * 100 - round(values[0] * 100)) < 1e-9
    return {
        "zoo": _is_zoo(name),
        "steps": int(p.num_inference_steps),
        "strength": values[0] if values else 0.0,
        "per_step": "" if on_grid else ", ".join(_text(v) for v in values),
        "guided_steps": int(getattr(g, "guided_steps", 1)),
        "renoise": getattr(g, "renoise", "next"),
        "noise": getattr(g, "noise", "random"),
        "space": getattr(g, "space", "x0"),
        "teacher_cfg": getattr(g, "teacher_cfg", None),
        "samples": int(getattr(g, "samples", 1)),
        "noise_mix": float(getattr(g, "noise_mix", 0.5)),
        "teacher_steps": int(get_preset(teacher).num_inference_steps) if teacher else None,
    }


def read_overrides(path: str | os.PathLike, preset: str | None = None) -> str:
    """Check a preset-override file (``distillpp tune`` writes them) for ``distillpp ui --overrides``.

    The file is read and applied with :func:`~distillpp.pipelines.presets.apply_overrides`, as
    ``distillpp generate --overrides`` does, and the controls it fills must form a valid request.

    Args:
        path: the JSON file.
        preset: ``--preset``, or ``None`` for the preset the file names (else :data:`DEFAULT_PRESET`).

    Returns:
        The preset the app starts on.

    Raises:
        ValueError: one line starting with ``--overrides:`` (unreadable file, unknown fields, a preset
            the app does not offer or other than ``preset``, an invalid value).
    """
    import torch

    from .pipelines import get_preset
    from .pipelines.presets import apply_overrides, load_overrides

    try:
        made_for = load_overrides(path).get("preset")
        name = preset or made_for or DEFAULT_PRESET
        if name not in guided_presets():
            raise ValueError(f"preset {name!r} is not offered by distillpp ui (it offers the students with a "
                             f"teacher: {', '.join(guided_presets())})")
        p = apply_overrides(get_preset(name), path)
        # The sampler's own check (guided steps within the steps, one strength per guided step).
        p.guidance.strengths(torch.zeros(int(p.num_inference_steps) + 1))
        d = preset_defaults(name, path)
        parse_request(name, "0", "0", d["strength"], d["per_step"], d["guided_steps"], d["steps"], d["renoise"],
                      d["noise"], d["space"], d["teacher_cfg"], d["samples"], False, None, d["noise_mix"])
    except ValueError as err:
        raise ValueError(f"--overrides: {err}") from None
    return name


def _is_zoo(name: str) -> bool:
    from .pipelines import get_preset

    return get_preset(name).family == "zoo"


def teacher_preset(name: str) -> str | None:
    """The preset that samples ``name``'s teacher alone with its own many-step sampler, if there is one.

    Zoo students have one (``zoo-lcm`` -> ``zoo-teacher``); diffusers presets do not, so the
    teacher column is offered for the zoo only.
    """
    from .pipelines import get_preset, list_presets

    p = get_preset(name)
    candidate = f"zoo-{p.teacher}"
    if p.family == "zoo" and candidate in list_presets() and get_preset(candidate).teacher == "none":
        return candidate
    return None


def guided_presets() -> list[str]:
    """The presets the app offers: those with a teacher to guide them, zoo presets first."""
    from .pipelines import get_preset, list_presets

    names = [n for n in list_presets() if get_preset(n).teacher != "none"]
    return sorted(names, key=lambda n: (not _is_zoo(n), n))


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

Progress = Callable[[float, str], None]


class Backend:
    """Loads presets once and samples student / guided / teacher images for a :class:`Request`.

    Args:
        device: torch device for every pipeline.
        download: let presets fetch missing weights (``distillpp ui --download``); otherwise only
            local folders and the Hugging Face cache are used.
        max_pipelines: pipelines kept loaded; the least recently used is dropped first.
        overrides: preset name -> preset-override file loaded with that preset (``distillpp ui --overrides``);
            the reproduction strings name the file too.
    """

    def __init__(self, device: str = "cpu", download: bool = False, max_pipelines: int = 4,
                 overrides: Mapping[str, str] | None = None):
        self.device = device
        self.download = bool(download)
        self.overrides = dict(overrides or {})
        self._pipes: OrderedDict[str, Any] = OrderedDict()
        self.max_pipelines = max(1, int(max_pipelines))

    def pipeline(self, name: str) -> Any:
        """The loaded pipeline of preset ``name`` (cached). Raises ``MissingWeightsError`` with the fetch hints."""
        if name in self._pipes:
            self._pipes.move_to_end(name)
            return self._pipes[name]
        from .pipelines import from_preset

        kwargs: dict[str, Any] = {"device": self.device}
        if name in self.overrides:
            kwargs["overrides"] = self.overrides[name]
        if not _is_zoo(name):
            kwargs["download"] = self.download
        pipe = from_preset(name, **kwargs)
        self._pipes[name] = pipe
        while len(self._pipes) > self.max_pipelines:
            self._pipes.popitem(last=False)
        return pipe

    def generate_pair(self, req: Request, progress: Progress | None = None) -> Result:
        """Sample the plain student, the guided student and (optionally) the teacher for the same seeds.

        Each image gets its own generator seeded with its seed, so an image depends only on its seed
        and settings, not on the other seeds in the request.

        Args:
            req: the settings.
            progress: ``progress(fraction, description)``, called after every sampler step.
        """
        import torch

        pipe = self.pipeline(req.preset)
        if not getattr(pipe, "has_teacher", True):
            raise ValueError(f"preset {req.preset!r} has no teacher to guide it; pick a student preset")
        n_steps = req.steps or int(pipe.preset.num_inference_steps)
        teacher_name = teacher_preset(req.preset) if req.with_teacher else None
        teacher_pipe = self.pipeline(teacher_name) if teacher_name else None
        teacher_steps = 0
        if teacher_pipe is not None:
            teacher_steps = req.teacher_steps or int(teacher_pipe.preset.num_inference_steps)
        total = 2 * n_steps + teacher_steps
        done = [0]

        def tick(label: str) -> None:
            done[0] += 1
            if progress is not None:
                progress(min(done[0] / total, 1.0), label)

        prompts = [req.prompt] * len(req.seeds)

        def gens() -> list[torch.Generator]:
            return [torch.Generator("cpu").manual_seed(s) for s in req.seeds]

        common = {"num_inference_steps": req.steps, "output_type": "pil"} if req.steps else {"output_type": "pil"}
        kw = req.guidance_kwargs()
        corrections = [[0.0] * len(req.seeds) for _ in range(n_steps)]

        def on_guided_step(d: dict[str, Any]) -> None:
            info = d.get("guidance")
            if info is not None and 0 <= int(d["i"]) < n_steps:
                corrections[int(d["i"])] = [float(c) for c in info.correction.detach().float().cpu().reshape(-1)]
            tick(f"student + teacher: step {int(d['i']) + 1}/{n_steps}")

        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        # The plain student is the same call with strength 0, which never calls the teacher.
        plain = pipe(prompts, generator=gens(), **common, **{**kw, "strength": 0.0},
                     callback=lambda d: tick(f"student: step {int(d['i']) + 1}/{n_steps}"))
        seconds["student"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        guided = pipe(prompts, generator=gens(), **common, **kw, callback=on_guided_step)
        seconds["guided"] = time.perf_counter() - t0
        teacher = None
        notes = []
        if teacher_pipe is not None:
            t0 = time.perf_counter()
            teacher = teacher_pipe(prompts, generator=gens(), output_type="pil", num_inference_steps=teacher_steps,
                                   callback=lambda d: tick(f"teacher: step {int(d['i']) + 1}/{teacher_steps}")).images
            seconds["teacher"] = time.perf_counter() - t0
        elif req.with_teacher:
            notes.append(f"no teacher-only preset for {req.preset}: the teacher column is offered for zoo presets")
        return Result(req, list(plain.images), list(guided.images), teacher, corrections, seconds, notes)


# ---------------------------------------------------------------------------------------------
# Reproduction strings and plot data
# ---------------------------------------------------------------------------------------------


def _text(value: float) -> str:
    # The shortest text that reads back as the same float (a tuned 0.123456 stays exact), without a bare ".0".
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _strength_text(strength: Strength) -> str:
    return ",".join(_text(v) for v in strength) if isinstance(strength, tuple) else _text(strength)


def command_line(req: Request, device: str | None = None, overrides: str | None = None) -> str:
    """The ``distillpp generate`` command that samples the guided images of ``req`` (and, with
    ``--side-by-side``, the plain student next to them).

    Args:
        req: the settings.
        device: ``--device``, if any.
        overrides: the preset-override file the app loaded the preset with (``--overrides``); it carries
            the fields without a control (e.g. timesteps), the flags give every knob the page shows.
    """
    args = ["distillpp", "generate", "--preset", req.preset]
    if overrides:
        args += ["--overrides", os.fspath(overrides)]
    args += ["--prompt", req.prompt, "--seeds", *[str(s) for s in req.seeds]]
    if req.steps is not None:
        args += ["--steps", str(req.steps)]
    args += ["--strength", _strength_text(req.strength), "--guided-steps", str(req.guided_steps),
             "--renoise", req.renoise, "--noise", req.noise, "--space", req.space]
    if req.teacher_cfg is not None:
        args += ["--teacher-cfg", _text(req.teacher_cfg)]
    if req.noise == "hybrid":
        args += ["--noise-mix", _text(req.noise_mix)]
    args += ["--samples", str(req.samples), "--side-by-side"]
    if device:
        args += ["--device", device]
    return " ".join(shlex.quote(a) for a in args)


def python_code(req: Request, device: str = "cpu", overrides: str | None = None) -> str:
    """Python that samples the guided and the plain-student images of ``req`` with ``from_preset``.

    Args:
        req: the settings.
        device: the pipelines' device.
        overrides: the preset-override file the app loaded the preset with (see :func:`command_line`).
    """
    kw = req.guidance_kwargs()
    if req.steps is not None:
        kw = {"num_inference_steps": req.steps, **kw}
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    steps = "" if req.steps is None else f"num_inference_steps={req.steps}, "
    lines = [
        "import torch",
        "from distillpp.pipelines import from_preset",
        "",
        f"pipe = from_preset({req.preset!r}, "
        + (f"overrides={os.fspath(overrides)!r}, " if overrides else "") + f"device={device!r})",
        f"seeds = {list(req.seeds)!r}",
        "def generators():  # one per image: each image depends only on its own seed",
        "    return [torch.Generator('cpu').manual_seed(s) for s in seeds]",
        f"prompts = [{req.prompt!r}] * len(seeds)",
        "guided = pipe(",
        textwrap.fill(f"prompts, generator=generators(), {args},", 88, initial_indent="    ",
                      subsequent_indent="    ", break_long_words=False),
        ").images",
        f"student = pipe(prompts, generator=generators(), {steps}strength=0.0).images  # no teacher call",
    ]
    teacher = teacher_preset(req.preset) if req.with_teacher else None
    if teacher:
        t_steps = "" if req.teacher_steps is None else f", num_inference_steps={req.teacher_steps}"
        lines += [f"teacher_pipe = from_preset({teacher!r}, device={device!r})",
                  f"teacher = teacher_pipe(prompts, generator=generators(){t_steps}).images"]
    return "\n".join(lines + [""])


def correction_rows(result: Result) -> list[dict[str, Any]]:
    """One row per (student step, seed): ``{"step", "correction", "seed"}`` for the plot.

    Steps are labels (``"1"``, ``"2"``, ...), so the plot's axis shows whole steps only.
    """
    return [
        {"step": f"{i + 1}", "correction": c, "seed": f"seed {seed}"}
        for i, per_seed in enumerate(result.corrections)
        for seed, c in zip(result.request.seeds, per_seed)
    ]


def summary(result: Result) -> str:
    """A one-paragraph Markdown account of a result."""
    req = result.request
    guided = max((max(cs) for cs in result.corrections if cs), default=0.0)
    step = next((i + 1 for i, cs in enumerate(result.corrections) if cs and max(cs) == guided), None)
    t = result.seconds
    parts = [f"**{req.preset}**, “{req.prompt}”, {len(req.seeds)} seed{'s' if len(req.seeds) != 1 else ''}: "
             f"{len(result.corrections)} student steps, {req.guided_steps} guided "
             f"(strength {_strength_text(req.strength)}, {req.space}, renoise {req.renoise}). ",
             f"Student {t.get('student', 0):.2f} s, guided {t.get('guided', 0):.2f} s"]
    if "teacher" in t:
        parts.append(f", teacher {t['teacher']:.2f} s")
    parts.append(". ")
    if guided > 0 and step is not None:
        parts.append(f"Largest correction {guided:.4f} (RMS of x0 change) at step {step}.")
    else:
        parts.append("The teacher did not change anything (strength 0 or no guided step).")
    return "".join(parts) + "".join(f"\n\n_{n}_" for n in result.notes)


def _display(images: Sequence[Any] | None, seeds: Sequence[int]) -> list[tuple[Any, str]]:
    from PIL import Image

    out = []
    for img, seed in zip(images or [], seeds):
        side = max(img.size)
        if side < MIN_DISPLAY_SIZE:
            k = -(-MIN_DISPLAY_SIZE // side)
            img = img.resize((img.width * k, img.height * k), Image.NEAREST)
        out.append((img, f"seed {seed}"))
    return out


# ---------------------------------------------------------------------------------------------
# The Gradio app
# ---------------------------------------------------------------------------------------------


def _error_text(err: BaseException) -> str:
    from .pipelines import MissingWeightsError

    if isinstance(err, MissingWeightsError):
        hint = "" if "--download" in str(err) else " (or restart with `distillpp ui --download`)"
        return f"**Weights missing.**{hint}\n\n```\n{err}\n```"
    if isinstance(err, (ValueError, FileNotFoundError)):
        return f"**Error:** {err}"
    return f"**Unexpected error** ({type(err).__name__}): {err}. The app keeps running; details are in the terminal."


def _import_gradio() -> Any:
    # Telemetry and the PyPI version check are off before Gradio is first imported.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return gr


CSS = """
#distillpp-title h1 { margin-bottom: 0; }
/* zoo images are 28 x 28: keep their pixels sharp when the gallery scales them */
#student img, #guided img, #teacher img { image-rendering: pixelated; }
"""


def build_app(backend: Backend, preset: str = DEFAULT_PRESET) -> Any:
    """The Gradio ``Blocks`` of the app (not launched).

    Args:
        backend: samples the images; its ``overrides`` (preset -> override file) set that preset's
            starting values.
        preset: the preset selected at start.
    """
    gr = _import_gradio()
    import pandas as pd

    from .zoo import CLASS_NAMES

    presets = guided_presets()
    if preset not in presets:
        raise ValueError(f"preset must be one of {', '.join(presets)}; got {preset!r}")
    d = preset_defaults(preset, backend.overrides.get(preset))

    with gr.Blocks(title="distillpp: teacher-guided sampling", analytics_enabled=False) as app:
        gr.Markdown(
            "# distillpp: what the teacher changes\n"
            "The few-step student alone, and the same student with its teacher correcting the first steps "
            "(Distillation++), from the same noise per seed.", elem_id="distillpp-title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                w_preset = gr.Dropdown(presets, value=preset, label="Preset",
                                       info="zoo-* run offline on a CPU; others need local weights or --download")
                w_class = gr.Dropdown(list(CLASS_NAMES), value="Sneaker", label="Class", visible=d["zoo"],
                                      elem_id="class")
                w_prompt = gr.Textbox("Sneaker" if d["zoo"] else "", label="Prompt", visible=not d["zoo"],
                                      elem_id="prompt")
                w_seeds = gr.Textbox("0, 1, 2, 3", label="Seeds", info="comma-separated, or a range like 0-7",
                                     elem_id="seeds")
                with gr.Row():
                    w_strength = gr.Slider(0.0, 1.0, value=d["strength"], step=0.01, label="Strength λ",
                                           elem_id="strength")
                    w_guided = gr.Slider(0, max(8, d["guided_steps"]), value=d["guided_steps"], step=1,
                                         label="Guided steps")
                w_per_step = gr.Textbox(d["per_step"], label="Per-step strengths (optional)",
                                        placeholder="e.g. 0.75, 0.3 — overrides λ", elem_id="per-step")
                with gr.Accordion("More guidance knobs", open=False):
                    w_steps = gr.Number(d["steps"], label="Student steps", precision=0)
                    w_renoise = gr.Radio(["next", "same", "random"], value=d["renoise"], label="Re-noise level")
                    w_noise = gr.Radio(["random", "deterministic", "hybrid"], value=d["noise"], label="Noise")
                    w_noise_mix = gr.Number(d["noise_mix"], label="Noise mix (hybrid)",
                                            info="weight of fresh noise in hybrid noise", elem_id="noise-mix")
                    w_space = gr.Radio(["x0", "eps"], value=d["space"], label="Fusion space")
                    w_cfg = gr.Number(d["teacher_cfg"], label="Teacher CFG",
                                      info="the teacher's CFG scale in the guided steps")
                    w_samples = gr.Slider(1, max(8, d["samples"]), value=d["samples"], step=1,
                                          label="K teacher samples per step")
                with gr.Row(visible=d["zoo"]) as w_teacher_row:
                    w_teacher = gr.Checkbox(True, label="Also show the teacher alone (its own sampler)", scale=2)
                    w_teacher_steps = gr.Number(d["teacher_steps"], label="Teacher steps", precision=0, scale=1,
                                                elem_id="teacher-steps")
                w_go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                w_status = gr.Markdown("Pick settings and press **Generate**.", elem_id="status")
                # One row per method and one column per seed, so a seed's images line up vertically.
                def gallery(label: str, elem_id: str, visible: bool = True) -> Any:
                    return gr.Gallery(label=label, columns=4, rows=1, height=230, object_fit="contain",
                                      allow_preview=False, elem_id=elem_id, format="png", visible=visible)

                g_student = gallery("Student alone", "student")
                g_guided = gallery("Student + teacher guidance (same seeds)", "guided")
                g_teacher = gallery("Teacher alone, its own many-step sampler (same seeds)", "teacher", d["zoo"])
                # Points, not one coloured line per seed: Gradio's plot fixes its colour domain when first drawn
                # and then draws no line for seeds that were not in the first result.
                w_plot = gr.ScatterPlot(None, x="step", y="correction", tooltip="all",
                                        title="How far the teacher moved the student's x0 (one point per seed)",
                                        x_title="student step", y_title="RMS of x0 change",
                                        elem_id="plot", label="Correction per step")
                with gr.Accordion("Reproduce these images", open=True):
                    w_cmd = gr.Textbox("", label="Command line", lines=2, interactive=False, buttons=["copy"],
                                       elem_id="cmd")
                    w_py = gr.Code("", language="python", label="Python", lines=12, elem_id="python",
                                   show_line_numbers=False)

        def on_preset(name: str, class_name: str):
            try:
                p = preset_defaults(name, backend.overrides.get(name))
            except (KeyError, ValueError) as err:
                return [gr.update()] * 15 + [_error_text(err)]
            zoo = p["zoo"]
            return [
                gr.update(visible=zoo), gr.update(visible=not zoo, value=class_name if zoo else ""),
                p["strength"], p["per_step"], p["guided_steps"], p["steps"], p["renoise"], p["noise"], p["space"],
                p["teacher_cfg"], p["samples"], p["noise_mix"], gr.update(visible=zoo), p["teacher_steps"],
                gr.update(visible=zoo), "Pick settings and press **Generate**.",
            ]

        w_preset.change(on_preset, [w_preset, w_class], [w_class, w_prompt, w_strength, w_per_step, w_guided, w_steps,
                                              w_renoise, w_noise, w_space, w_cfg, w_samples, w_noise_mix, w_teacher_row,
                                              w_teacher_steps, g_teacher, w_status],
                        api_visibility="private")
        w_class.change(lambda c: c, w_class, w_prompt, api_visibility="private")

        def on_generate(preset, prompt, seeds, strength, per_step, guided_steps, steps, renoise, noise, space,
                        teacher_cfg, samples, with_teacher, teacher_steps, noise_mix=0.5, progress=gr.Progress()):
            try:
                req = parse_request(preset, prompt, seeds, strength, per_step, guided_steps, steps, renoise, noise,
                                    space, teacher_cfg, samples, with_teacher and _is_zoo(str(preset)), teacher_steps,
                                    noise_mix)
                progress(0.0, desc="loading models")
                result = backend.generate_pair(req, progress=lambda f, text: progress(f, desc=text))
            except Exception as err:  # noqa: BLE001 - every failure becomes a message, the app keeps running
                if not isinstance(err, (ValueError, FileNotFoundError)):
                    traceback.print_exc()
                cleared = gr.update(value=[])
                return (_error_text(err), cleared, cleared, cleared, gr.update(), "", "")
            cols = min(len(req.seeds), 8)
            return (
                summary(result),
                gr.update(value=_display(result.student, req.seeds), columns=cols),
                gr.update(value=_display(result.guided, req.seeds), columns=cols),
                gr.update(value=_display(result.teacher, req.seeds), columns=cols, visible=result.teacher is not None),
                pd.DataFrame(correction_rows(result)),
                command_line(req, backend.device, backend.overrides.get(req.preset)),
                python_code(req, backend.device, backend.overrides.get(req.preset)),
            )

        w_go.click(
            on_generate,
            [w_preset, w_prompt, w_seeds, w_strength, w_per_step, w_guided, w_steps, w_renoise, w_noise, w_space,
             w_cfg, w_samples, w_teacher, w_teacher_steps, w_noise_mix],
            [w_status, g_student, g_guided, g_teacher, w_plot, w_cmd, w_py],
            api_name="generate",
        )
    return app


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distillpp ui``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes it on the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free port)")
    parser.add_argument("--preset", default=None,
                        help=f"preset selected at start (default: the --overrides file's, else {DEFAULT_PRESET})")
    parser.add_argument("--overrides", default=None, metavar="FILE",
                        help="preset-override JSON (e.g. written by distillpp tune): the app starts on its preset "
                             "with its guidance settings in the controls")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--download", action="store_true",
                        help="let diffusers presets download missing weights (default: local files only)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for sampling (0: the cores other processes leave idle, by the load average)")
    parser.add_argument("--open", action="store_true", help="open the page in a browser")


def run(args: argparse.Namespace) -> int:
    """Start the app and serve until interrupted."""
    from .cli import check_device

    # The options are checked before Gradio (seconds to import) is loaded.
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    preset = args.preset or DEFAULT_PRESET
    if args.preset is not None and args.preset not in guided_presets():
        raise ValueError(f"--preset must be one of {', '.join(guided_presets())}; got {args.preset!r}")
    overrides: dict[str, str] = {}
    if args.overrides is not None:
        preset = read_overrides(args.overrides, args.preset)
        overrides[preset] = os.path.abspath(args.overrides)  # the reproduction strings work from any folder
    if args.device:
        check_device(args.device)
    try:
        _import_gradio()
    except ImportError as err:
        print(err, file=sys.stderr)
        return 2
    import torch

    from .demo import cpu_threads

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))
    app = build_app(Backend(device=device, download=args.download, overrides=overrides), preset=preset)
    url = serve(app, args.host, args.port, open_browser=args.open, block=False)
    print(f"distillpp ui: serving on {url} (Ctrl-C stops it)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
    return 0


def serve(app: Any, host: str = "127.0.0.1", port: int = 0, open_browser: bool = False, block: bool = True) -> str:
    """Launch ``app`` (from :func:`build_app`) locally, without a share link; returns its URL.

    Args:
        app: the Gradio Blocks.
        host: address to listen on.
        port: port, or 0 for a free one.
        open_browser: open the page in the default browser.
        block: serve until interrupted; ``False`` returns at once (``app.close()`` stops it).
    """
    port = port or _free_port(host)
    # One sampling job at a time: the models are shared and a CPU has no spare cores for a second one.
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, inbrowser=open_browser, prevent_thread_lock=not block,
        ssr_mode=False, mcp_server=False, pwa=False, css=CSS, footer_links=["api"], quiet=True,
    )
    return f"http://{host}:{port}"


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
