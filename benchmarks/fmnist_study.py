#!/usr/bin/env python3
"""Where does the teacher help? A guidance study on the Fashion-MNIST zoo (issue 13, part 1).

For each student (lcm, pd, flow-student) and its teacher, coarse to fine on the selection seed set
(``--select-seeds``, ``--samples`` images per run, lowest FID wins at each stage):

1. renoise ``same`` / ``next`` / ``random`` x strength (``--strengths``), one guided step, x0 fusion;
2. which step is guided, with the best renoise: the second only (strength ``(0, λ)``: the teacher runs
   once, at step 2), the first two (``(λ, λ)``) and a decaying schedule (``(λ, λ/2)``), for the stage-1
   strengths from 0.5 up (the previous study found the best strengths there);
3. eps-space fusion (VP students; flow students start at sigma = 1e8 where eps-space cancels), one step;
4. K = 4 teacher draws averaged, and teacher CFG 1 (halves the guided step's cost) and 1.5, at the best so far.

Strengths stop at 1 (the teacher's x0 replaces the student's): ``TeacherGuidance`` refuses
extrapolation beyond it. The best ``--top`` settings, the best one that calls the teacher once (the
paper's "4 + 1"), and the demo's current preset are then reported on the disjoint reporting seed set
(``--seeds``, ``--report-samples`` images per run) with the baselines: the student's 4, 5 and 6 plain
steps (and as many plain steps as each guided row costs forwards), and the teacher at its 50 steps.
Every row: FID on the zoo classifier's features (mean ± sample std over seeds), paired ΔFID against the
4-step student and against plain steps of equal cost, the high-frequency energy ratio and pixel Fréchet
distance (:mod:`distillpp.metrics.pixels`), and the cost in network forwards per image.

Cost (``--plan``): about 160 runs, 1.1M images, 12M image-forwards; estimated 5.5-6.5 min on one H100/H200
(the 50-step teachers alone ~100 s), ~4 min split over two GPUs (``--gpus auto``). ``--budget-s`` stops
starting runs in time; the most important run first (selection, the chosen settings with their plain
baselines, the best single teacher call, the teachers, then the runners-up and the old demo preset) and a
rerun resumes.

Finished runs are appended to ``<out>/fmnist_study_runs*.jsonl`` (keyed by the models' weights, so a
folder of retrained models never reuses stale runs); a rerun skips them and resumes. Outputs in ``--out``:
``fmnist_study.md`` / ``.json`` (tables), ``fmnist_study_best.json`` (a list of reporting-set rows
``{model, guidance, steps, seed_set, fid_mean, fid_std, ...}``: the data-based best per student and the
baselines, for the tuner's validation), ``fmnist_study_chosen.json`` (per zoo preset, the setting with the
lowest selection FID under ``"lowest_fid"`` and the best that calls the teacher once under ``"one_teacher_call"``,
each a preset-override file as ``generate --overrides`` reads it: ``{"preset": "zoo-lcm", "guidance": {...}}``;
their numbers are the ``chosen`` / ``best with one teacher call`` rows of ``fmnist_study_best.json``) and ``fmnist_study_grid.png``
(teacher / student / student + chosen guidance from the same noise).

    python benchmarks/fmnist_study.py --device cuda --gpus auto --budget-s 285 --out /tmp/study   # GPU
    python benchmarks/fmnist_study.py --plan --device cpu                              # runs to do, GPU estimate
    python benchmarks/fmnist_study.py --device cpu --samples 20 --report-samples 40 --seeds 0 --out /tmp/s  # CPU dry run
    python benchmarks/fmnist_study.py --report-only --out /tmp/study                 # tables from the JSONL
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fmnist_eval as fe  # noqa: E402  (also puts src/ on the path in a checkout)

from distillpp.metrics import format_mean_std  # noqa: E402
from distillpp.zoo.harness import TEACHER_OF, Method, initial_noise, sample_forwards, teacher_calls  # noqa: E402

STUDENTS = tuple(TEACHER_OF)
RENOISE = ("same", "next", "random")
STRENGTHS = (0.1, 0.3, 0.5, 0.75, 1.0)
# Host-side cost per image and run on the GPU machine (one generator per image seeded through numpy's
# SeedSequence, per-image noise draws) and the H100's float16 throughput for these 2.7M-parameter UNets:
# 10k samples x 4 forwards took 0.7 s, the 50-step CFG teacher 15 s (benchmarks/results/fmnist_eval.log).
GPU_FORWARDS_PER_S = 6.0e4
HOST_S_PER_IMAGE = 1.0e-4
GPU_S_PER_RUN = 0.2
GPU_STARTUP_S = 35.0
# eps fusion multiplies the correction by sigma_i / sigma' (about 8 at the VP students' first step), so
# its useful strengths are ~30x smaller (benchmarks/results/fmnist_eval.md: 0.03 already hurt).
EPS_STRENGTHS = (0.003, 0.01, 0.03)
PRESET_OF = {s: f"zoo-{s}" for s in STUDENTS}
SCHEDULES = {  # name -> (strength per guided step, guided steps)
    "second step only": lambda lam: ([0.0, lam], 2),
    "first two steps": lambda lam: (lam, 2),
    "first two, decaying": lambda lam: ([lam, lam / 2], 2),
}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in str(text).split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=tuple(fe.DTYPES), default=None,
                   help="network dtype (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--batch", type=int, default=None, help="images per sampler call (default 2500 on cuda, 250 on cpu)")
    p.add_argument("--students", default=",".join(STUDENTS), help="students studied")
    p.add_argument("--select-seeds", default="100", help="selection seed set (disjoint from --seeds)")
    p.add_argument("--samples", type=int, default=5000, help="images per selection run")
    p.add_argument("--seeds", default="0,1,2", help="reporting seed set")
    p.add_argument("--report-samples", type=int, default=10000, help="images per reporting run")
    p.add_argument("--strengths", default=",".join(map(str, STRENGTHS)), help="x0 strengths of stage 1 (each <= 1)")
    p.add_argument("--top", type=int, default=2, help="best selection settings reported per student")
    p.add_argument("--teachers", default=None,
                   help="teachers whose 50-step baseline is reported (default: the students'; 'none')")
    p.add_argument("--teacher-steps", type=int, default=None, help="override the teachers' default steps")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop starting runs that would end after this many seconds (results so far are kept)")
    p.add_argument("--gpus", default="1",
                   help="CUDA devices to split the students over, one process each ('auto': all visible, at most 2)")
    p.add_argument("--out", default="distillpp-out/fmnist-study", help="results folder")
    p.add_argument("--models-dir", default=None, help="zoo models folder (default: the shipped weights)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST folder (default: $DISTILLPP_FASHION_MNIST, else .data/fashion-mnist, else Debian's)")
    p.add_argument("--standin", default=None, metavar="DIR", help="random-init stand-in models and data (plumbing only)")
    p.add_argument("--runs-file", default="fmnist_study_runs.jsonl", help=argparse.SUPPRESS)  # set per GPU process
    p.add_argument("--no-final", action="store_true", help=argparse.SUPPRESS)  # a GPU process: runs only
    p.add_argument("--no-grid", action="store_true", help="skip the PNG grid")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables from the JSONL files")
    p.add_argument("--plan", action="store_true", help="count the runs and image-forwards still to do, run nothing")
    p.add_argument("--quiet", action="store_true", help="no per-run log lines")
    return p


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the argument, before any model loads."""
    students = [s for s in args.students.split(",") if s.strip()]
    if not students or any(s not in STUDENTS for s in students):
        raise ValueError(f"--students must be from {', '.join(STUDENTS)}; got {args.students!r}")
    strengths = _floats(args.strengths)
    if not strengths or any(not 0 < v <= 1 for v in strengths):
        raise ValueError(f"--strengths must be numbers in (0, 1] (TeacherGuidance refuses more); got {args.strengths!r}")
    for name in ("samples", "report_samples", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    sel, rep = set(fe._ints(args.select_seeds)), set(fe._ints(args.seeds))
    if not sel or not rep or sel & rep:
        raise ValueError(f"--select-seeds and --seeds must be non-empty and disjoint; got {args.select_seeds!r}, {args.seeds!r}")
    if args.teachers not in (None, "none"):
        bad = [t for t in args.teachers.split(",") if t not in set(TEACHER_OF.values())]
        if bad:
            raise ValueError(f"--teachers must be from {', '.join(sorted(set(TEACHER_OF.values())))} or 'none'; got {bad}")
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s must be positive, got {args.budget_s}")


def eval_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """fmnist_eval's options for this study (set A = selection, set B = reporting)."""
    ns = fe.build_parser().parse_args(["report"])
    ns.stage = "all"
    for name in ("device", "dtype", "batch", "students", "teacher_steps", "models_dir", "data_dir", "standin", "quiet"):
        setattr(ns, name, getattr(args, name))
    ns.out, ns.seeds, ns.n = args.out, args.seeds, args.report_samples
    ns.select_seeds, ns.select_n = args.select_seeds, args.samples
    ns.budget_min = args.budget_s / 60.0
    ns.ablate = ""
    return ns


class Study(fe.Bench):
    """The study's runs, selection and report, on fmnist_eval's quality runs (set A: selection, B: reporting)."""

    READ_GLOB = "fmnist_study_runs*.jsonl"
    SCRIPT = "benchmarks/fmnist_study.py"

    def __init__(self, args: argparse.Namespace, zoo: Any = None):
        self.study_args = args
        self.RUNS_FILE = args.runs_file
        super().__init__(eval_namespace(args), zoo)
        self.strength_values = _floats(args.strengths)
        teachers = args.teachers
        if teachers is None:
            self.teachers = list(dict.fromkeys(TEACHER_OF[s] for s in self.students))
        else:
            self.teachers = [] if teachers == "none" else [t for t in teachers.split(",") if t.strip()]
        # Every zoo model, not only those this process runs: the processes of a GPU split must agree.
        self.fingerprint = self._fingerprint([*getattr(self.zoo, "ZOO_NAMES", ()), *TEACHER_OF, *TEACHER_OF.values(),
                                              "classifier"])

    # ---- runs ---------------------------------------------------------------------------------

    def _fingerprint(self, names: list[str]) -> str:
        """First 12 hex digits of a SHA-256 over the models' weights and configs: run keys depend on it."""
        h = hashlib.sha256()
        for name in sorted(set(names)):
            try:
                folder = self.zoo.model_dir(name, self.models.models_dir)
            except FileNotFoundError:
                h.update(f"{name}:missing".encode())
                continue
            for f in sorted(folder.iterdir()):
                if f.suffix in (".safetensors", ".json") and f.name != "train_info.json":
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
        return h.hexdigest()[:12]

    def _quality_key(self, method: Method, split: str, seed: int, n: int, dtype: str | None = None) -> str:
        return super()._quality_key(method, split, seed, n, dtype) + f"|models={self.fingerprint}"

    def one_call(self, student: str, guidance: dict) -> bool:
        """The paper's cost: one teacher evaluation (one guided step, one draw) on top of the student's steps."""
        method = self.method(student, guidance=guidance)
        return guidance.get("samples", 1) == 1 and teacher_calls(method, self.models) == 1

    def forwards(self, method: Method) -> tuple[int, str]:
        """Network forwards per image (:func:`~distillpp.zoo.harness.sample_forwards`) and a cost label
        (``4 + 1 teacher call x 2``: a CFG teacher's call is two forwards, K draws K times that)."""
        n = sample_forwards(method, self.models)
        steps = method.resolved_steps(self.models[method.model])
        if not method.guidance:
            return n, f"{steps} steps"
        calls = teacher_calls(method, self.models)
        g = method.build_guidance(self.models[method.teacher])
        per_call = g.samples * (2 if float(g.teacher_cfg) != 1.0 else 1)
        return n, f"{steps} + {calls} teacher call{'s' if calls != 1 else ''} x {per_call}"

    def _a_fid(self, method: Method) -> float:
        fid, n = self._mean_over(method, "A")
        return fid if n == len(self.seeds_a) else math.inf

    def _run_a(self, student: str, guidance: dict | None) -> float:
        m = self.method(student, guidance=guidance)
        for seed in self.seeds_a:
            self.quality(m, "A", seed)
        return self._a_fid(m)

    def _best(self, student: str, grid: list[dict]) -> dict | None:
        """The lowest selection FID among ``grid`` (ties: fewer forwards)."""
        scored = [(self._a_fid(self.method(student, guidance=g)), self.forwards(self.method(student, guidance=g))[0], i)
                  for i, g in enumerate(grid)]
        scored = [s for s in scored if math.isfinite(s[0])]
        return grid[min(scored)[2]] if scored else None

    def stages(self, student: str) -> list[tuple[str, dict]]:
        """``(stage, guidance)`` of every selection run, each stage built from the best of those before it
        (runs that are still missing make the later stages start from the defaults)."""
        vp = fe.FAMILY[student] == "vp"
        base = {"space": "x0", "steps": 1, "samples": 1, "teacher_cfg": None}
        out = [("renoise x strength", {**base, "renoise": r, "strength": lam})
               for r in RENOISE for lam in self.strength_values]
        best = self._best(student, [g for _, g in out]) or {**base, "renoise": "next", "strength": 0.5}
        renoise = best["renoise"]
        for name, make in SCHEDULES.items():
            for lam in [v for v in self.strength_values if v >= 0.5] or self.strength_values[-1:]:
                strength, steps = make(lam)
                out.append((f"which step: {name}", {**base, "renoise": renoise, "strength": strength, "steps": steps}))
        if vp:
            out += [("eps space", {**base, "renoise": renoise, "strength": lam, "space": "eps"}) for lam in EPS_STRENGTHS]
        best = self._best(student, [g for _, g in out]) or best
        out.append(("K teacher draws", {**best, "samples": 4}))
        out += [("teacher CFG", {**best, "teacher_cfg": cfg}) for cfg in (1.0, 1.5)]
        return out

    def run_selection(self, student: str) -> None:
        self._run_a(student, None)
        done: set[str] = set()
        while True:  # each pass may unlock the next stage (its grid depends on earlier results)
            todo = [g for _, g in self.stages(student) if json.dumps(g, sort_keys=True) not in done]
            if not todo:
                return
            for g in todo:
                done.add(json.dumps(g, sort_keys=True))
                self._run_a(student, g)

    def selection_rows(self, student: str) -> list[tuple[str, dict]]:
        seen, rows = set(), []
        for stage, g in self.stages(student):
            k = json.dumps(g, sort_keys=True)
            if k not in seen:
                seen.add(k)
                rows.append((stage, g))
        return rows

    def report_settings(self, student: str) -> list[tuple[str, dict]]:
        """``(role, guidance)`` reported on the reporting set: the best ``--top``, the best with one teacher
        call, the demo's preset."""
        rows = self.selection_rows(student)
        ranked = sorted(((self._a_fid(self.method(student, guidance=g)),
                          self.forwards(self.method(student, guidance=g))[0], i) for i, (_, g) in enumerate(rows)))
        ranked = [r for r in ranked if math.isfinite(r[0])]
        out: list[tuple[str, dict]] = []
        for rank, (_, _, i) in enumerate(ranked[: self.study_args.top]):
            out.append(("chosen" if rank == 0 else f"selection rank {rank + 1}", rows[i][1]))
        one_call = [r for r in ranked if self.one_call(student, rows[r[2]][1])]
        if one_call:
            out.append(("best with one teacher call", rows[one_call[0][2]][1]))
        from distillpp.demo import GUIDANCE_PRESETS

        preset = GUIDANCE_PRESETS.get(student)
        if preset is not None:
            out.append(("demo preset (before this study)",
                        {"space": "x0", "steps": 1, "samples": 1, "renoise": "next", "teacher_cfg": None, **preset}))
        unique, seen = [], set()
        for role, g in out:
            k = json.dumps(g, sort_keys=True)
            if k not in seen:
                seen.add(k)
                unique.append((role, g))
        return unique

    def plain_steps(self, student: str) -> list[int]:
        """The student's own steps, 5 and 6, and the forwards of every reported guided row (equal-cost baselines)."""
        own = self.method(student).resolved_steps(self.models[student])
        extra = [self.forwards(self.method(student, guidance=g))[0] for _, g in self.report_settings(student)]
        return sorted({own, 5, 6, *[e for e in extra if e <= 20]})

    def run_reporting(self, student: str, roles: tuple[str, ...] | None, plain: bool = False) -> None:
        """The reported settings whose role is in ``roles`` (``None``: all), and with ``plain`` the plain baselines."""
        for role, g in self.report_settings(student):
            if roles is None or role in roles:
                for seed in self.seeds_b:
                    self.quality(self.method(student, guidance=g), "B", seed)
        for steps in self.plain_steps(student) if plain else ():
            for seed in self.seeds_b:
                self.quality(self.method(student, steps if steps != 4 else None), "B", seed)

    def run_teachers(self) -> None:
        for t in self.teachers:
            for seed in self.seeds_b:
                self.quality(self.method(t), "B", seed)

    def plan(self) -> dict:
        """Runs and image-forwards still to do, and a rough GPU time: selection runs as they would be with
        the default choices; reporting rows as ``--top`` + 2 guided settings at 6 forwards."""
        images = forwards = runs = 0
        for s in self.students:
            for _, g in [("", None)] + self.selection_rows(s):
                m = self.method(s, guidance=g)
                for seed in self.seeds_a:
                    if self._quality_key(m, "A", seed, self.n_a) not in self.records:
                        runs, images, forwards = runs + 1, images + self.n_a, forwards + self.n_a * self.forwards(m)[0]
            per_seed = [4, 5, 6] + [6] * (self.study_args.top + 2)
            runs += len(per_seed) * len(self.seeds_b)
            images += len(per_seed) * len(self.seeds_b) * self.n_b
            forwards += sum(per_seed) * len(self.seeds_b) * self.n_b
        for t in self.teachers:
            nfe = sample_forwards(self.method(t), self.models)
            runs, images, forwards = runs + len(self.seeds_b), images + self.n_b * len(self.seeds_b), \
                forwards + nfe * self.n_b * len(self.seeds_b)
        gpu_s = GPU_STARTUP_S + forwards / GPU_FORWARDS_PER_S + images * HOST_S_PER_IMAGE + runs * GPU_S_PER_RUN
        return {"runs": runs, "images": images, "image_forwards": forwards, "gpu_seconds_estimate": round(gpu_s)}

    def run(self, stage: str = "all") -> None:  # noqa: ARG002 - one plan
        self.log(f"device {self.card}, dtype {self.dtype_name}, batch {self.batch}, models {self.fingerprint}, "
                 f"out {self.out}, {len(self.records)} finished runs")
        for s in self.students:
            self.run_selection(s)
        # Most important first, in case the budget runs out: the chosen settings and their plain baselines,
        # the best single teacher call (the paper's 4 + 1), the teachers, then the runners-up and the old preset.
        for s in self.students:
            self.run_reporting(s, ("chosen",), plain=True)
        for s in self.students:
            self.run_reporting(s, ("best with one teacher call",))
        self.run_teachers()
        for s in self.students:
            self.run_reporting(s, None)

    # ---- report -------------------------------------------------------------------------------

    def _study_row(self, method: Method, split: str, baseline: Method | None = None) -> dict:
        row = self._row(method, split, baseline)  # its "nfe" is sample_forwards(method)
        row["cost"] = self.forwards(method)[1]
        return row

    def study_report(self) -> dict:
        p = self.study_args
        quality = [r for r in self.records.values() if r.get("kind") == "quality" and r["key"].endswith(self.fingerprint)]
        rep: dict[str, Any] = {
            "title": "Where does the teacher help? Guidance study on the Fashion-MNIST zoo",
            "standin": self.standin, "written": fe._now(), "models": self.fingerprint,
            "models_dir": str(p.models_dir) if p.models_dir else "shipped (src/distillpp/zoo/models)",
            "cards": sorted({r["card"] for r in quality}),
            "dates": [min((r["date"] for r in quality), default=None), max((r["date"] for r in quality), default=None)],
            "commands": sorted({r["command"] for r in quality}),
            "protocol": {"selection_seeds": self.seeds_a, "selection_n": self.n_a, "report_seeds": self.seeds_b,
                         "report_n": self.n_b, "dtype": self.report_dtype, "k": 3,
                         "selection": "coarse to fine, lowest FID on the selection seeds (ties: fewer forwards)",
                         "std": "sample standard deviation over seeds (ddof=1)"},
            "students": {},
            "teachers": [self._study_row(self.method(t), "B") for t in self.teachers],
        }
        for s in self.students:
            plain = self.method(s)
            selection = [{"stage": "student alone", "guidance": None, **self._study_row(plain, "A")}]
            selection += [{"stage": stage, "guidance": g, **self._study_row(self.method(s, guidance=g), "A", plain)}
                          for stage, g in self.selection_rows(s)]
            reporting = []
            for steps in self.plain_steps(s):
                m = self.method(s, steps if steps != 4 else None)
                reporting.append({"role": f"plain {steps} steps", "guidance": None, **self._study_row(m, "B", plain)})
            plain_by_nfe = {r["nfe"]: r["method"] for r in reporting}
            for role, g in self.report_settings(s):
                row = {"role": role, "guidance": g, **self._study_row(self.method(s, guidance=g), "B", plain)}
                equal = plain_by_nfe.get(row["nfe"])
                if equal is not None:
                    eq = self._row(self.method(s, guidance=g), "B", Method(s, equal["steps"]))
                    row["fid_delta_equal_cost"] = {**eq["fid_delta"], "plain_steps": equal["steps"] or 4}
                reporting.append(row)
            rep["students"][s] = {"teacher": TEACHER_OF[s], "selection": selection, "reporting": reporting,
                                  "chosen": next((r["guidance"] for r in reporting if r["role"] == "chosen"), None)}
        return rep

    def knobs(self, student: str, g: dict) -> dict:
        """Guidance as pipeline knobs (the names of preset-override files), teacher CFG resolved."""
        cfg = g.get("teacher_cfg")
        if cfg is None:
            cfg = float(self.models[TEACHER_OF[student]].default_cfg)
        return {"strength": g["strength"], "guided_steps": g.get("steps", 1), "renoise": g.get("renoise", "next"),
                "noise": g.get("noise", "random"), "space": g.get("space", "x0"), "samples": g.get("samples", 1),
                "teacher_cfg": cfg}

    def best_rows(self, rep: dict) -> list[dict]:
        """The reporting-set rows as a flat list (the tuner validation's input)."""
        out = []
        for s, sec in rep["students"].items():
            for r in sec["reporting"]:
                out.append(self._flat(s, r, r["role"]))
        for r in rep["teachers"]:
            out.append(self._flat(r["method"]["model"], r, "teacher"))
        return out

    def _flat(self, model: str, r: dict, role: str) -> dict:
        g = r.get("guidance")
        steps = r["method"]["steps"]
        if steps is None:
            steps = self.models[model].default_steps
        return {"model": model, "teacher": TEACHER_OF.get(model), "preset": PRESET_OF.get(model, f"zoo-{model}"),
                "role": role, "guidance": self.knobs(model, g) if g else None, "steps": int(steps),
                "seed_set": "report", "seeds": r["seeds"], "n": r["n"], "nfe": r["nfe"], "cost": r["cost"],
                "fid_mean": r["fid"]["mean"], "fid_std": r["fid"]["std"], "fid_values": r["fid"]["values"],
                "hf_ratio_mean": r["hf_ratio"]["mean"], "pixel_fd_mean": r["pixel_fd"]["mean"],
                "class_consistency_mean": r["class_consistency"]["mean"],
                "fid_delta_vs_plain": r.get("fid_delta"), "models": self.fingerprint, "dtype": self.report_dtype}

    def chosen_presets(self, rep: dict) -> dict:
        """``{"lowest_fid": {preset: override}, "one_teacher_call": {preset: override}}``: the chosen setting, and
        the best that calls the teacher once (the paper's 4 + 1 cost) - chosen on the selection seeds."""
        out: dict[str, dict] = {"lowest_fid": {}, "one_teacher_call": {}}
        for s, sec in rep["students"].items():
            for section, roles in (("lowest_fid", ("chosen",)), ("one_teacher_call", ("best with one teacher call",))):
                rows = [r for r in sec["reporting"] if r["role"] in roles]
                if section == "one_teacher_call" and not rows and sec["chosen"] is not None \
                        and self.one_call(s, sec["chosen"]):
                    rows = [r for r in sec["reporting"] if r["role"] == "chosen"]
                if rows:
                    out[section][PRESET_OF[s]] = {"preset": PRESET_OF[s], "guidance": self.knobs(s, rows[0]["guidance"])}
        return out

    def write_grid(self, rep: dict) -> Path | None:
        """Each teacher, then its students alone and with their chosen guidance: 10 classes x 2 seeds, same noise."""
        from distillpp.demo import CLASS_NAMES, _row_label, comparison_grid
        from distillpp.zoo.harness import generate

        rows, seeds = [], (0, 1)
        labels = torch.arange(10)
        methods = []
        for t in dict.fromkeys(TEACHER_OF[s] for s in self.students):
            methods.append(self.method(t))
            for s in [s for s in self.students if TEACHER_OF[s] == t]:
                chosen = rep["students"][s]["chosen"]
                methods += [self.method(s)] + ([self.method(s, guidance=chosen)] if chosen is not None else [])
        for m in methods:
            images = torch.cat([generate(m, self.models, labels, initial_noise(seed, 10, self._shape), seed, 20)
                                for seed in seeds])
            rows.append((*_row_label(m, self.models), images))
        columns = [(CLASS_NAMES[c], f"seed {seed}") for seed in seeds for c in range(10)]
        path = self.out / "fmnist_study_grid.png"
        comparison_grid(rows, columns).save(path)
        return path


def _fmt(stat: dict | None, digits: int = 3) -> str:
    return format_mean_std(stat, digits)


def _delta_text(d: dict | None) -> str:
    if not d or not d.get("n"):
        return "–"
    if not any(d["values"]):
        return "0 (same samples)"
    word = fe._direction(d["values"]).replace(" on every seed", "")
    return f"{_fmt(d)} ({word})" if d["n"] > 1 else f"{d['mean']:+.3f}"


def _table(rows: list[dict], first: str, name) -> list[str]:
    lines = [f"| {first} | forwards/image | cost | FID ↓ | HF ratio | pixel FD ↓ | class consistency | ΔFID vs 4 steps | "
             "ΔFID vs plain steps of equal cost |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        eq = r.get("fid_delta_equal_cost")
        eq_text = f"{_delta_text(eq)} vs {eq['plain_steps']} steps" if eq else "–"
        lines.append(f"| {name(r)} | {r['nfe']} | {r['cost']} | {_fmt(r['fid'])} | {_fmt(r['hf_ratio'], 2)} | "
                     f"{_fmt(r['pixel_fd'], 2)} | {_fmt(r['class_consistency'])} | {_delta_text(r.get('fid_delta'))} | "
                     f"{eq_text} |")
    return lines


def _g_text(g: dict | None) -> str:
    return "–" if g is None else "`" + json.dumps(g, separators=(", ", ": ")) + "`"


def _summary(rep: dict) -> list[str]:
    """One line per student and reported setting: does guidance beat the 4-step student, and plain steps of the
    same cost, on every reporting seed?"""
    teacher_fid = {r["method"]["model"]: r["fid"] for r in rep["teachers"]}
    lines = ["## Summary (reporting seeds; paired over seeds)", "",
             "| student | setting | forwards/image | FID ↓ | vs 4 plain steps | vs plain steps of equal cost | "
             "best plain 5-6 steps | teacher |", "|---|---|---:|---:|---|---|---:|---:|"]
    for s, sec in rep["students"].items():
        plain = {r["nfe"]: r for r in sec["reporting"] if r["guidance"] is None}
        best_plain = min((plain[k] for k in (5, 6) if k in plain and plain[k]["fid"]["n"]),
                         key=lambda r: r["fid"]["mean"], default=None)
        for r in sec["reporting"]:
            if r["guidance"] is None or not r["fid"]["n"]:
                continue
            eq = r.get("fid_delta_equal_cost")
            lines.append(
                f"| {s} | {r['role']}: {r['label'].split(' + guided ', 1)[-1]} | {r['nfe']} | {_fmt(r['fid'])} | "
                f"{_delta_text(r.get('fid_delta'))} | {(_delta_text(eq) + ' vs ' + str(eq['plain_steps'])) if eq else '–'} | "
                f"{(_fmt(best_plain['fid']) + ' (' + str(best_plain['nfe']) + ')') if best_plain else '–'} | "
                f"{_fmt(teacher_fid.get(sec['teacher']))} |")
    return lines + [""]


def to_markdown(rep: dict) -> str:
    p = rep["protocol"]
    lines = fe.report_header(rep)
    lines += [
        f"- Runs: card {', '.join(rep['cards']) or '–'}; dates {rep['dates'][0]} .. {rep['dates'][1]}; dtype "
        f"{p['dtype']}; models {rep['models_dir']} (weights fingerprint {rep['models']}).",
        *[f"  - command: `{c}`" for c in rep["commands"]],
        f"- Selection: {p['selection']}, seeds {p['selection_seeds']}, N = {p['selection_n']}. Reporting: seeds "
        f"{p['report_seeds']}, N = {p['report_n']} per seed (balanced classes), mean ± {p['std']}.",
        f"- FID on the zoo classifier's penultimate features vs the 10k test set. {fe.PIXEL_NOTE} Forwards/image "
        "counts a CFG forward twice and K teacher draws K times; a guided step with strength 0 does not call "
        "the teacher. ΔFID is paired per seed (same noise; negative = better).",
        "",
    ]
    lines += _summary(rep)
    if rep["teachers"]:
        lines += ["## Teachers (reporting seeds)", "", *_table(rep["teachers"], "teacher", lambda r: r["label"]), ""]
    for s, sec in rep["students"].items():
        lines += [f"## {s} (teacher: {sec['teacher']})", "", f"Chosen on the selection seeds: {_g_text(sec['chosen'])}", "",
                  "### Reporting seeds", "",
                  *_table(sec["reporting"], "setting", lambda r: f"{r['role']}: {r['label']}"), "",
                  "### Selection grid (selection seeds, sorted by FID)", ""]
        rows = sorted(sec["selection"], key=lambda r: r["fid"]["mean"] if r["fid"]["n"] else math.inf)
        lines += _table(rows, "stage: setting", lambda r: f"{r['stage']}: {r['label']}")
        lines.append("")
    return "\n".join(lines)


def write_outputs(study: Study, grid: bool = True) -> dict:
    rep = study.study_report()
    out = study.out
    (out / "fmnist_study.json").write_text(json.dumps(fe._finite(rep), indent=1, allow_nan=False) + "\n")
    (out / "fmnist_study.md").write_text(to_markdown(rep))
    (out / "fmnist_study_best.json").write_text(json.dumps(fe._finite(study.best_rows(rep)), indent=1) + "\n")
    (out / "fmnist_study_chosen.json").write_text(json.dumps(fe._finite(study.chosen_presets(rep)), indent=1) + "\n")
    if grid:
        try:
            study.write_grid(rep)
        except Exception as err:  # the tables matter more than the picture
            study.log(f"grid not written: {type(err).__name__}: {err}")
    return rep


def _gpu_count(text: str) -> int:
    if text == "auto":
        return min(torch.cuda.device_count(), 2)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--gpus must be 'auto' or an integer >= 1, got {text!r}")
    return min(n, max(torch.cuda.device_count(), 1))


def run_split(args: argparse.Namespace, argv: list[str], gpus: int) -> None:
    """One process per GPU: the VP students on cuda:0, the flow student and every teacher baseline
    (the slowest runs) on cuda:1; each appends to its own JSONL and the parent writes the report."""
    students = [s for s in args.students.split(",") if s.strip()]
    vp = [s for s in students if fe.FAMILY[s] == "vp"]
    flow = [s for s in students if fe.FAMILY[s] != "vp"]
    teachers = args.teachers or ",".join(dict.fromkeys(TEACHER_OF[s] for s in students))
    parts = [(vp, "none"), (flow, teachers)] if vp and flow else [(students[:1], "none"), (students[1:], teachers)]
    # Drop the options each part sets itself.
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--gpus", "--students", "--teachers", "--device", "--budget-s"):
            skip = True
            continue
        if a.startswith(("--gpus=", "--students=", "--teachers=", "--device=", "--budget-s=")):
            continue
        cleaned.append(a)
    procs = []
    for i, (part, tea) in enumerate(parts[:gpus]):
        if not part:
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), *cleaned, "--students", ",".join(part), "--teachers", tea,
               "--device", f"cuda:{i}" if torch.cuda.is_available() else "cpu", "--budget-s", str(max(args.budget_s - 25, 10)),
               "--runs-file", f"fmnist_study_runs.gpu{i}.jsonl", "--no-final"]
        procs.append(subprocess.Popen(cmd))
    for proc in procs:
        proc.wait()


