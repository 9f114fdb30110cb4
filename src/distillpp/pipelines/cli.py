"""``distillpp generate``: images from a preset's student, teacher-guided, optionally side by side.

The top-level CLI wires a ``generate`` sub-command to :func:`add_arguments` and :func:`run`; the
module also runs alone (``python -m distillpp.pipelines.cli --preset ... --prompt ...``). Weights
come from local folders (``--base/--student/--teacher``) or the Hugging Face cache; nothing is
downloaded unless ``--download`` is given, so a missing model fails at once with the list of ids and
the commands that fetch them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Sequence

__all__ = ["add_arguments", "run", "main", "parse_strength", "call_kwargs"]

DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp32": "float32", "float32": "float32"}


def parse_strength(value: str) -> float | list[float]:
    """``"0.1"`` -> 0.1; ``"0.1,0.05"`` -> a per-guided-step list."""
    try:
        parts = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--strength must be a number or comma-separated numbers, got {value!r}")
    if not parts:
        raise argparse.ArgumentTypeError("--strength is empty")
    return parts[0] if len(parts) == 1 else parts


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``generate`` options to ``parser``."""
    g = parser.add_argument_group("model")
    g.add_argument("--preset", help="preset name (see --list-presets)")
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

    g = parser.add_argument_group("prompts and images")
    g.add_argument("--prompt", action="append", help="prompt (repeat for several)")
    g.add_argument("--prompt-file", help="text file with one prompt per line")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (student CFG and teacher CFG)")
    g.add_argument("--teacher-negative-prompt", default=None, help="negative prompt for the teacher only")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one generator seed per call (default: 0)")
    g.add_argument("--batch-size", type=int, default=1, help="images per prompt and seed, in one batch")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--out", default="distillpp-out", help="output folder")
    g.add_argument("--side-by-side", action="store_true",
                   help="also sample the plain student with the same seed and save a student | guided grid")

    g = parser.add_argument_group("sampling and guidance (default: the preset's)")
    g.add_argument("--steps", type=int, default=None, help="student steps")
    g.add_argument("--guidance-scale", type=float, default=None, help="student CFG scale (LCM: its embedding)")
    g.add_argument("--strength", type=parse_strength, default=None,
                   help="teacher weight lam; a comma list gives one value per guided step; 0 = plain student")
    g.add_argument("--guided-steps", type=int, default=None, help="how many leading steps the teacher guides")
    g.add_argument("--teacher-cfg", type=float, default=None, help="teacher CFG scale")
    g.add_argument("--renoise", choices=["next", "same", "random"], default=None)
    g.add_argument("--noise", choices=["random", "deterministic", "hybrid"], default=None)
    g.add_argument("--space", choices=["x0", "eps"], default=None)
    g.add_argument("--samples", type=int, default=None, help="teacher re-noise draws averaged per guided step")
    return parser


def call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline ``__call__`` keyword arguments set on the command line."""
    kw = {
        "negative_prompt": args.negative_prompt,
        "teacher_negative_prompt": args.teacher_negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "strength": args.strength,
        "guided_steps": args.guided_steps,
        "teacher_cfg": args.teacher_cfg,
        "renoise": args.renoise,
        "noise": args.noise,
        "space": args.space,
        "samples": args.samples,
        "height": args.height,
        "width": args.width,
        "num_images_per_prompt": args.batch_size,
    }
    return {k: v for k, v in kw.items() if v is not None}


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


def _side_by_side(left: Any, right: Any) -> Any:
    from PIL import Image

    w, h = left.size
    grid = Image.new("RGB", (2 * w, h))
    grid.paste(left, (0, 0))
    grid.paste(right, (w, 0))
    return grid


def run(args: argparse.Namespace) -> int:
    """Run ``generate``; returns the process exit code (0 ok, 2 missing weights or bad arguments)."""
    from .base import MissingWeightsError
    from .presets import PRESETS, from_preset, list_presets

    if args.list_presets:
        for name in list_presets():
            p = PRESETS[name]
            print(f"{name:32s} {p.family:5s} student={p.student_kind:8s} {p.scheduler} "
                  f"steps={p.num_inference_steps} space={p.guidance.space} lam={p.guidance.strength}")
        return 0
    if not args.preset:
        print("error: --preset is required (see --list-presets)", file=sys.stderr)
        return 2
    prompts = _prompts(args)
    if not prompts:
        print("error: give at least one --prompt or a --prompt-file", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = DTYPES[args.dtype] if args.dtype else ("float16" if device.startswith("cuda") else "float32")
    try:
        pipe = from_preset(
            args.preset, base=args.base, student=args.student, teacher=args.teacher,
            torch_dtype=getattr(torch, dtype_name), device=device, download=args.download,
            teacher_device=args.teacher_device, teacher_offload=args.teacher_offload,
        )
    except MissingWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    kw = call_kwargs(args)
    records = []
    for seed in args.seeds:
        gen = torch.Generator("cpu").manual_seed(seed)
        t0 = time.perf_counter()
        try:
            guided = pipe(prompts, generator=gen, **kw).images
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        dt = time.perf_counter() - t0
        plain = None
        if args.side_by_side:
            plain_kw = {**kw, "strength": 0.0}
            plain = pipe(prompts, generator=torch.Generator("cpu").manual_seed(seed), **plain_kw).images
        per_prompt = args.batch_size
        for k, image in enumerate(guided):
            p = prompts[k // per_prompt]
            stem = f"{args.preset}_{k // per_prompt:03d}-{_slug(p)}_seed{seed}_{k % per_prompt}"
            path = os.path.join(args.out, stem + ".png")
            image.save(path)
            rec = {"prompt": p, "seed": seed, "index": k % per_prompt, "image": path}
            if plain is not None:
                sbs = os.path.join(args.out, stem + "_student-vs-guided.png")
                _side_by_side(plain[k], image).save(sbs)
                rec["side_by_side"] = sbs
            records.append(rec)
        print(f"seed {seed}: {len(guided)} image(s) in {dt:.2f} s")
    meta = {"preset": args.preset, "device": device, "dtype": dtype_name, "call": {
        k: v for k, v in kw.items()}, "images": records, "command": " ".join(sys.argv)}
    with open(os.path.join(args.out, "generate.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)
    print(f"wrote {len(records)} image(s) to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distillpp.pipelines.cli``."""
    parser = add_arguments(argparse.ArgumentParser(prog="distillpp generate", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
