#!/usr/bin/env python3
"""Does the data-free tuner (``distillpp tune``) choose as well as the Fashion-MNIST study? (issue 13, part 3)

1. **Tune, without data**: for every shipped zoo student (``zoo-lcm``, ``zoo-pd``, ``zoo-flow-student``)
   run :func:`distillpp.tune` (seed :data:`distillpp.tuning.TUNE_SEED`, apart from the study's seeds).
   ``DISTILLPP_FASHION_MNIST`` points at an empty folder while it runs, and no data is loaded before
   every tuner has finished, so the choice cannot have seen Fashion-MNIST.
2. **Evaluate with data**, by ``benchmarks/fmnist_eval.py``'s own protocol and code (its ``Bench.quality``:
   N samples per seed, balanced classes, FID on the zoo classifier's features against the 10k test set)
   on the reporting seeds: the tuner's choice and the best setting of the study's results file (``--study``:
   the lowest mean FID on the reporting seeds among that student's rows at its default step count, plain
   student included), both measured in this run from the same noise, so the per-seed differences are paired.
3. **Verdict** per student: "within the seed spread" when the tuner's mean FID exceeds the best's by no
   more than the larger of the two sample standard deviations over seeds; otherwise by how much. The best
   on the reporting seeds is an optimistic target (it is picked on those seeds); the study's own choice,
   made on its selection seeds, is measured and compared too.

Writes ``tune_validation.json`` / ``.md``, the per-student tuner results and override files, and
fmnist_eval's JSONL of the runs under ``--out``.

    python benchmarks/tune_validation.py --device cuda --out runs/tune_validation          # GPU, a few minutes
    python benchmarks/tune_validation.py --device cpu --n 200 --seeds 0 --images-per-prompt 1 \\
        --reference-steps 4 --budget 3000 --out /tmp/tv                                      # CPU plumbing check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
try:
    import distillpp  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import fmnist_eval  # noqa: E402  (the study's protocol: reused, not copied)
import torch  # noqa: E402

from distillpp.metrics import format_mean_std, mean_std  # noqa: E402
from distillpp.tuning import STRENGTHS, TUNE_SEED, tune  # noqa: E402
from distillpp.zoo.harness import Method  # noqa: E402

STUDENTS = ("lcm", "pd", "flow-student")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float16", "float32", "bfloat16"), default=None,
                   help="network dtype for tuning and evaluation (default: float16 on cuda, float32 on cpu: the "
                        "study's)")
    p.add_argument("--students", default=",".join(STUDENTS), help="zoo students to tune and evaluate")
    p.add_argument("--study", default=str(HERE / "results" / "fmnist_eval.json"),
                   help="the data-based study's results: fmnist_study.py's fmnist_study_best.json or fmnist_eval.json "
                        "(its best setting per student is the comparison)")
    # Tuner (data-free).
    p.add_argument("--images-per-prompt", type=int, default=200,
                   help="tuner images per class (10 classes; the tuner's CPU default is 2)")
    p.add_argument("--reference-steps", type=int, default=50, help="tuner: teacher reference steps")
    p.add_argument("--budget", type=int, default=2_000_000, help="tuner: image-forwards per student")
    p.add_argument("--strengths", default=",".join(map(str, STRENGTHS)), help="tuner: x0 strengths tried")
    p.add_argument("--margin", type=float, default=2.0, help="tuner: standard errors a guided setting must win by")
    p.add_argument("--tune-seed", type=int, default=TUNE_SEED, help="tuner seed (apart from --seeds)")
    # Evaluation (fmnist_eval's protocol).
    p.add_argument("--seeds", default=None, help="reporting seeds (default: the study's seed set B)")
    p.add_argument("--n", type=int, default=None, help="samples per seed (default: the study's, 10000)")
    p.add_argument("--batch", type=int, default=None, help="images per sampler call in the evaluation")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder for the evaluation (see fmnist_eval)")
    p.add_argument("--models-dir", default=None,
                   help="zoo models folder (default: the shipped weights; give the study's if it used retrained ones)")
    p.add_argument("--out", default="distillpp-out/tune_validation", help="results folder")
    return p


def normalize(knobs: dict | None, default_cfg: float | None) -> dict | None:
    """Guidance knobs in one form (pipeline names, defaults filled in, teacher CFG a number); ``None`` = plain.

    Args:
        knobs: harness style (``steps``) or pipeline style (``guided_steps``), or ``None``.
        default_cfg: the teacher CFG that a missing/``None`` ``teacher_cfg`` stands for in that source.
    """
    if not knobs:
        return None
    g = dict(knobs)
    strength = g.get("strength", 0.0)
    strength = [float(v) for v in strength] if isinstance(strength, (list, tuple)) else float(strength)
    steps = int(g.get("guided_steps", g.get("steps", 1)))
    if steps == 0 or (not isinstance(strength, list) and strength == 0.0) or \
            (isinstance(strength, list) and not any(strength[:steps])):
        return None
    cfg = g.get("teacher_cfg")
    return {"strength": strength, "guided_steps": steps, "renoise": g.get("renoise", "next"),
            "noise": g.get("noise", "random"), "space": g.get("space", "x0"), "samples": int(g.get("samples", 1)),
            "teacher_cfg": float(cfg if cfg is not None else default_cfg)}


def load_study(path: Path, student: str, teacher_cfg: float, default_steps: int) -> tuple[list[dict], dict]:
    """The study's rows of ``student`` on its reporting seeds at the default step count, plain and guided.

    Reads either ``benchmarks/fmnist_study.py``'s ``fmnist_study_best.json`` (a flat list of reporting-set rows)
    or ``benchmarks/fmnist_eval.py``'s ``fmnist_eval.json`` (every section but ``selection``, which is seed set
    A). Rows with another step count (the cost rows) are left out: the tuner does not change the steps.

    Returns:
        ``(rows, protocol)``: rows ``{"label", "knobs" (normalised or None), "fid": {mean, std, values, n},
        "seeds", "n", "chosen"}`` (``chosen``: the study's own choice on its selection seeds); protocol
        ``{"seeds", "n", "written", "cards"}``.
    """
    data = json.loads(path.read_text())
    rows: dict[str, dict] = {}
    if isinstance(data, list):  # fmnist_study_best.json
        for r in data:
            if r.get("model") != student or r.get("seed_set") != "report" or int(r.get("steps", -1)) != default_steps:
                continue
            if r.get("fid_mean") is None:
                continue
            knobs = normalize(r.get("guidance"), teacher_cfg)
            vals = r.get("fid_values") or []
            row = rows.setdefault(json.dumps(knobs, sort_keys=True), {
                "label": r.get("role", ""), "knobs": knobs, "seeds": r.get("seeds"), "n": r.get("n"),
                "fid": {"mean": r["fid_mean"], "std": r.get("fid_std"), "values": vals, "n": len(vals)}})
            row["chosen"] = row.get("chosen", False) or r.get("role") == "chosen"
        first = next(iter(rows.values()), {})
        protocol = {"seeds": first.get("seeds"), "n": first.get("n"), "written": None,
                    "cards": sorted({str(r.get("dtype")) for r in data if isinstance(r, dict)})}
        return list(rows.values()), protocol

    def walk(node: Any, key: str = "") -> None:
        if key == "selection":
            return
        if isinstance(node, dict):
            m = node.get("method")
            if isinstance(m, dict) and m.get("model") == student and m.get("steps") in (None, default_steps) \
                    and m.get("cfg") is None and isinstance(node.get("fid"), dict) \
                    and node["fid"].get("mean") is not None and node["fid"].get("n"):
                knobs = normalize(m.get("guidance"), teacher_cfg)
                row = rows.setdefault(json.dumps(knobs, sort_keys=True), {
                    "label": node.get("variant") or node.get("label", ""), "knobs": knobs, "seeds": node.get("seeds"),
                    "n": node.get("n"), "fid": node["fid"]})
                row["chosen"] = row.get("chosen", False) or node.get("role") == "guided"
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)

    walk(data)
    p = data.get("protocol", {})
    return list(rows.values()), {"seeds": p.get("seeds_B"), "n": p.get("n_B"), "written": data.get("written"),
                                 "cards": data.get("quality_cards")}


def method_of(student: str, knobs: dict | None) -> Method:
    """The harness :class:`Method` of normalised knobs (``None``: the plain student)."""
    if knobs is None:
        return Method(student)
    g = {"strength": knobs["strength"], "steps": knobs["guided_steps"], "renoise": knobs["renoise"],
         "space": knobs["space"], "teacher_cfg": knobs["teacher_cfg"]}
    if knobs["noise"] != "random":
        g["noise"] = knobs["noise"]
    if knobs["samples"] != 1:
        g["samples"] = knobs["samples"]
    return Method(student, guidance=g)


def stats(recs: list[dict]) -> dict:
    vals = [r["metrics"]["fid"] for r in recs if r and r.get("metrics")]
    mean, std = mean_std(vals)
    return {"mean": mean, "std": std, "n": len(vals), "values": vals, "seeds": [r["seed"] for r in recs if r]}


def verdict(tuned: dict, best: dict) -> dict:
    diff = tuned["mean"] - best["mean"]
    spread = max(v for v in (best["std"], tuned["std"], 0.0) if isinstance(v, float) and math.isfinite(v))
    paired = [a - b for a, b in zip(tuned["values"], best["values"])]
    pm, ps = mean_std(paired)
    within = diff <= spread
    if within:
        text = f"within the seed spread (ΔFID {diff:+.4f}, spread {spread:.4f})"
    else:
        text = f"worse by {diff:.4f} FID ({diff / best['mean'] * 100:.1f}%; spread {spread:.4f})"
    return {"within_spread": within, "delta_fid": diff, "spread": spread, "paired_delta": {"mean": pm, "std": ps,
            "values": paired}, "text": text}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    students = [s for s in args.students.split(",") if s.strip()]
    for s in students:
        if s not in STUDENTS:
            print(f"tune_validation: error: --students must be from {', '.join(STUDENTS)}, got {s!r}", file=sys.stderr)
            return 2
    from distillpp import zoo
    from distillpp.pipelines import get_preset

    study_path = Path(args.study)
    studies: dict[str, tuple[list[dict], dict]] = {}
    try:
        for s in students:
            studies[s] = load_study(study_path, s, float(zoo.TEACHER_CFG), get_preset(f"zoo-{s}").num_inference_steps)
    except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        print(f"tune_validation: error: --study {args.study!r} is not an fmnist_study_best.json or fmnist_eval.json: "
              f"{e}", file=sys.stderr)
        return 2
    protocol = next((p for rows, p in studies.values() if rows), {})
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [int(v) for v in protocol.get("seeds") or (0, 1, 2)]
    n = args.n or int(protocol.get("n") or 10000)
    if args.tune_seed in seeds:
        print("tune_validation: error: --tune-seed must differ from the evaluation seeds", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strengths = [float(v) for v in args.strengths.split(",") if v.strip()]

    # 1. Tune every student with no data set reachable.
    tuned: dict[str, Any] = {}
    saved_env = os.environ.get("DISTILLPP_FASHION_MNIST")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["DISTILLPP_FASHION_MNIST"] = empty
        try:
            for s in students:
                print(f"[{time.time() - t0:6.1f}s] tuning zoo-{s} (no data) ...", flush=True)
                tuned[s] = tune(f"zoo-{s}", images_per_prompt=args.images_per_prompt,
                                reference_steps=args.reference_steps, budget=args.budget, strengths=strengths,
                                seed=args.tune_seed, margin=args.margin, out=out / f"zoo-{s}_overrides.json",
                                results=out / f"zoo-{s}_tune.json", device=device,
                                torch_dtype=getattr(torch, dtype_name), log=lambda line: print("   ", line, flush=True),
                                **({"models_dir": args.models_dir} if args.models_dir else {}))
                r = tuned[s]
                print(r.table())
                print(f"    chosen: {r.chosen.label()} ({r.reason}); {r.forwards} image-forwards, {r.seconds:.1f} s",
                      flush=True)
        finally:
            if saved_env is None:
                os.environ.pop("DISTILLPP_FASHION_MNIST", None)
            else:
                os.environ["DISTILLPP_FASHION_MNIST"] = saved_env

    # 2. Evaluate with fmnist_eval's protocol (its Bench: same sampling harness, metrics and seeds).
    bench_argv = ["main", "--device", device, "--dtype", dtype_name, "--seeds", ",".join(map(str, seeds)),
                  "--n", str(n), "--out", str(out / "fmnist"), "--budget-min", "1e9", "--students", ",".join(students)]
    if args.batch:
        bench_argv += ["--batch", str(args.batch)]
    if args.data_dir:
        bench_argv += ["--data-dir", args.data_dir]
    if args.models_dir:
        bench_argv += ["--models-dir", args.models_dir]
    bench = fmnist_eval.Bench(fmnist_eval.build_parser().parse_args(bench_argv))

    report: dict[str, Any] = {"title": "Data-free tuner vs the data-based study (Fashion-MNIST zoo)",
                              "written": fmnist_eval._now(),
                              "command": fmnist_eval._command_line("benchmarks/tune_validation.py"),
                              "card": bench.card, "dtype": dtype_name,
                              "study": str(args.study), "study_written": protocol.get("written"),
                              "study_cards": protocol.get("cards"), "seeds": seeds, "n": n,
                              "models_dir": args.models_dir or "shipped", "tuner": {"images_per_prompt": args.images_per_prompt, "reference_steps":
                                        args.reference_steps, "budget": args.budget, "strengths": strengths,
                                        "margin": args.margin, "seed": args.tune_seed},
                              "within_rule": "tuner mean FID - best mean FID <= the larger sample std over seeds",
                              "students": {}}
    for s in students:
        rows = studies[s][0]
        if not rows:
            print(f"tune_validation: no rows for {s} in {args.study}; skipped", file=sys.stderr)
            continue
        best = min(rows, key=lambda r: r["fid"]["mean"])
        best_m = method_of(s, best["knobs"])
        r = tuned[s]
        preset = get_preset(f"zoo-{s}")
        tuned_knobs = normalize({**{"noise": preset.guidance.noise}, **r.chosen.knobs()}, preset.guidance.teacher_cfg)
        tuned_m = method_of(s, tuned_knobs)
        chosen_row = next((x for x in rows if x.get("chosen")), None)
        measured = {}
        methods = [("tuner", tuned_m), ("best", best_m), ("plain", method_of(s, None))]
        if chosen_row is not None:
            methods.append(("study_chosen", method_of(s, chosen_row["knobs"])))
        for name, m in methods:
            recs = [bench.quality(m, "B", seed) for seed in seeds]
            measured[name] = {"label": bench.label(m), "method": json.loads(m.key()), "fid": stats(recs)}
        v = verdict(measured["tuner"]["fid"], measured["best"]["fid"])
        v_chosen = verdict(measured["tuner"]["fid"], measured["study_chosen"]["fid"]) if chosen_row else None
        same = tuned_knobs == best["knobs"]
        report["students"][s] = {
            "tuner": r.as_dict(), "tuner_label": r.chosen.label(), "measured": measured, "verdict": v,
            "verdict_vs_study_chosen": v_chosen,
            "same_setting_as_best": same,
            "study_best": {"label": best["label"], "knobs": best["knobs"], "fid": best["fid"],
                           "rows_considered": len(rows)},
        }
        print(f"[{time.time() - t0:6.1f}s] {s}: tuner {measured['tuner']['label']} FID "
              f"{format_mean_std(measured['tuner']['fid'], 4)}; best {measured['best']['label']} "
              f"{format_mean_std(measured['best']['fid'], 4)}: {v['text']}", flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    (out / "tune_validation.json").write_text(json.dumps(fmnist_eval._finite(report), indent=1) + "\n")
    md = to_markdown(report)
    (out / "tune_validation.md").write_text(md)
    print()
    print(md)
    return 0


def to_markdown(rep: dict) -> str:
    t = rep["tuner"]
    lines = [f"# {rep['title']}", "",
             f"- Written {rep['written']} by `{rep['command']}` on {rep['card']} ({rep['dtype']}), {rep['seconds']} s.",
             f"- Tuner (no data): {t['images_per_prompt']} images per class, {t['reference_steps']}-step teacher "
             f"reference, budget {t['budget']} image-forwards, strengths {t['strengths']}, margin {t['margin']} SE, "
             f"seed {t['seed']}.",
             f"- Evaluation: fmnist_eval's protocol, N = {rep['n']} per seed, seeds {rep['seeds']}; FID mean ± sample "
             f"std over seeds. Best = lowest mean FID among the student's rows (default steps) of `{rep['study']}` "
             f"(written {rep['study_written']}, {', '.join(rep['study_cards'] or [])}), re-measured here from the "
             "same noise. Within the seed spread: " + rep["within_rule"] + ".",
             "",
             "| student | tuner's choice (no data) | forwards | tune s | FID tuner | FID data-best (setting) | FID plain | verdict |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for s, d in rep["students"].items():
        m = d["measured"]
        lines.append(f"| {s} | {d['tuner_label']} | {d['tuner']['forwards']} | {d['tuner']['seconds']} | "
                     f"{format_mean_std(m['tuner']['fid'], 4)} | {format_mean_std(m['best']['fid'], 4)} "
                     f"({m['best']['label']}) | {format_mean_std(m['plain']['fid'], 4)} | {d['verdict']['text']} |")
    lines += ["", "The study's own choice (made on its selection seeds, reported on the same seeds as above), "
              "re-measured here:", "", "| student | study's choice | FID | tuner vs it |", "|---|---|---:|---|"]
    for s, d in rep["students"].items():
        m = d["measured"].get("study_chosen")
        if m is not None:
            lines.append(f"| {s} | {m['label']} | {format_mean_std(m['fid'], 4)} | {d['verdict_vs_study_chosen']['text']} |")
    for s, d in rep["students"].items():
        lines += ["", f"## {s}: what the tuner tried", "", f"Chosen: {d['tuner_label']}: {d['tuner']['reason']}.", ""]
        from distillpp.tuning import Setting, Trial, TuneResult

        trials = [Trial(Setting(**x["setting"]), x["criterion"], x["se_vs_plain"], x["rms_to_teacher"], x["forwards"],
                        x["seconds"], x["stage"]) for x in d["tuner"]["trials"]]
        res = TuneResult(s, Setting(**d["tuner"]["chosen"]), {}, trials, 0, 0, 0, 0.0, "")
        lines.append(res.table())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