def main(argv: list[str] | None = None, zoo: Any = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    gpus = _gpu_count(args.gpus)
    t0 = time.time()
    stopped = None
    if args.plan:
        print(json.dumps(Study(args, zoo).plan()))
        return 0
    if gpus > 1 and not args.report_only and not args.no_final:
        run_split(args, argv, gpus)
        args.device = args.device or "cuda:0"
        study = Study(args, zoo)
    else:
        study = Study(args, zoo)
        if not args.report_only:
            try:
                study.run()
            except fe.BudgetExhausted as err:
                stopped = str(err)
                study.log(f"{stopped}; rerun the same command to resume")
    if args.no_final:
        return 0
    rep = write_outputs(study, grid=not args.no_grid)
    for s, sec in rep["students"].items():
        print(f"\n{s}: chosen {_g_text(sec['chosen'])}")
        print("\n".join(_table(sec["reporting"], "setting", lambda r: f"{r['role']}: {r['label']}")))
    print(f"\n{study.new_runs} new runs ({len(study.records)} in total); report {study.out / 'fmnist_study.md'} "
          f"({time.time() - t0:.0f}s)")
    if stopped:
        print(f"INCOMPLETE: {stopped}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"fmnist_study.py: error: {err}", file=sys.stderr)
        sys.exit(2)
