"""``distillpp testbed``: teacher guidance measured against an exact teacher.

The teacher is the exact posterior-mean denoiser of an 8-component ring mixture in 2-D; the
"students" are exact denoisers of deliberately wrong mixtures (biased mode weights, a shifted
radius, too-wide components), sampled in 4 steps. Because the true distribution is known, the
energy distance of each sampler's output to true samples is the quality number; no network,
no data, a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .analytic import GaussianMixture, GaussianMixtureDenoiser, energy_distance, mode_weights
from .api import sample
from .cli import add_seeds_argument, check_out_dir, positive_int, staged_outputs, unit_float
from .guidance import TeacherGuidance
from .metrics.evaluate import mean_std
from .schedules import karras_sigmas

__all__ = ["TRUE_MIXTURE", "biased_students", "run_config", "study", "add_arguments", "run"]

TRUE_MIXTURE = GaussianMixture.ring(8, radius=2.0, std=0.2)


def biased_students() -> dict[str, GaussianMixture]:
    """Students whose mixtures are wrong in three different ways."""
    t = TRUE_MIXTURE
    skew = torch.tensor([4.0, 1, 4, 1, 4, 1, 4, 1])
    return {
        "weights": GaussianMixture(t.means, t.stds, skew),
        "weights+radius": GaussianMixture(t.means * 1.1, t.stds, skew),
        "wide": GaussianMixture(t.means, t.stds * 1.6, t.weights),
    }


def default_sigmas(steps: int = 4) -> torch.Tensor:
    """Karras grid from 20 (pure noise at radius 2) to 0.02, in float64."""
    return karras_sigmas(0.02, 20.0, steps).double()


@dataclass
class Result:
    student: str
    sampler: str
    guided_steps: int
    renoise: str
    strength: float
    seed: int
    energy: float
    mode_tv: float


def run_config(student: GaussianMixture, sampler: str, guidance: TeacherGuidance | None, n: int, seed: int,
               reference: torch.Tensor, sigmas: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """Samples of one configuration, their energy distance to ``reference`` and mode-weight TV error."""
    sigmas = default_sigmas() if sigmas is None else sigmas
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64) * float(sigmas[0])
    teacher = GaussianMixtureDenoiser(TRUE_MIXTURE) if guidance is not None else None
    out = sample(GaussianMixtureDenoiser(student), x, sigmas, sampler=sampler,
                 teacher=teacher, guidance=guidance, generator=gen)
    tv = 0.5 * float((mode_weights(out, TRUE_MIXTURE) - TRUE_MIXTURE.weights).abs().sum())
    return out, energy_distance(out, reference), tv


def study(n: int = 4000, seeds: tuple[int, ...] = (0, 1, 2), strengths=(0.1, 0.3, 0.6),
          samplers=("euler", "consistency"), progress: bool = True) -> list[Result]:
    """Every student x sampler x (plain | guided steps x renoise x strength) x seed."""
    reference, _ = TRUE_MIXTURE.sample(n, torch.Generator().manual_seed(12345))
    configs = [(None, 0, "-", 0.0)]
    configs += [(TeacherGuidance(strength=s, steps=k, renoise=r), k, r, s)
                for k in (1, 2) for r in ("next", "same", "random") for s in strengths]
    jobs = [(name, mix, smp, cfg, seed) for name, mix in biased_students().items() for smp in samplers
            for cfg in configs for seed in seeds]
    results = []
    for name, mix, smp, (g, k, r, s), seed in tqdm(jobs, disable=not progress, desc="testbed"):
        _, energy, tv = run_config(mix, smp, g, n, seed, reference)
        results.append(Result(name, smp, k, r, s, seed, energy, tv))
    return results


def _aggregate(results: list[Result]) -> list[dict]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.student, r.sampler, r.guided_steps, r.renoise, r.strength), []).append(r)
    rows = []
    for (student, sampler, k, ren, s), rs in groups.items():
        e_mean, e_std = mean_std(r.energy for r in rs)
        tv_mean, _ = mean_std(r.mode_tv for r in rs)
        rows.append(dict(student=student, sampler=sampler, guided_steps=k, renoise=ren, strength=s,
                         energy_mean=e_mean, energy_std=e_std, mode_tv_mean=tv_mean, seeds=len(rs)))
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| student | sampler | guided steps | renoise | strength | energy distance (mean ± std) | mode-weight TV |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['sampler']} | {r['guided_steps']} | {r['renoise']} | {r['strength']:g} | "
                     f"{r['energy_mean']:.4f} ± {r['energy_std']:.4f} | {r['mode_tv_mean']:.3f} |")
    return "\n".join(lines)


def _density_image(points: torch.Tensor, size: int = 160, extent: float = 3.2) -> np.ndarray:
    h, _, _ = np.histogram2d(points[:, 1].numpy(), points[:, 0].numpy(), bins=size,
                             range=[[-extent, extent], [-extent, extent]])
    h = np.log1p(h[::-1])
    return (255 - 255 * h / max(h.max(), 1e-9)).astype(np.uint8)


def save_grid_png(panels: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """Side-by-side log-density images of 2-D samples, each with a label."""
    from PIL import Image, ImageDraw

    size, pad, label_h = 160, 6, 16
    img = Image.new("L", (len(panels) * (size + pad) + pad, size + label_h + 2 * pad), 255)
    draw = ImageDraw.Draw(img)
    for j, (label, pts) in enumerate(panels):
        x0 = pad + j * (size + pad)
        img.paste(Image.fromarray(_density_image(pts, size)), (x0, label_h + pad))
        draw.text((x0, 2), label, fill=0)
    img.save(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``distillpp testbed``."""
    p.add_argument("--n", type=positive_int, default=4000, help="samples per configuration (at least 10)")
    add_seeds_argument(p, (0, 1, 2), "sampling seeds")
    p.add_argument("--strengths", type=unit_float, nargs="+", default=[0.1, 0.3, 0.6],
                   help="guidance strengths to sweep, each in [0, 1]")
    p.add_argument("--out", type=Path, default=Path("distillpp-out/testbed"),
                   help="output folder (testbed.md/.json/.png; written when the run completes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the study and write ``testbed.md``, ``testbed.json`` and ``testbed.png`` under ``--out``.

    Args:
        args: the options of :func:`add_arguments`.

    Raises:
        ValueError: a bad option, before any sampling.
    """
    if args.n < 10:
        raise ValueError(f"--n must be >= 10, got {args.n}")
    check_out_dir(args.out)
    start = time.time()
    results = study(args.n, tuple(args.seeds), tuple(args.strengths), progress=not args.quiet)
    rows = _aggregate(results)
    table = markdown_table(rows)
    # Picture: truth, the weight-biased student alone, and guided on its first two steps.
    ref, _ = TRUE_MIXTURE.sample(args.n, torch.Generator().manual_seed(12345))
    student = biased_students()["weights"]
    plain, _, _ = run_config(student, "euler", None, args.n, 0, ref)
    guided, _, _ = run_config(student, "euler", TeacherGuidance(strength=0.6, steps=2), args.n, 0, ref)
    same, _, _ = run_config(student, "euler", TeacherGuidance(strength=0.6, steps=2, renoise="same"), args.n, 0, ref)
    # The three files appear together when all is done (an interrupted run leaves none half-written).
    paths = [args.out / "testbed.md", args.out / "testbed.json", args.out / "testbed.png"]
    with staged_outputs(*paths) as (md_tmp, json_tmp, png_tmp):
        md_tmp.write_text(
            f"# Teacher guidance on an exact Gaussian-mixture teacher\n\n"
            f"Command: `distillpp testbed --n {args.n} --seeds {' '.join(map(str, args.seeds))}`; "
            f"CPU; {time.strftime('%Y-%m-%d')}; {time.time() - start:.0f} s.\n\n"
            f"4-step Karras grid (sigma 20 -> 0.02); energy distance to {args.n} true samples "
            f"(lower is better); mode-weight TV: total variation between the fraction of samples "
            f"nearest each mode and the true weights.\n\n{table}\n")
        json_tmp.write_text(json.dumps(
            {"command": "distillpp testbed", "n": args.n, "seeds": args.seeds, "rows": rows}, indent=1))
        save_grid_png([("true", ref), ("student", plain), ("guided next", guided), ("guided same", same)], png_tmp)
    print(table)
    print(f"\nwrote {args.out / 'testbed.md'}, {args.out / 'testbed.json'}, {args.out / 'testbed.png'}")
    return 0
