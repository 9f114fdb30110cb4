#!/usr/bin/env python3
"""The zoo teacher's speckle, with and without its x0 clamp (issue 13, part 0): same weights, same noise.

The VP teacher (eps-prediction, DDIM 50 steps, CFG 2) showed salt-and-pepper speckle until its scheduler
config gained ``clip_sample`` (:func:`distillpp.zoo.clip_range`). This script samples the shipped teacher
twice from the same initial noise, once through its own denoiser (x0 clamped to [-1, 1] after the CFG mix)
and once with the clamp removed, and reports per variant: the range of the final samples, the share of
denoiser calls whose x0 left [-1, 1], the high-frequency energy ratio to real test images (1 = as much
pixel-level detail as real images; speckle >> 1) and the pixel Fréchet distance
(:mod:`distillpp.metrics.pixels`). Writes ``zoo_speckle.json`` and ``.md`` under ``--out``.

    python benchmarks/zoo_speckle.py --n 200 --out benchmarks/results/zoo/retrain-clip     # ~10 min on 2 CPU cores
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

import distillpp
from distillpp import zoo
from distillpp.metrics.pixels import PixelReference, pixel_metrics
from distillpp.zoo.harness import initial_noise, load_test_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="samples per variant (balanced over the 10 classes)")
    p.add_argument("--seed", type=int, default=1, help="seed of the initial noise")
    p.add_argument("--steps", type=int, default=50, help="teacher DDIM steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual lookup)")
    p.add_argument("--out", default="distillpp-out/zoo_speckle", help="results folder")
    args = p.parse_args(argv)
    if args.n < 10:
        p.error(f"--n must be at least 10, got {args.n}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    real, _ = load_test_set(data_dir=args.data_dir)
    reference = PixelReference.from_images(real, crop=28)
    teacher = zoo.load("teacher", device=args.device)
    labels = torch.arange(args.n) % 10
    noise = initial_noise(args.seed, args.n)
    sigmas = teacher.sigmas(args.steps)
    rows = []
    for name, clip in (("clamp off (before the fix)", None), ("clamp on (shipped)", teacher.clip)):
        den = distillpp.CFGDenoiser(teacher.denoiser.inner, teacher.default_cfg, clip=None)
        outside = []

        def counted(x, sigma, den=den, clip=clip, outside=outside, **kw):
            x0 = den(x, sigma, **kw)
            outside.append(float((x0.abs() > 1).float().mean()))
            return x0 if clip is None else x0.clamp(-clip, clip)

        t0 = time.time()
        with torch.no_grad():
            x = distillpp.sample(counted, teacher.initial(noise, sigmas).to(args.device), sigmas,
                                 sampler=teacher.sampler, extra_args=teacher.args(labels.to(args.device))).cpu()
        m = pixel_metrics(x, reference)
        rows.append({"variant": name, "min": float(x.min()), "max": float(x.max()),
                     "x0_outside_share": sum(outside) / len(outside), **m, "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/zoo_speckle.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "machine": platform.processor() or platform.machine(), "device": args.device, "n": args.n,
            "seed": args.seed, "steps": args.steps, "rows": rows}
    (out / "zoo_speckle.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"# The zoo teacher with and without its x0 clamp ({meta['date']})", "",
             f"`{command}`; {args.device}; {args.n} samples (DDIM {args.steps} steps, CFG {teacher.default_cfg:g}) "
             "from the same noise; HF ratio 1 = as much pixel-level detail as the real test images.", "",
             "| variant | sample range | share of raw x0 estimates (before the clamp) outside [-1, 1] | HF ratio | pixel FD |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['min']:.2f} .. {r['max']:.2f} | {r['x0_outside_share']:.4f} | "
                     f"{r['hf_ratio']:.3f} | {r['pixel_fd']:.2f} |")
    (out / "zoo_speckle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
