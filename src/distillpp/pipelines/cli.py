"""``distillpp generate``: images from a preset's student, teacher-guided, optionally side by side.

The top-level CLI wires a ``generate`` sub-command to :func:`add_arguments` and :func:`run`; the
module also runs alone (``python -m distillpp.pipelines.cli --preset ... --prompt ...``). Every
argument is checked before any weights load. Weights come from local folders
(``--base/--student/--teacher``) or the Hugging Face cache; nothing is downloaded unless
``--download`` is given, so a missing model fails at once with the list of ids and the commands that
fetch them. The zoo presets (``zoo-lcm``...) need nothing: their weights ship with the package.

Seeds: image ``i`` of a prompt with seed ``s`` is drawn from its own generator seeded ``s + i``, so an
image depends only on its prompt, seed and index, never on what else is in the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Sequence

from ..cli import HelpFormatter, Parser, add_seeds_argument, finite_float, int_at_least, staged_outputs

__all__ = ["add_arguments", "add_guidance_arguments", "guidance_overrides", "run", "main", "parse_strength",
           "call_kwargs", "image_generators"]

DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp32": "float32", "float32": "float32"}
COMPILE_CHOICES = ("auto", "none", "graphs", "inductor")



def parse_strength(value: str) -> float | list[float]:
    """``"0.1"`` -> 0.1; ``"0.1,0.05"`` -> a per-guided-step list (each in [0, 1])."""
    try:
        parts = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or comma-separated numbers in [0, 1], got {value!r}")
    if not parts:
        raise argparse.ArgumentTypeError("is empty")
    bad = [p for p in parts if not 0.0 <= p <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"values must be in [0, 1], got {value!r}")
    return parts[0] if len(parts) == 1 else parts


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """The teacher-guidance flags, one per :class:`~distillpp.TeacherGuidance` knob under its own name.

    Shared by ``generate``, ``batch`` and the UI's command lines; ``None`` means "the preset's value".
    """
    from ..guidance import NOISE, RENOISE, SPACE

    g = parser.add_argument_group("teacher guidance (default: the preset's values)")
    g.add_argument("--strength", type=parse_strength, default=None, metavar="LAM[,LAM...]",
                   help="teacher weight lam in [0, 1]; a comma list gives one value per guided step; 0 = plain student")
    g.add_argument("--guided-steps", type=int_at_least(0), default=None, metavar="N",
                   help="how many leading student steps the teacher guides")
    g.add_argument("--renoise", choices=RENOISE, default=None,
                   help="teacher noise level: next (the paper's s = t - dt), same (s = t), random")
    g.add_argument("--noise", choices=NOISE, default=None,
                   help="re-noising direction: fresh noise, the student's own direction, or a mix")
    g.add_argument("--space", choices=SPACE, default=None, help="fusion space of student and teacher estimates")
    g.add_argument("--teacher-cfg", type=finite_float, default=None, metavar="W", help="the teacher's CFG scale")
    g.add_argument("--samples", type=int_at_least(1), default=None, metavar="K",
                   help="teacher re-noise draws averaged per guided step (one batched forward)")
    g.add_argument("--noise-mix", type=finite_float, default=None, metavar="F",
                   help="weight of fresh noise in --noise hybrid, in [0, 1]")
    g.add_argument("--overrides", default=None, metavar="FILE",
                   help="preset-override JSON (e.g. written by distillpp tune); flags above still win")


def guidance_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The guidance knobs given on the command line, under :class:`~distillpp.TeacherGuidance`'s names."""
    from .core import GUIDANCE_KNOBS

    kw = {k: getattr(args, k, None) for k in GUIDANCE_KNOBS}
    return {k: v for k, v in kw.items() if v is not None}


