"""The ``distillpp`` command: one subcommand a job, each living in its own module.

Subcommands are imported lazily so ``distillpp --help`` stays fast and a missing optional
dependency of one job does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args), one-line help)
SUBCOMMANDS = {
    "demo": ("distillpp.demo", "teacher vs students vs guided students on the shipped Fashion-MNIST models (offline, CPU)"),
    "testbed": ("distillpp.testbed", "teacher guidance on an exact Gaussian-mixture teacher: table + PNG"),
    "generate": ("distillpp.pipelines.cli", "text-to-image with a diffusers student preset, guided by its teacher"),
    "train": ("distillpp.zoo.train", "train the Fashion-MNIST teacher, students and classifier"),
    "batch": ("distillpp.batch", "many images from a preset: deterministic, resumable, over torchrun or Ray"),
    "eval": ("distillpp.evaluate_cli", "FID, precision/recall (and CLIP score) of a folder of images"),
    "ui": ("distillpp.ui", "local web app: student vs teacher-guided images for the same seeds, per-step corrections"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillpp",
        description="Inference-time teacher guidance for few-step distilled diffusion models (Distillation++).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"distillpp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # keep the other subcommands usable
            p.set_defaults(_unavailable=f"'distillpp {name}' is unavailable: {err}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        print(args._unavailable, file=sys.stderr)
        return 2
    try:
        result = args._run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"distillpp {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
