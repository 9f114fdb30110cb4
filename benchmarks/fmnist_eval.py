#!/usr/bin/env python3
"""Distillation++ on the Fashion-MNIST zoo: the paper's main table, ablation and cost table.

Protocol (issue 3, issue 5 for the flow rows):

- Guidance settings (strength x fusion space x teacher CFG x guided steps) are chosen per student on
  seed set A (``--select-seeds``, ``--select-n`` samples per run) by the lowest mean FID; everything
  reported is measured on seed set B (``--seeds``, ``--n`` samples per run, balanced classes).
- Metrics: FID on the zoo classifier's penultimate features against the 10k test set, improved
  precision/recall (k=3), class consistency, and two pixel-level checks a person would agree with
  (:mod:`distillpp.metrics.pixels`): the high-frequency energy ratio to the test set (1 = as sharp as
  real images; speckle >> 1) and a pixel Fréchet distance on 2x2-pooled pixels of the 28x28 crop;
  mean ± sample std over the seeds of a set. Every method
  starts from the same noise for a seed, so differences between rows are paired.
- Main table: teacher (default steps and CFG); each student at 4 steps; each student at 4 steps with
  1 teacher-guided step. Flow rows: flow-teacher; flow-student; flow-student guided.
- Ablation (``--ablate`` students): renoise next/same/random, a strength sweep, 1 vs 2 guided steps,
  constant vs halving strength, 1 vs 4 teacher samples.
- Cost: 4 + 1 guided vs 5 and 6 plain student steps: quality on set B and wall time per batch (batch 1
  and 64; CUDA-synchronised median of repeats; ``--device cpu --timing-only`` adds CPU timings and
  needs no data set).

Finished runs are appended to ``<out>/fmnist_runs.jsonl`` as they complete; a rerun skips them, so an
interrupted or budget-stopped run resumes where it stopped. ``report`` rebuilds
``fmnist_eval.md`` / ``fmnist_eval.json`` from that file alone.

    python benchmarks/fmnist_eval.py all --device cuda --out benchmarks/results   # GPU, ~8 min on an H100
    python benchmarks/fmnist_eval.py --device cpu --timing-only                    # CPU timings, no data set
    python benchmarks/fmnist_eval.py report                                        # tables from the JSONL
    python benchmarks/fmnist_eval.py all --quick --standin /tmp/si --device cpu    # plumbing check, random models
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

HERE = Path(__file__).resolve().parent
try:
    import distillpp  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(HERE.parent / "src"))

from distillpp.guidance import NonFiniteError  # noqa: E402
from distillpp.metrics import (  # noqa: E402
    PixelReference,
    RealFeatures,
    evaluate_samples,
    format_mean_std,
    mean_std,
    pixel_metrics,
)
from distillpp.zoo.harness import (  # noqa: E402
    TEACHER_OF,
    Method,
    ModelCache,
    generate,
    get_zoo,
    initial_noise,
    load_test_set,
    sample_forwards,
)

STUDENTS = tuple(TEACHER_OF)
FAMILY = {"teacher": "vp", "lcm": "vp", "pd": "vp", "flow-teacher": "flow", "flow-student": "flow"}
TEACHERS = tuple(dict.fromkeys(TEACHER_OF.values()))
METRICS = ("fid", "precision", "recall", "class_consistency", "hf_ratio", "pixel_fd")
# Fashion-MNIST's 28x28 content inside the zoo's 32x32 images (the 2-pixel border is constant -1 in real
# images): the pixel checks look at it only.
PIXEL_CROP = 28
# Selection grid. eps-space fusion multiplies the strength by sigma_i / sigma' (about 8 at the first
# step of the VP students, sigma_0 = 157), so its strengths are much smaller; flow models start at
# sigma = 1e8 where x0 = x - sigma * eps cancels catastrophically, so they are guided in x0 only.
# This grid produced the committed benchmarks/results/fmnist_eval.* (H100, 2026-11-28). pd's FID was
# still falling at x0 strength 0.75, the grid's largest: a larger strength is worth trying next time.
VP_STRENGTHS = {"x0": (0.1, 0.25, 0.5, 0.75), "eps": (0.003, 0.01, 0.03)}
FLOW_STRENGTHS = {"x0": (0.1, 0.25, 0.5, 0.75)}
QUICK_STRENGTHS = {"x0": (0.3,), "eps": (0.01,)}
# float64: exact CPU checks (the CPU runs half precision ~17x slower than float32; float64 ~2x).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class BudgetExhausted(Exception):
    """The next run would not finish inside ``--budget-min``."""


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _command_line(script: str = "benchmarks/fmnist_eval.py") -> str:
    return " ".join(["python3", script] + [shlex.quote(a) for a in sys.argv[1:]])


def card_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` or ``<cpu model> (N cores, T torch threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stage", nargs="?", default="all",
                   choices=("all", "main", "select", "cost", "ablation", "timing", "report"),
                   help="what to run (default all; 'report' only rebuilds the tables from the JSONL)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="network dtype (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--batch", type=int, default=None, help="images per sampler call (default 2500 on cuda, 250 on cpu)")
    p.add_argument("--seeds", default="0,1,2", help="seed set B: every reported number")
    p.add_argument("--n", type=int, default=10000, help="samples per run on set B (balanced classes)")
    p.add_argument("--select-seeds", default="100,101", help="seed set A: choosing the guidance settings")
    p.add_argument("--select-n", type=int, default=5000, help="samples per run on set A")
    p.add_argument("--select-cfg", default=None,
                   help="teacher CFG scales tried in selection (default: 1.5 and the teacher's own, 2)")
    p.add_argument("--select-steps", default="1,2", help="guided steps tried in selection")
    p.add_argument("--students", default=",".join(STUDENTS), help="students to evaluate")
    p.add_argument("--ablate", default="lcm,pd", help="students that get the ablation")
    p.add_argument("--teacher-steps", type=int, default=None, help="override the teachers' default steps")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours of precision/recall")
    p.add_argument("--timing-only", action="store_true", help="only the wall-time measurements (no data set needed)")
    p.add_argument("--timing-batches", default="1,64", help="batch sizes timed")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per setting (default 20 cuda, 3 cpu)")
    p.add_argument("--budget-min", type=float, default=7.5,
                   help="stop starting runs that would end after this many minutes (results so far are kept)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --quick: ./distillpp-out/fmnist-quick)")
    p.add_argument("--models-dir", default=None, help="zoo models folder (default: the shipped weights)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST folder (default: $DISTILLPP_FASHION_MNIST, else .data/fashion-mnist if present, "
                        "else the Debian path)")
    p.add_argument("--standin", default=None, metavar="DIR",
                   help="use random-init stand-in models and synthetic data written to DIR (plumbing and timing only)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a CPU check of the whole pipeline")
    p.add_argument("--quiet", action="store_true", help="no per-run log lines")
    p.add_argument("--plan", action="store_true",
                   help="list the runs still to do and their network evaluations, run nothing")
    return p


class Bench:
    """Runs (or finds in the JSONL) each quality and timing measurement, and writes the report."""

    SCRIPT = "benchmarks/fmnist_eval.py"  # named in the records' commands
    RUNS_FILE = "fmnist_runs.jsonl"  # under --out: this run appends to it
    READ_GLOB = RUNS_FILE  # finished runs are read from every file under --out matching this

    def __init__(self, args: argparse.Namespace, zoo: Any = None):
        self.args = args
        self.t0 = time.time()
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        self.dtype_name = args.dtype or ("float16" if cuda else "float32")
        self.batch = args.batch or (2500 if cuda else 250)
        self.repeats = args.repeats or (20 if cuda else 1 if args.quick else 3)
        self.timing_batches = [1, 4] if args.quick else _ints(args.timing_batches)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.standin = args.standin is not None
        models_dir, self.data_dir = args.models_dir, args.data_dir
        if self.data_dir is None and not os.environ.get("DISTILLPP_FASHION_MNIST") and Path(".data/fashion-mnist").is_dir():
            self.data_dir = ".data/fashion-mnist"  # where benchmarks/zoo_gpu.sh expects a carried copy
        if self.standin:
            sys.path.insert(0, str(HERE))
            from standin_models import write_standin_data, write_standin_models

            root = Path(args.standin)
            models_dir = write_standin_models(root / "models", tiny=args.quick)
            self.data_dir = write_standin_data(root / "data", n_test=200 if args.quick else 10000)
        self.zoo = zoo if zoo is not None else get_zoo()
        self.models = ModelCache(self.zoo, self.device, DTYPES[self.dtype_name], models_dir)
        self.card = card_name(self.device)
        self.out = Path(args.out or ("./distillpp-out/fmnist-quick" if args.quick else HERE / "results"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / self.RUNS_FILE
        self.records: dict[str, dict] = {}
        for path in sorted(self.out.glob(self.READ_GLOB)):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a killed run: that run is redone
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec
        self.seeds_b, self.seeds_a = _ints(args.seeds), _ints(args.select_seeds)
        self.n_b, self.n_a = args.n, args.select_n
        self.students = [s for s in args.students.split(",") if s.strip()]
        self.ablate = [s for s in args.ablate.split(",") if s.strip() and s in self.students]
        self.select_steps = _ints(args.select_steps)
        if args.quick:
            self.seeds_b, self.seeds_a = self.seeds_b[:2], self.seeds_a[:1]
            self.n_b, self.n_a = min(self.n_b, 30), min(self.n_a, 20)
            self.select_steps = self.select_steps[:2]
        for s in self.students:
            if s not in TEACHER_OF:
                raise ValueError(f"--students must be from {', '.join(STUDENTS)}; got {s!r}")
        self.teacher_steps = args.teacher_steps if args.teacher_steps is not None else (5 if args.quick else None)
        self.budget_s = args.budget_min * 60.0
        self._sf_done, self._sample_s, self._eval_s, self._runs_done = 0, 0.0, 0.0, 0
        self._real: RealFeatures | None = None
        self._pixel_ref: PixelReference | None = None
        self._shape: tuple[int, ...] = (1, 32, 32)
        self.new_runs = 0
        self.plan_only = bool(args.plan)
        # Runs that only read quality results (report, timing) report whatever dtype the JSONL holds.
        self.reads_only = args.stage in ("report", "timing") or bool(args.timing_only)
        self.planned: list[tuple[str, str, int]] = []  # (label, kind, sample forwards)

    # ---- plumbing -----------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def _append(self, rec: dict) -> None:
        last = b""
        if self.jsonl.is_file() and self.jsonl.stat().st_size:
            with self.jsonl.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
        with self.jsonl.open("a") as f:
            if last not in (b"", b"\n"):  # after a line cut short by a killed run, start a fresh one
                f.write("\n")
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec
        self.new_runs += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def real(self) -> RealFeatures:
        if self._real is None:
            images, _ = load_test_set(self.zoo, self.data_dir)
            self._shape = tuple(images.shape[1:])
            clf = self.models.classifier()
            self._real = RealFeatures.from_images(clf, images, batch_size=2000, device=self.device)
            self._real.radii(self.args.k, self.device)
            self._pixel_ref = PixelReference.from_images(images, crop=min(PIXEL_CROP, *self._shape[-2:]))
            self.log(f"test-set features: {tuple(self._real.features.shape)}")
        return self._real

    def _check_budget(self, sf: int) -> None:
        elapsed = time.time() - self.t0
        if self._runs_done == 0 or self._sample_s <= 0:
            estimate = 0.0
        else:
            estimate = sf * self._sample_s / max(self._sf_done, 1) + self._eval_s / self._runs_done
        if elapsed + estimate > self.budget_s:
            raise BudgetExhausted(
                f"stopped at {elapsed:.0f}s: the next run (~{estimate:.0f}s) would pass the {self.budget_s:.0f}s budget"
            )

    def label(self, method: Method) -> str:
        try:
            return method.describe(self.models[method.model])
        except FileNotFoundError:  # a report rebuilt where the models are missing
            return method.describe()

    def method(self, model: str, steps: int | None = None, guidance: dict | None = None) -> Method:
        if model in TEACHERS and steps is None:
            steps = self.teacher_steps
        return Method(model, steps=steps, guidance=guidance)

    @property
    def report_dtype(self) -> str:
        """The dtype whose runs are reported and used for selection: ``--dtype`` if given, this run's when it
        makes quality runs, else the most common in the JSONL (a CPU ``report`` or ``--timing-only`` run
        reads the GPU's float16 runs)."""
        if self.args.dtype:
            return self.args.dtype
        if not self.reads_only:
            return self.dtype_name
        counts: dict[str, int] = {}
        for r in self.records.values():
            if r.get("kind") == "quality" and r.get("standin") == self.standin:
                counts[r["dtype"]] = counts.get(r["dtype"], 0) + 1
        return max(counts, key=counts.get) if counts else self.dtype_name

    def _quality_key(self, method: Method, split: str, seed: int, n: int, dtype: str | None = None) -> str:
        tag = "|standin" if self.standin else ""
        return f"q|{split}|{method.key()}|seed={seed}|n={n}|{dtype or self.dtype_name}{tag}"

    def quality(self, method: Method, split: str, seed: int) -> dict | None:
        """One run: ``n`` balanced samples of ``method`` from ``seed``, scored against the test set."""
        n = self.n_b if split == "B" else self.n_a
        key = self._quality_key(method, split, seed, n)
        if key in self.records:
            return self.records[key]
        sf = sample_forwards(method, self.models) * n
        if self.plan_only:
            self.planned.append((f"{split} seed {seed} {self.label(method)}", "quality", sf))
            return None
        self._check_budget(sf)
        real = self.real()
        labels = torch.arange(n) % 10
        noise = initial_noise(seed, n, self._shape)
        rec = {"kind": "quality", "key": key, "split": split, "seed": seed, "n": n, "method": json.loads(method.key()),
               "label": self.label(method), "nfe": sample_forwards(method, self.models), "dtype": self.dtype_name,
               "batch": self.batch, "card": self.card, "date": _now(), "command": _command_line(self.SCRIPT),
               "standin": self.standin}
        self._sync()
        t = time.perf_counter()
        try:
            images = generate(method, self.models, labels, noise, seed, self.batch)
        except NonFiniteError as err:
            rec.update(error=str(err), metrics=None)
            self._append(rec)
            self.log(f"{split} seed {seed} {self.label(method)}: ERROR {err}")
            return rec
        self._sync()
        sample_s = time.perf_counter() - t
        t = time.perf_counter()
        metrics = evaluate_samples(images, labels, self.models.classifier(), real, k=self.args.k,
                                   batch_size=2000, device=self.device)
        metrics.update(pixel_metrics(images, self._pixel_ref))
        eval_s = time.perf_counter() - t
        self._sf_done += sf
        self._sample_s += sample_s
        self._eval_s += eval_s
        self._runs_done += 1
        rec.update(metrics=metrics, sample_seconds=round(sample_s, 3), eval_seconds=round(eval_s, 3))
        self._append(rec)
        self.log(f"{split} seed {seed:>3} {self.label(method):<72} FID {metrics['fid']:8.3f}  "
                 f"P {metrics['precision']:.3f} R {metrics['recall']:.3f} CC {metrics['class_consistency']:.3f}  "
                 f"({sample_s:.1f}s + {eval_s:.1f}s)")
        return rec

    def timing(self, method: Method, batch: int) -> dict | None:
        """Median wall time of one sampler call on ``batch`` images (CUDA-synchronised)."""
        key = f"t|{self.device.type}|{self.card}|{method.key()}|bs={batch}|{self.dtype_name}"
        if key in self.records:
            return self.records[key]
        repeats, warmup = self.repeats, 3 if self.device.type == "cuda" else 1
        if method.model in TEACHERS:  # a reference only, and 25x the cost of a student
            repeats, warmup = min(repeats, 5), 1
        sf = sample_forwards(method, self.models) * batch * (repeats + warmup)
        if self.plan_only:
            self.planned.append((f"timing bs {batch} {self.label(method)}", "timing", sf))
            return None
        if self._runs_done:
            self._check_budget(sf)
        labels = torch.arange(batch) % 10
        noise = initial_noise(0, batch, self._shape)
        times = []
        for i in range(warmup + repeats):
            self._sync()
            t = time.perf_counter()
            generate(method, self.models, labels, noise, i, batch)
            self._sync()
            times.append(time.perf_counter() - t)
        times = sorted(times[warmup:])
        rec = {"kind": "timing", "key": key, "device": self.device.type, "card": self.card,
               "method": json.loads(method.key()), "label": self.label(method),
               "nfe": sample_forwards(method, self.models), "batch": batch, "dtype": self.dtype_name,
               "repeats": repeats, "median_ms": 1000 * times[len(times) // 2], "min_ms": 1000 * times[0],
               "max_ms": 1000 * times[-1], "date": _now(), "command": _command_line(self.SCRIPT), "standin": self.standin}
        self._append(rec)
        self.log(f"timing {self.device.type} bs {batch:>3} {self.label(method):<72} {rec['median_ms']:9.2f} ms")
        return rec

    # ---- settings -----------------------------------------------------------------------------

    def strengths(self, student: str) -> dict[str, tuple[float, ...]]:
        vp = FAMILY[student] == "vp"
        if self.args.quick:
            return {k: v for k, v in QUICK_STRENGTHS.items() if k == "x0" or vp}
        return VP_STRENGTHS if vp else FLOW_STRENGTHS

    def cfg_values(self, student: str) -> list[float | None]:
        if self.args.select_cfg:
            return [float(v) for v in _floats(self.args.select_cfg)]
        if self.args.quick:
            return [None]
        # None = the teacher's own scale (2). The zoo check (benchmarks/results/zoo/check.log) found CFG 1
        # clearly worse for the VP teacher and 1.5 best for the flow teacher; 3 and up worse for both.
        return [1.5, None]

    def grid(self, student: str) -> list[dict]:
        out = []
        for steps in self.select_steps:
            for cfg in self.cfg_values(student):
                for space, values in self.strengths(student).items():
                    for lam in values:
                        out.append({"strength": lam, "space": space, "steps": steps, "renoise": "next",
                                    "teacher_cfg": cfg})
        return out

    def _mean_over(self, method: Method, split: str, metric: str = "fid") -> tuple[float, int]:
        seeds = self.seeds_b if split == "B" else self.seeds_a
        n = self.n_b if split == "B" else self.n_a
        vals = []
        dtype = self.report_dtype
        for s in seeds:
            rec = self.records.get(self._quality_key(method, split, s, n, dtype))
            if rec and rec.get("metrics"):
                vals.append(rec["metrics"][metric])
        m, _ = mean_std(vals)
        return m, len(vals)

    def selected(self, student: str, steps: int = 1) -> dict | None:
        """The grid point with the lowest mean FID on set A among those with ``steps`` guided steps."""
        if self.plan_only:  # any grid point costs the same
            return next((g for g in self.grid(student) if g["steps"] == steps), None)
        best, best_fid = None, math.inf
        for g in self.grid(student):
            if g["steps"] != steps:
                continue
            fid, n = self._mean_over(self.method(student, guidance=g), "A")
            if n == len(self.seeds_a) and fid < best_fid:
                best, best_fid = g, fid
        return best

    def guided_for_timing(self, student: str) -> dict:
        g = self.selected(student, 1)
        if g is None:
            from distillpp.demo import GUIDANCE_PRESETS

            g = {**GUIDANCE_PRESETS.get(student, {"strength": 0.3, "space": "x0"}), "steps": 1, "renoise": "next",
                 "teacher_cfg": None}
        return g

    def ablation_variants(self, student: str) -> list[tuple[str, dict | None]]:
        g = self.selected(student, 1)
        if g is None:
            return []
        lam = g["strength"]
        out: list[tuple[str, dict | None]] = [("student alone", None), ("selected: renoise next, 1 step, K=1", g)]
        out += [(f"renoise {r}", {**g, "renoise": r}) for r in ("same", "random")]
        out += [(f"strength {v:g}", {**g, "strength": v}) for v in self.strengths(student)[g["space"]] if v != lam]
        out += [("2 guided steps, constant strength", {**g, "steps": 2}),
                ("2 guided steps, strength halving per step", {**g, "steps": 2, "strength": [lam, lam / 2]})]
        g2 = self.selected(student, 2)
        if g2 is not None and g2 != {**g, "steps": 2}:
            out.append(("2 guided steps, selected on A separately", g2))
        out.append(("K=4 teacher samples", {**g, "samples": 4}))
        return out

    # ---- stages -------------------------------------------------------------------------------

    def run_main_students(self) -> None:
        for s in self.students:
            for seed in self.seeds_b:
                self.quality(self.method(s), "B", seed)

    def run_select(self) -> None:
        for s in self.students:
            for seed in self.seeds_a:
                self.quality(self.method(s), "A", seed)
            for g in self.grid(s):
                for seed in self.seeds_a:
                    self.quality(self.method(s, guidance=g), "A", seed)

    def run_main_guided(self) -> None:
        for s in self.students:
            g = self.selected(s, 1)
            if g is None:
                self.log(f"{s}: no complete selection on set A yet; guided row skipped")
                continue
            for seed in self.seeds_b:
                self.quality(self.method(s, guidance=g), "B", seed)

    def run_teachers(self) -> None:
        for t in dict.fromkeys(TEACHER_OF[s] for s in self.students):
            for seed in self.seeds_b:
                self.quality(self.method(t), "B", seed)

    def run_cost(self, quality: bool = True) -> None:
        for s in self.students:
            if quality:
                for steps in (5, 6):
                    for seed in self.seeds_b:
                        self.quality(self.method(s, steps), "B", seed)
        self.run_timing()

    def run_timing(self) -> None:
        batches = self.timing_batches
        for s in self.students:
            methods = [self.method(s), self.method(s, guidance=self.guided_for_timing(s)),
                       self.method(s, 5), self.method(s, 6)]
            for m in methods:
                for b in batches:
                    self.timing(m, b)
        if self.device.type == "cuda":
            for t in dict.fromkeys(TEACHER_OF[s] for s in self.students):
                for b in batches:
                    self.timing(self.method(t), b)

    def run_ablation(self) -> None:
        for s in self.ablate:
            for _, g in self.ablation_variants(s):
                for seed in self.seeds_b:
                    self.quality(self.method(s, guidance=g), "B", seed)

    def run(self, stage: str) -> None:
        self.log(f"device {self.card}, dtype {self.dtype_name}, batch {self.batch}, out {self.out}, "
                 f"{len(self.records)} finished runs in {self.jsonl.name}")
        if self.args.timing_only or stage == "timing":
            self.run_timing()
            return
        plan: list[Callable[[], None]] = {
            "all": [self.run_main_students, self.run_select, self.run_main_guided, self.run_teachers,
                    self.run_cost, self.run_ablation],
            "main": [self.run_main_students, self.run_main_guided, self.run_teachers],
            "select": [self.run_select],
            "cost": [self.run_cost],
            "ablation": [self.run_ablation],
            "report": [],
        }[stage]
        for step in plan:
            step()

    # ---- report -------------------------------------------------------------------------------

    def _row(self, method: Method, split: str = "B", baseline: Method | None = None) -> dict:
        seeds = self.seeds_b if split == "B" else self.seeds_a
        n = self.n_b if split == "B" else self.n_a
        dtype = self.report_dtype
        recs = [self.records.get(self._quality_key(method, split, s, n, dtype)) for s in seeds]
        done = [r for r in recs if r and r.get("metrics")]
        row: dict[str, Any] = {"label": self.label(method), "method": json.loads(method.key()),
                               "seeds": [r["seed"] for r in done], "n": n,
                               "errors": [r["error"] for r in recs if r and r.get("error")]}
        try:
            row["nfe"] = sample_forwards(method, self.models)
        except Exception:  # models not loadable in a report-only rebuild
            row["nfe"] = next((r["nfe"] for r in done), None)
        for m in METRICS:
            vals = [r["metrics"][m] for r in done if r["metrics"].get(m) is not None]  # older runs lack the pixel checks
            mean, std = mean_std(vals)
            row[m] = {"mean": mean, "std": std, "n": len(vals), "values": vals}
        if baseline is not None:
            base = {r["seed"]: r for r in (self.records.get(self._quality_key(baseline, split, s, n, dtype)) for s in seeds)
                    if r and r.get("metrics")}
            diffs = [r["metrics"]["fid"] - base[r["seed"]]["metrics"]["fid"] for r in done if r["seed"] in base]
            mean, std = mean_std(diffs)
            row["fid_delta"] = {"mean": mean, "std": std, "n": len(diffs), "values": diffs}
        return row

    def _timing(self, method: Method) -> dict:
        """``{"<device>|<batch>": {...}}`` of the newest timing of ``method`` per device type and batch."""
        out: dict[str, dict] = {}
        want = json.loads(method.key())
        for rec in sorted(self.records.values(), key=lambda r: r.get("date", "")):
            if rec.get("kind") == "timing" and rec["method"] == want and rec.get("standin") == self.standin:
                out[f"{rec['device']}|{rec['batch']}"] = {"median_ms": rec["median_ms"], "card": rec["card"],
                                                          "dtype": rec["dtype"], "repeats": rec["repeats"]}
        return out

    def report(self) -> dict:
        models_ok = True
        try:
            for s in self.students:
                for name in (s, TEACHER_OF[s]):
                    self.models[name]
        except FileNotFoundError:
            models_ok = False
        quality = [r for r in self.records.values() if r.get("kind") == "quality" and r.get("standin") == self.standin]
        timing = [r for r in self.records.values() if r.get("kind") == "timing" and r.get("standin") == self.standin]
        rep: dict[str, Any] = {
            "title": "Distillation++ on the Fashion-MNIST zoo",
            "standin": self.standin,
            "written": _now(),
            "report_command": _command_line(self.SCRIPT),
            "protocol": {
                "seeds_B": self.seeds_b, "n_B": self.n_b, "seeds_A": self.seeds_a, "n_A": self.n_a,
                "k": self.args.k, "dtype": self.report_dtype,
                "fid_reference": "zoo classifier penultimate features of the Fashion-MNIST test set (10k)",
                "std": "sample standard deviation over seeds (ddof=1)",
                "selection": "lowest mean FID on set A, per student and number of guided steps",
            },
            "quality_cards": sorted({r["card"] for r in quality}),
            "quality_dates": [min((r["date"] for r in quality), default=None), max((r["date"] for r in quality), default=None)],
            "quality_commands": sorted({r["command"] for r in quality}),
            "timing_cards": sorted({r["card"] for r in timing}),
            "timing_commands": sorted({r["command"] for r in timing}),
            "main": [], "flow": [], "selection": {}, "ablation": {}, "cost": [],
        }
        if not models_ok:
            rep["note"] = "models could not be loaded; NFE columns come from the JSONL"
        for s in self.students:
            t = TEACHER_OF[s]
            section = rep["flow"] if s.startswith("flow") else rep["main"]
            if not any(r["method"] == json.loads(self.method(t).key()) for r in section):
                section.append({"role": "teacher", **self._row(self.method(t))})
            plain = self.method(s)
            section.append({"role": "student", **self._row(plain)})
            g1 = self.selected(s, 1)
            if g1 is not None:
                section.append({"role": "guided", **self._row(self.method(s, guidance=g1), baseline=plain)})
            # Selection grid on set A.
            grid_rows = [{"guidance": None, **self._row(plain, "A")}]
            for g in self.grid(s):
                grid_rows.append({"guidance": g, **self._row(self.method(s, guidance=g), "A", baseline=plain)})
            rep["selection"][s] = {"selected_1_step": g1, "selected_2_steps": self.selected(s, 2), "grid": grid_rows}
            # Cost.
            for label, m in (("4 steps", plain), ("4 steps + 1 guided", self.method(s, guidance=self.guided_for_timing(s))),
                             ("5 steps", self.method(s, 5)), ("6 steps", self.method(s, 6))):
                rep["cost"].append({"student": s, "setting": label, **self._row(m, baseline=plain),
                                    "timing": self._timing(m)})
        for s in self.ablate:
            rep["ablation"][s] = [{"variant": v, **self._row(self.method(s, guidance=g), baseline=self.method(s))}
                                  for v, g in self.ablation_variants(s)]
        return rep


def _ms(t: dict, key: str) -> str:
    return f"{t[key]['median_ms']:.1f}" if key in t else "–"


def _direction(values: list[float], tol: float = 1e-6) -> str:
    if all(v < -tol for v in values):
        return "better on every seed"
    if all(v > tol for v in values):
        return "worse on every seed"
    return "mixed"


def _delta(row: dict) -> str:
    d = row.get("fid_delta")
    if not d or d["n"] == 0:
        return "–"
    vals = d["values"]
    if not any(vals):
        return "0 (same samples)"
    sign = _direction(vals)
    return f"{format_mean_std(d, 3)} ({sign})" if d["n"] > 1 else f"{d['mean']:+.3f}"


def _quality_table(rows: Iterable[dict], first: str = "method", extra: tuple[str, ...] = ()) -> list[str]:
    head = (f"| {first} | NFE | FID ↓ | precision ↑ | recall ↑ | class consistency ↑ | HF ratio (1 = real) | "
            "pixel FD ↓ | ΔFID vs student (paired) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        name = r.get("variant") or r["label"]
        lines.append(
            f"| {name} | {r.get('nfe') if r.get('nfe') is not None else '–'} | {format_mean_std(r['fid'], 3)} | "
            f"{format_mean_std(r['precision'], 3)} | {format_mean_std(r['recall'], 3)} | "
            f"{format_mean_std(r['class_consistency'], 3)} | {format_mean_std(r.get('hf_ratio'), 2)} | "
            f"{format_mean_std(r.get('pixel_fd'), 2)} | {_delta(r)} |"
        )
    return lines


PIXEL_NOTE = ("HF ratio = mean squared Laplacian of the 28x28 crop over that of the test set (1 = as much "
              "pixel-level detail as real images; salt-and-pepper speckle shows as >> 1, blur as < 1); pixel FD = "
              "Fréchet distance of 2x2-average-pooled pixels of the crop (196 dims) to the test set's.")


def report_header(rep: dict) -> list[str]:
    """The Markdown title, and the warning that stand-in models' numbers mean nothing."""
    lines = [f"# {rep['title']}", ""]
    if rep["standin"]:
        lines += ["**STAND-IN MODELS (random init): these numbers only show that the pipeline runs.**", ""]
    return lines


def to_markdown(rep: dict) -> str:
    p = rep["protocol"]
    lines = report_header(rep)
    lines += [
        f"- Quality runs: card {', '.join(rep['quality_cards']) or '–'}; dates {rep['quality_dates'][0]} .. "
        f"{rep['quality_dates'][1]}; dtype {p['dtype']}.",
        *[f"  - command: `{c}`" for c in rep["quality_commands"]],
        f"- Timings: {', '.join(rep['timing_cards']) or '–'}.",
        *[f"  - command: `{c}`" for c in rep["timing_commands"]],
        f"- This report: written {rep['written']} by `{rep['report_command']}`.",
        f"- Reported numbers: seed set B = {p['seeds_B']}, N = {p['n_B']} samples per run (balanced classes); "
        f"mean ± {p['std']}. Guidance settings: {p['selection']} (set A = seeds {p['seeds_A']}, N = {p['n_A']}).",
        f"- FID on {p['fid_reference']}; improved precision/recall with k = {p['k']}; class consistency = fraction "
        f"of samples the classifier assigns to the requested class. {PIXEL_NOTE} Every method starts from the same noise for a "
        "seed, so ΔFID is a paired per-seed difference (negative = guidance helps).",
        "",
        "## Main table (seed set B)",
        "",
        *_quality_table(rep["main"]),
        "",
        "## Flow models (issue 5, seed set B)",
        "",
        *_quality_table(rep["flow"]),
        "",
        "## Cost: 4 steps + 1 guided step vs 5 and 6 student steps",
        "",
        "Wall time of one sampler call (median of repeats; CUDA-synchronised on GPU).",
        "",
        "| student | setting | NFE | FID ↓ | class consistency ↑ | GPU ms, batch 1 | GPU ms, batch 64 | CPU ms, batch 1 | CPU ms, batch 64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["cost"]:
        t = r["timing"]
        lines.append(
            f"| {r['student']} | {r['setting']} | {r.get('nfe', '–')} | {format_mean_std(r['fid'], 3)} | "
            f"{format_mean_std(r['class_consistency'], 3)} | {_ms(t, 'cuda|1')} | {_ms(t, 'cuda|64')} | "
            f"{_ms(t, 'cpu|1')} | {_ms(t, 'cpu|64')} |"
        )
    for s, rows in rep["ablation"].items():
        lines += ["", f"## Ablation: {s} (seed set B)", "", *_quality_table(rows, "variant")]
    lines += ["", "## Guidance settings chosen on seed set A", ""]
    for s, sel in rep["selection"].items():
        lines += [f"### {s}", "", f"- selected (1 guided step): `{json.dumps(sel['selected_1_step'])}`",
                  f"- selected (2 guided steps): `{json.dumps(sel['selected_2_steps'])}`", ""]
        rows = sorted(sel["grid"], key=lambda r: (r["fid"]["mean"] if math.isfinite(r["fid"]["mean"]) else math.inf))
        lines += _quality_table(rows)
        lines.append("")
    lines += [_verdict(rep), ""]
    return "\n".join(lines)


def _verdict(rep: dict) -> str:
    out = ["## Does teacher guidance help? (seed set B, paired ΔFID)", ""]
    for r in rep["main"] + rep["flow"]:
        if r.get("role") != "guided":
            continue
        d = r.get("fid_delta")
        if not d or not d["n"]:
            continue
        word = {"better on every seed": "improves FID on every seed",
                "worse on every seed": "makes FID worse on every seed",
                "mixed": "does not change FID consistently"}[_direction(d["values"])]
        out.append(f"- {r['label']}: ΔFID {format_mean_std(d, 3)} over {d['n']} seeds: {word}.")
    return "\n".join(out)


def _finite(obj: Any) -> Any:
    """NaN/Inf to ``None`` so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(bench: Bench) -> dict:
    rep = bench.report()
    (bench.out / "fmnist_eval.json").write_text(json.dumps(_finite(rep), indent=1, allow_nan=False) + "\n")
    (bench.out / "fmnist_eval.md").write_text(to_markdown(rep))
    return rep


def summary_table(rep: dict) -> str:
    return "\n".join(_quality_table(rep["main"] + rep["flow"]))


def main(argv: list[str] | None = None, zoo: Any = None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench(args, zoo)
    if bench.plan_only:
        bench.run(args.stage if args.stage != "report" else "all")
        total = sum(sf for _, _, sf in bench.planned)
        for kind in ("quality", "timing"):
            rows = [p for p in bench.planned if p[1] == kind]
            print(f"{kind}: {len(rows)} runs to do, {sum(sf for *_, sf in rows) / 1e6:.2f}M image-network evaluations")
        print(f"total {total / 1e6:.2f}M image-network evaluations ({len(bench.records)} runs already done)")
        return 0
    stopped = None
    try:
        if args.stage != "report":
            bench.run(args.stage)
    except BudgetExhausted as err:
        stopped = str(err)
        bench.log(f"{stopped}; rerun the same command to resume")
    finally:
        rep = write_report(bench)
    print()
    print(summary_table(rep))
    print()
    print(f"{bench.new_runs} new runs ({len(bench.records)} in total) in {bench.jsonl}")
    print(f"report: {bench.out / 'fmnist_eval.md'} and fmnist_eval.json ({time.time() - bench.t0:.0f}s)")
    if stopped:
        print(f"INCOMPLETE: {stopped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