def check_guided_steps(guidance: Any, steps: int) -> None:
    """Refuse ``--guided-steps`` beyond the run's ``steps`` sampling steps (before any model loads).

    Raises:
        ValueError: naming ``--guided-steps``.
    """
    if guidance is not None and guidance.guided_steps > steps:
        raise ValueError(f"--guided-steps must be in [0, {steps}] (guided_steps cannot exceed the {steps} "
                         f"sampling steps), got {guidance.guided_steps}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``generate`` options to ``parser``."""
    g = parser.add_argument_group("model")
    g.add_argument("--preset", help="preset name (see --list-presets); zoo-* presets need no downloads")
    g.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    g.add_argument("--base", help="local folder (or id) of the base/student pipeline, overriding the preset's")
    g.add_argument("--student", help="local folder/file (or id) of the student weights (UNet, LoRA), overriding")
    g.add_argument("--teacher", help="local folder (or id) of the teacher, overriding the preset's")
    g.add_argument("--download", action="store_true",
                   help="allow downloading missing weights from the Hugging Face Hub (default: local files only)")
    g.add_argument("--device", default=None, help="execution device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: fp16 on cuda, fp32 on cpu)")
    g.add_argument("--teacher-device", default=None, help="run the teacher on another device, e.g. cuda:1")
    g.add_argument("--teacher-offload", default=None, choices=["cpu"],
                   help="keep the teacher in CPU memory, copied to the GPU for its call")
    g.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                   help="auto = graphs on CUDA (captured CUDA graphs: a few seconds once, then each forward at "
                        "the GPU's speed), none elsewhere; inductor = torch.compile's kernels under the same graphs "
                        "(about 30%% faster per forward; 1.5-2 min per shape on first use, cached on disk)")

    g = parser.add_argument_group("prompts and images")
    g.add_argument("--prompt", action="append", help="prompt (repeat for several); zoo presets: a class name")
    g.add_argument("--prompt-file", help="text file with one prompt per line")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (student CFG and teacher CFG)")
    g.add_argument("--teacher-negative-prompt", default=None, help="negative prompt for the teacher only")
    add_seeds_argument(g, [0], "image i of a prompt uses seed + i")
    g.add_argument("--batch-size", type=int_at_least(1), default=1, metavar="N",
                   help="images per prompt and seed, sampled in one batch")
    g.add_argument("--height", type=int_at_least(1), default=None, help="image height in pixels")
    g.add_argument("--width", type=int_at_least(1), default=None, help="image width in pixels")
    g.add_argument("--out", default="distillpp-out", help="output folder")
    g.add_argument("--side-by-side", action="store_true",
                   help="also sample the plain student with the same seeds and save a student | guided image")

    g = parser.add_argument_group("student sampling (default: the preset's values)")
    g.add_argument("--steps", type=int_at_least(1), default=None, metavar="N", help="student sampling steps")
    g.add_argument("--guidance-scale", type=finite_float, default=None, metavar="W",
                   help="the student's own CFG scale (LCM: its guidance embedding)")
    add_guidance_arguments(parser)
    return parser


