#!/usr/bin/env python3
"""Are the zoo's students better than their teacher run with the same few steps?

Samples each teacher with 4 steps (its own sampler and CFG) next to its 4-step students, from the
same initial noise per seed, and scores them like benchmarks/fmnist_eval.py (FID on the zoo
classifier's features against the 10k test set, precision/recall k=3, class consistency; mean ± std
over seeds). All rows of one run use the same N, so their FIDs compare with each other (FID is
biased upwards at small N; do not compare with the 10k-sample tables).

    python benchmarks/fmnist_few_step_teacher.py --n 2000 --seeds 0,1,2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import distillpp  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(HERE.parent / "src"))

from distillpp.metrics import RealFeatures, evaluate_samples, format_mean_std, summarize  # noqa: E402
from distillpp.zoo.harness import Method, ModelCache, generate, initial_noise, load_test_set  # noqa: E402

ROWS = [
    ("teacher", 4), ("lcm", None), ("pd", None),
    ("flow-teacher", 4), ("flow-student", None),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="samples per seed (balanced classes)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.n < 10 or args.n % 10:
        raise SystemExit("--n must be a positive multiple of 10 (balanced classes)")
    seeds = [int(s) for s in args.seeds.split(",")]
    models = ModelCache(device=args.device)
    clf = models.classifier()
    images, _ = load_test_set(models.zoo, args.data_dir)
    real = RealFeatures.from_images(clf, images, device=args.device)
    labels = torch.arange(args.n) % 10
    results = []
    start = time.time()
    for name, steps in ROWS:
        method = Method(name, steps=steps)
        runs = []
        for seed in seeds:
            t0 = time.time()
            x = generate(method, models, labels, initial_noise(seed, args.n), seed, batch_size=args.batch)
            m = evaluate_samples(x.clamp(-1, 1), labels, clf, real)
            m["seconds"] = time.time() - t0
            runs.append(m)
            print(f"[{time.time() - start:7.1f}s] {name} ({steps or 'default'} steps) "
                  f"seed {seed}: FID {m['fid']:.3f} CC {m['class_consistency']:.3f}", flush=True)
        model = models[name]
        results.append({"model": name, "sampler": model.sampler, "steps": method.resolved_steps(model),
                        "cfg": method.resolved_cfg(model), "runs": runs, "summary": summarize(runs)})
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    header = (f"- machine: {platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads), "
              f"device {args.device}; date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
              f"- command: `{command}`\n- N = {args.n} samples per seed (balanced classes), seeds {seeds}; "
              f"same initial noise for every row of a seed; FID vs the 10k test set on zoo classifier features "
              f"(biased upwards at this N: compare rows of this table only)\n")
    lines = ["| model | sampler, steps, CFG | FID ↓ | precision ↑ | recall ↑ | class consistency ↑ |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['model']} | {r['sampler']}, {r['steps']}, {r['cfg']:g} | {format_mean_std(s['fid'], 3)} | "
                     f"{format_mean_std(s['precision'], 3)} | {format_mean_std(s['recall'], 3)} | "
                     f"{format_mean_std(s['class_consistency'], 3)} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fmnist_few_step_teacher.md").write_text(
        "# Students vs their teacher at the same 4 steps (Fashion-MNIST zoo)\n\n" + header + "\n" + table + "\n")
    (out / "fmnist_few_step_teacher.json").write_text(json.dumps(
        {"command": command, "n": args.n, "seeds": seeds, "rows": results}, indent=1))
    print(table)
    print(f"wrote {out / 'fmnist_few_step_teacher.md'} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
