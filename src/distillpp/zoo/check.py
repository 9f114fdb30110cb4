"""Sanity check of a trained zoo: ``python -m distillpp.zoo.check MODELS_DIR``.

Prints the classifier's test accuracy, then for every zoo model found: samples with its default
sampler, grid and CFG, the fraction the classifier assigns to the conditioning class ("class
accuracy"), and the Frechet distance between classifier features of the samples and of as many
test images ("FD"; a small-sample proxy for FID, only for comparing models of this run). Students
are also sampled with one teacher-guided step. Optionally sweeps the teachers' CFG scale and saves
one PNG with samples of every model (one row per class).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from ..api import sample
from ..guidance import TeacherGuidance
from ..metrics.fid import fid_from_features
from . import TEACHER_OF
from . import ZOO_NAMES, ZooModel, load, load_classifier, to_images
from .data import load_split

__all__ = ["main", "sample_zoo"]

@torch.no_grad()
def sample_zoo(
    model: ZooModel,
    labels: torch.Tensor,
    seed: int = 0,
    batch: int = 500,
    steps: int | None = None,
    cfg: float | None = None,
    teacher: ZooModel | None = None,
    guidance: TeacherGuidance | None = None,
) -> torch.Tensor:
    """Samples of ``model`` for ``labels`` with its default sampler and grid (``[N, 1, 32, 32]``, [-1, 1])."""
    device = next(model.net.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    sigmas = model.sigmas(steps)
    outs = []
    for i in range(0, len(labels), batch):
        y = labels[i:i + batch].to(device)
        noise = torch.randn((len(y), 1, 32, 32), generator=gen, device=device)
        args = model.args(y)
        if cfg is not None:
            args["cfg_scale"] = cfg
        outs.append(sample(model.denoiser, model.initial(noise, sigmas), sigmas, sampler=model.sampler,
                           extra_args=args, generator=gen, teacher=None if teacher is None else teacher.denoiser,
                           guidance=guidance))
    return torch.cat(outs).clamp(-1, 1)


def _grid(images: torch.Tensor, nrow: int = 10) -> torch.Tensor:
    """uint8 ``[rows * 28, nrow * 28]`` mosaic of samples (one row per class when sampled class by class)."""
    u8 = to_images(images)[:, 0]
    n = (len(u8) // nrow) * nrow
    return u8[:n].reshape(-1, nrow, 28, 28).permute(0, 2, 1, 3).reshape(-1, nrow * 28)


def _save_panels(panels: list[torch.Tensor], path: Path, gap: int = 6) -> None:
    """Save mosaics side by side, separated by white columns."""
    from PIL import Image

    height = max(p.shape[0] for p in panels)
    cols = []
    for p in panels:
        cols += [torch.nn.functional.pad(p, (0, 0, 0, height - p.shape[0])),
                 torch.full((height, gap), 255, dtype=torch.uint8)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.cat(cols[:-1], dim=1).numpy()).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillpp.zoo.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", help="folder with <name>/ model folders (e.g. the training --out)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--samples", type=int, default=1000, help="samples per model (labels cycle 0..9)")
    parser.add_argument("--batch", type=int, default=500, help="sampling batch size")
    parser.add_argument("--steps", type=int, default=None, help="override every model's default steps")
    parser.add_argument("--cfg-sweep", default="", help="comma-separated CFG scales to try on the teachers")
    parser.add_argument("--png", default=None,
                        help="save samples of every model, one row per class, side by side, here")
    parser.add_argument("--png-per-class", type=int, default=10, help="samples per class in the PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    failures: list[str] = []
    for name in ("classifier",) + ZOO_NAMES:
        info_path = Path(args.models_dir) / name / "train_info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            loss = info.get("final_loss")
            print(f"trained {name}: {info.get('steps')} steps in {info.get('minutes')} min on {info.get('device')}, "
                  f"final loss {'?' if loss is None else f'{loss:.4g}'}"
                  f"{'' if info.get('complete') else ' (INCOMPLETE)'}", flush=True)

    x_test, y_test = load_split("test", args.data_dir, device=device)
    try:
        clf = load_classifier(device, args.models_dir)
        acc = sum(int((clf(x_test[i:i + 2000]).argmax(1) == y_test[i:i + 2000]).sum())
                  for i in range(0, len(y_test), 2000)) / len(y_test)
        print(f"classifier test accuracy {acc:.4f} ({len(y_test)} images)", flush=True)
    except Exception:
        traceback.print_exc()
        print("classifier: FAILED; no sample metrics", flush=True)
        return 1

    n = min(args.samples, len(y_test))
    ref = clf.features(x_test[:n])
    x_train, _ = load_split("train", args.data_dir, device=device)
    floor = fid_from_features(clf.features(x_train[:n]), ref)
    print(f"FD floor ({n} train vs {n} test images): {floor:.3f}", flush=True)
    labels = torch.arange(n) % 10

    def measure(model: ZooModel, what: str, **kw) -> tuple[float, float]:
        t = time.time()
        x = sample_zoo(model, labels, args.seed, args.batch, args.steps, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t
        class_acc = float((clf(x).argmax(1).cpu() == labels).float().mean())
        fd = fid_from_features(clf.features(x), ref)
        print(f"{what:<44s} class accuracy {class_acc:.3f}  FD {fd:8.3f}  ({dt:.1f}s)", flush=True)
        return class_acc, fd

    models: dict[str, ZooModel] = {}
    summary: list[str] = []
    panels: list[torch.Tensor] = []
    for name in ZOO_NAMES:
        try:
            m = models[name] = load(name, device, models_dir=args.models_dir)
            steps = args.steps or m.default_steps
            acc_, fd = measure(m, f"{name} ({m.sampler}, {steps} steps, cfg {m.default_cfg:g})")
            summary.append(f"{name} {acc_:.2f}/{fd:.1f}")
            if args.png:
                k = args.png_per_class
                panels.append(_grid(sample_zoo(m, torch.arange(10 * k) // k, args.seed, args.batch, args.steps), k))
        except FileNotFoundError as err:
            print(f"{name}: missing ({err})", flush=True)
            failures.append(name)
        except Exception:
            traceback.print_exc()
            print(f"{name}: FAILED", flush=True)
            failures.append(name)

    if panels:
        try:
            _save_panels(panels, Path(args.png))
            print(f"samples ({', '.join(models)}; one row per class) saved to {args.png}", flush=True)
        except Exception:  # a missing Pillow must not hide the metrics below
            traceback.print_exc()
            failures.append("png")

    for w in [float(v) for v in args.cfg_sweep.split(",") if v.strip()]:
        for name in ("teacher", "flow-teacher"):
            if name in models:
                measure(models[name], f"{name} cfg sweep: cfg {w:g}", cfg=w)

    for name, teacher in TEACHER_OF.items():
        if name in models and teacher in models:
            try:
                g = TeacherGuidance(strength=0.1, steps=1)
                measure(models[name], f"{name} + {teacher} guidance (x0, 0.1, 1 step)",
                        teacher=models[teacher], guidance=g)
            except Exception:
                traceback.print_exc()
                failures.append(f"{name}+guidance")

    status = "OK" if not failures else f"FAILED: {', '.join(failures)}"
    print(f"SANITY {status} | classifier {acc:.4f} | class-acc/FD (floor {floor:.1f}): {'; '.join(summary)}",
          flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