def call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline ``__call__`` keyword arguments set on the command line."""
    kw = {
        "negative_prompt": args.negative_prompt,
        "teacher_negative_prompt": args.teacher_negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "num_images_per_prompt": args.batch_size,
        **guidance_overrides(args),
    }
    return {k: v for k, v in kw.items() if v is not None}


def image_generators(seed: int, n_prompts: int, per_prompt: int, device: str = "cpu") -> list[Any]:
    """One generator per image: image ``i`` of every prompt is seeded ``seed + i``."""
    import torch

    return [torch.Generator(device).manual_seed(seed + i) for _ in range(n_prompts) for i in range(per_prompt)]


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"--prompt-file {args.prompt_file!r} cannot be read: {e.strerror}") from None
    return prompts


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


def _side_by_side(left: Any, right: Any) -> Any:
    from PIL import Image

    w, h = left.size
    grid = Image.new(left.mode, (2 * w, h))
    grid.paste(left, (0, 0))
    grid.paste(right, (w, 0))
    return grid


def _save_atomic(image: Any, path: str) -> None:
    with staged_outputs(path) as (tmp,):
        image.save(tmp, format="PNG")


def _check(args: argparse.Namespace) -> tuple[Any, list[str], list[int], str, dict[str, Any]]:
    """Every check that needs no weights: returns the preset, prompts, seeds, device and call kwargs."""
    import torch

    from .presets import apply_overrides, get_preset

    if not args.preset:
        raise ValueError("--preset is required (see --list-presets)")
    preset = get_preset(args.preset)
    prompts = _prompts(args)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompt-file")
    seeds = list(args.seeds)
    if args.overrides is not None:
        preset = apply_overrides(preset, args.overrides)
    kw = call_kwargs(args)
    # Build the call's guidance now, so a bad knob fails before the weights load.
    from .core import resolve_guidance

    knobs = {k: kw[k] for k in guidance_overrides(args)}
    g = resolve_guidance(preset.guidance, **knobs)
    check_guided_steps(g, kw.get("num_inference_steps") or preset.num_inference_steps)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} needs CUDA, which this machine does not have; use --device cpu")
    if args.teacher_device and torch.device(args.teacher_device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--teacher-device {args.teacher_device} needs CUDA, which this machine does not have")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    return preset, prompts, seeds, device, kw


def run(args: argparse.Namespace) -> int:
    """Run ``generate``; returns the process exit code (0 ok, 2 missing weights or bad arguments, 130 interrupted)."""
    from .presets import PRESETS, from_preset, list_presets
    from .weights import MissingWeightsError

    if args.list_presets:
        for name in list_presets():
            p = PRESETS[name]
            print(f"{name:28s} {p.family:6s} student={p.student_kind:8s} {p.scheduler:32s} "
                  f"steps={p.num_inference_steps} space={p.guidance.space} lam={p.guidance.strength}")
        return 0
    try:
        preset, prompts, seeds, device, kw = _check(args)
    except ValueError as e:
        print(f"distillpp generate: error: {e}", file=sys.stderr)
        return 2

    import torch

    dtype_name = DTYPES[args.dtype] if args.dtype else ("float16" if device.startswith("cuda") else "float32")
    compile_mode = args.compile if args.compile != "auto" else ("graphs" if device.startswith("cuda") else "none")
    try:
        pipe = from_preset(
            preset, base=args.base, student=args.student, teacher=args.teacher, torch_dtype=getattr(torch, dtype_name),
            device=device, download=args.download, teacher_device=args.teacher_device,
            teacher_offload=args.teacher_offload, compile=compile_mode,
        )
    except (MissingWeightsError, ValueError) as e:
        print(f"distillpp generate: error: {e}", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    records = []
    per_prompt = args.batch_size
    try:
        for seed in seeds:
            t0 = time.perf_counter()
            try:
                guided = pipe(prompts, generator=image_generators(seed, len(prompts), per_prompt), **kw).images
            except ValueError as e:
                print(f"distillpp generate: error: {e}", file=sys.stderr)
                return 2
            dt = time.perf_counter() - t0
            plain = None
            if args.side_by_side:
                plain = pipe(prompts, generator=image_generators(seed, len(prompts), per_prompt),
                             **{**kw, "strength": 0.0}).images
            for k, image in enumerate(guided):
                p, i = prompts[k // per_prompt], k % per_prompt
                stem = f"{preset.name}_{k // per_prompt:03d}-{_slug(p)}_seed{seed + i}"
                path = os.path.join(args.out, stem + ".png")
                _save_atomic(image, path)
                rec = {"prompt": p, "seed": seed + i, "index": i, "image": path}
                if plain is not None:
                    sbs = os.path.join(args.out, stem + "_student-vs-guided.png")
                    _save_atomic(_side_by_side(plain[k], image), sbs)
                    rec["side_by_side"] = sbs
                records.append(rec)
            print(f"seed {seed}: {len(guided)} image(s) in {dt:.2f} s")
    except KeyboardInterrupt:
        print(f"distillpp generate: interrupted; {len(records)} finished image(s) are in {args.out}", file=sys.stderr)
        return 130
    g = pipe.guidance
    meta = {"preset": preset.name, "device": device, "dtype": dtype_name, "compile": compile_mode,
            "num_inference_steps": kw.get("num_inference_steps", pipe.num_inference_steps),
            "call": kw, "guidance_defaults": {k: getattr(g, k) for k in ("strength", "guided_steps", "renoise",
                                                                           "noise", "space", "teacher_cfg", "samples",
                                                                           "noise_mix")},
            "images": records, "command": " ".join(sys.argv)}
    tmp = os.path.join(args.out, "generate.json.part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(args.out, "generate.json"))
    print(f"wrote {len(records)} image(s) to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distillpp.pipelines.cli``."""
    parser = add_arguments(Parser(prog="distillpp generate", description=__doc__.split("\n")[0],
                                  formatter_class=HelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
