"""The ``distillpp`` command: one subcommand a job, each living in its own module.

Only the chosen subcommand's module is imported, and only once its name is on the command line:
``distillpp --help`` imports neither torch nor diffusers, and a missing optional dependency of one
job does not break the others. Every subcommand checks its arguments before it loads anything and
reports a bad one as a single line, ``distillpp <command>: error: ...``; Ctrl-C ends a job with one
line too (exit status 130), and jobs write their outputs under temporary names, renamed into place
only when complete, so an interrupted run leaves no half-written files.

Seeds are given the same way by every subcommand: space- or comma-separated integers and ranges,
``--seeds 0 1 2``, ``--seeds 0,1,2`` and ``--seeds 0-2`` are the same three seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = [
    "main",
    "build_parser",
    "SUBCOMMANDS",
    "HelpFormatter",
    "parse_int_list",
    "add_seeds_argument",
    "int_at_least",
    "positive_int",
    "non_negative_int",
    "finite_float",
    "positive_float",
    "unit_float",
    "check_device",
    "check_out_dir",
    "staged_outputs",
]

# name -> (module with add_arguments(parser) and run(args), one-line help)
SUBCOMMANDS = {
    "demo": ("distillpp.demo", "teacher vs students vs guided students on the shipped Fashion-MNIST models (offline, CPU)"),
    "testbed": ("distillpp.testbed", "teacher guidance on an exact Gaussian-mixture teacher: table + PNG"),
    "generate": ("distillpp.pipelines.cli", "text-to-image with a diffusers student preset, guided by its teacher"),
    "train": ("distillpp.zoo.train", "train the Fashion-MNIST teacher, students and classifier"),
    "ui": ("distillpp.ui", "local web app: student vs teacher-guided images for the same seeds, per-step corrections"),
    "batch": ("distillpp.batch", "many images from a preset: deterministic, resumable, over torchrun or Ray"),
    "eval": ("distillpp.evaluate_cli", "FID, precision/recall (and CLIP score) of a folder of images"),
    "tune": ("distillpp.tuning", "data-free choice of guidance settings for a student-teacher preset"),
}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``distillpp <cmd>: error: ...`` (the usage is in ``--help``)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default stated once: appended unless its help already says it, or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower()
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


# ----------------------------------------------------------------------------- argument types


def parse_int_list(tokens: str | int | Sequence[str | int], name: str = "--seeds", minimum: int = 0) -> list[int]:
    """Integers from space- or comma-separated tokens and inclusive ranges: ``["0", "2-4,7"]`` -> 0, 2, 3, 4, 7.

    Args:
        tokens: one string, an int, or a sequence of them (argparse's ``nargs="+"``).
        name: the option, for the error message.
        minimum: smallest allowed value.

    Raises:
        ValueError: naming ``name``, for an empty list, a token that is no integer or range, or a value
            below ``minimum``.
    """
    if isinstance(tokens, (str, int)):
        tokens = [tokens]
    out: list[int] = []
    for token in tokens:
        for part in str(token).split(","):
            part = part.strip()
            if not part:
                continue
            bounds = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            try:
                if bounds:
                    lo, hi = int(bounds[1]), int(bounds[2])
                    if hi < lo:
                        raise ValueError
                    out.extend(range(lo, hi + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ValueError(
                    f"{name} must be integers, space- or comma-separated, or ranges like 0-3; got {part!r}"
                ) from None
    if not out:
        raise ValueError(f"{name} is empty")
    low = [v for v in out if v < minimum]
    if low:
        raise ValueError(f"{name} must be integers >= {minimum}, got {low[0]}")
    return out


def add_seeds_argument(parser: argparse.ArgumentParser, default: Sequence[int], help: str) -> None:
    """``--seeds`` in the one syntax every subcommand shares (see the module docstring); parsed to ``list[int]``."""

    def seeds(text: str) -> list[int]:
        try:
            return parse_int_list(text, "--seeds")
        except ValueError as err:  # argparse prefixes "argument --seeds: " itself
            raise argparse.ArgumentTypeError(str(err).removeprefix("--seeds ")) from None

    parser.add_argument("--seeds", nargs="+", type=seeds, action=_Flatten, default=list(default), metavar="SEED",
                        help=f"{help}; space- or comma-separated, ranges like 0-3 "
                             f"(default: {' '.join(map(str, default))})")


class _Flatten(argparse.Action):
    """Store ``nargs="+"`` values that each parsed to a list as one flat list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [v for group in values for v in group])


def int_at_least(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum`` (the message names no option: argparse prefixes it)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(text: str) -> float:
    """An argparse type: a finite float (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def unit_float(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


# ----------------------------------------------------------------------------- checks before any work


def check_device(text: str, option: str = "--device") -> str:
    """``text`` if it names a torch device this machine has, else a ValueError naming ``option``."""
    if text == "cpu":  # always there; no torch import needed to say so
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} must be a torch device such as cpu, cuda or cuda:1; got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {text}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {text}: MPS is not available here; use --device cpu")
    return text


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder ``path`` now (before any work), or a ValueError naming ``option``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} must be a folder, but {path} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder is not writable")
    return path


@contextlib.contextmanager
def staged_outputs(*paths: str | Path) -> Iterator[list[Path]]:
    """Temporary names for ``paths``; renamed onto them only when the block completes.

    An error or Ctrl-C inside the block removes the temporary files and leaves whatever was at
    ``paths`` before untouched, so no output is ever half-written or out of step with the others.
    The temporary names keep the suffix (``.demo_grid.partial.png``) so writers that pick a format
    from it still work.
    """
    finals = [Path(p) for p in paths]
    temps = [p.with_name(f".{p.stem}.partial{p.suffix}") for p in finals]
    try:
        yield temps
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        raise
    for t, p in zip(temps, finals):
        os.replace(t, p)


# ----------------------------------------------------------------------------- the command


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``distillpp`` parser; only the subcommand named in ``argv`` gets its options (and its module imported).

    Args:
        argv: the command line (default ``sys.argv[1:]``); pass ``["<command>"]`` to get that subcommand's
            full parser.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(
        prog="distillpp",
        description="Inference-time teacher guidance for few-step distilled diffusion models (Distillation++).",
        epilog="'distillpp COMMAND --help' lists a command's options.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"distillpp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # keep the other subcommands usable
            p.set_defaults(_unavailable=f"distillpp {name}: error: unavailable: {err}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distillpp`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _chosen(argv) or "distillpp"
    try:
        parser = build_parser(argv)
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
    except KeyboardInterrupt:
        name = command if command == "distillpp" else f"distillpp {command}"
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
