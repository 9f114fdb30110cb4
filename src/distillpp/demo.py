"""``distillpp demo``: the shipped Fashion-MNIST teacher, its students, and the students guided by the
teacher, side by side, offline on a CPU.

Every method samples the same classes from the same initial noise (one noise draw per seed), so a
column of the grid differs only by the sampler. Writes ``demo_grid.png`` (rows = methods, columns =
class and seed), ``demo_metrics.md`` / ``demo_metrics.json`` (class consistency from the zoo's
classifier; FID of the samples made against the Fashion-MNIST test set when the data set is
installed), and prints where they are.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .cli import (
    add_seeds_argument,
    check_device,
    check_out_dir,
    finite_float,
    non_negative_int,
    parse_int_list,
    positive_int,
    staged_outputs,
)

# What the work needs (torch, diffusers through the zoo, the metrics harness) is imported only once the
# options are valid, so ``distillpp demo --help`` and a bad option answer without a torch import.
# _import_work_modules() binds these module globals (keeping any a test has replaced); reading one as
# ``demo.<name>`` from outside binds them too (PEP 562).
_WORK_NAMES = {
    "torch": ("torch", None),
    "load_file": ("safetensors.torch", "load_file"),
    "save_file": ("safetensors.torch", "save_file"),
    "classifier_outputs": (".metrics.evaluate", "classifier_outputs"),
    **{name: (".metrics", name) for name in ("RealFeatures", "evaluate_samples")},
    **{name: (".zoo.harness", name) for name in (
        "TEACHER_OF", "Method", "ModelCache", "generate", "get_zoo", "initial_noise", "load_test_set",
        "sample_forwards",
    )},
}


def _import_work_modules() -> None:
    g = globals()
    for name, (module, attr) in _WORK_NAMES.items():
        if name not in g:
            mod = importlib.import_module(module, __package__)
            g[name] = mod if attr is None else getattr(mod, attr)


def __getattr__(name: str) -> Any:
    if name in _WORK_NAMES:
        _import_work_modules()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["add_arguments", "run", "GUIDANCE_PRESETS", "CLASS_NAMES", "build_methods", "comparison_grid"]

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# Teacher guidance of each student in the demo: the lowest-FID setting of the guidance study
# (benchmarks/fmnist_study.py: chosen on a selection seed, reported on seeds 0-2 x 10k; H200,
# 2026-11-28, benchmarks/results/fmnist_study/fmnist_study.md), in the harness's spelling (``steps`` =
# guided steps). lcm: guide the second step only, full strength, fresh noise (FID 0.949 -> 0.839); pd:
# the first two steps at full strength with the unguided teacher (1.007 -> 0.453). For flow-student no
# setting beat the plain student (best: 0.376 -> 0.381), so its zoo-flow-student preset runs unguided and
# the demo shows this least harmful setting as it is. The zoo presets carry the same settings (a test
# checks they agree).
GUIDANCE_PRESETS: dict[str, dict[str, Any]] = {
    "lcm": {"strength": [0.0, 1.0], "steps": 2, "renoise": "random", "space": "x0", "teacher_cfg": 2.0},
    "pd": {"strength": 1.0, "steps": 2, "renoise": "next", "space": "x0", "teacher_cfg": 1.0},
    "flow-student": {"strength": 0.1, "steps": 1, "renoise": "random", "space": "x0", "teacher_cfg": 1.0},
}

# The students of metrics.TEACHER_OF, spelled out so the options need no torch import (a test checks they agree).
STUDENTS = ("lcm", "pd", "flow-student")


def parse_classes(text: str) -> list[int]:
    """``"all"``, or comma-separated class indices (0-9), ranges (``2-5``) or names (``sneaker``)."""
    if str(text).strip().lower() == "all":
        return list(range(10))
    names = {n.lower(): i for i, n in enumerate(CLASS_NAMES)}
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() in names:
            out.append(names[part.lower()])
            continue
        try:
            out.extend(parse_int_list(part, "--classes"))
        except ValueError:
            raise ValueError(
                f"--classes must be 'all' or indices 0-9 / class names ({', '.join(CLASS_NAMES)}); got {part!r}"
            ) from None
    if not out or any(not 0 <= c <= 9 for c in out):
        raise ValueError(f"--classes must name classes in 0-9, got {text!r}")
    return out


def parse_seeds(text: str | int | Sequence[str | int]) -> list[int]:
    """Seeds: space- or comma-separated integers >= 0 and ranges (``"0,1"``, ``["0", "2-3"]``), as every subcommand."""
    return parse_int_list(text, "--seeds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distillpp demo``."""
    parser.add_argument("--classes", default="all",
                        help="classes to sample: 'all', indices 0-9, ranges (2-5) or names (sneaker,bag)")
    add_seeds_argument(parser, (0, 1), "sampling seeds; each seed is one grid column per class")
    parser.add_argument("--per-class", type=positive_int, default=1,
                        help="samples per class and seed (the grid shows the first; metrics use all)")
    parser.add_argument("--students", default=",".join(STUDENTS),
                        help=f"students to show, comma-separated, from {', '.join(STUDENTS)}")
    parser.add_argument("--strength", type=float, default=None,
                        help="teacher-guidance strength lambda in [0, 1] for every student "
                             "(default: each student's preset, see distillpp.demo.GUIDANCE_PRESETS)")
    parser.add_argument("--space", choices=("x0", "eps"), default=None,
                        help="fusion space of the guidance (default: each student's preset)")
    parser.add_argument("--guided-steps", type=positive_int, default=None,
                        help="how many leading student steps are guided by the teacher (default: each student's "
                             "preset)")
    parser.add_argument("--renoise", choices=("next", "same", "random"), default=None,
                        help="teacher noise level: next (the paper's s = t - dt), same (s = t), random (default: "
                             "each student's preset)")
    parser.add_argument("--teacher-cfg", type=finite_float, default=None,
                        help="the teacher's CFG scale during guidance (default: each student's preset)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads (0: the cores other processes leave idle, by the load average)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per sampler call")
    parser.add_argument("--out", default="./distillpp-out",
                        help="output folder (demo_grid.png, demo_metrics.md/.json; written when the run completes)")
    parser.add_argument("--models-dir", default=None,
                        help="folder with the zoo's model folders (default: the weights shipped in the package)")
    parser.add_argument("--data-dir", default=None,
                        help="Fashion-MNIST folder for FID (default: $DISTILLPP_FASHION_MNIST or the Debian path)")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (no test-set features needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines; print only the output paths")


def _preset(student: str, args: argparse.Namespace) -> dict[str, Any]:
    g = dict(GUIDANCE_PRESETS.get(student, {"strength": 0.3, "space": "x0"}))
    if args.strength is not None:
        g["strength"] = float(args.strength)
    if args.space is not None:
        g["space"] = args.space
    if args.teacher_cfg is not None:
        g["teacher_cfg"] = float(args.teacher_cfg)
    if args.renoise is not None:
        g["renoise"] = args.renoise
    if args.guided_steps is not None:
        g["steps"] = int(args.guided_steps)
        if isinstance(g["strength"], list) and len(g["strength"]) != g["steps"]:
            g["strength"] = max(g["strength"])  # a per-step preset does not fit another step count
    return g


def build_methods(students: Sequence[str], args: argparse.Namespace) -> list[Method]:
    """Rows of the demo: each teacher, then each of its students plain and with teacher guidance."""
    _import_work_modules()
    methods: list[Method] = []
    for teacher in dict.fromkeys(TEACHER_OF[s] for s in students):
        methods.append(Method(teacher))
        for s in students:
            if TEACHER_OF[s] == teacher:
                methods += [Method(s), Method(s, guidance=_preset(s, args))]
    return methods


def _row_label(method: Method, models: ModelCache) -> tuple[str, str]:
    m = models[method.model]
    steps = method.resolved_steps(m)
    cfg = method.resolved_cfg(m)
    detail = f"{m.sampler}, {steps} steps" + (f", CFG {cfg:g}" if cfg != 1.0 else "")
    if not method.guidance:
        return method.model, detail
    g = method.guidance
    lam = g["strength"]
    lam = "/".join(f"{v:g}" for v in lam) if isinstance(lam, (list, tuple)) else f"{lam:g}"
    n = g.get("steps", 1)
    extra = f", renoise {g['renoise']}" if g.get("renoise", "next") != "next" else ""
    if g.get("teacher_cfg") is not None:
        extra += f", teacher CFG {g['teacher_cfg']:g}"
    guided = f"{n} guided step{'s' if n != 1 else ''}: {g['space']}, strength {lam}{extra}"
    return f"{method.model} + teacher", f"{detail}; {guided}"


def comparison_grid(
    rows: Sequence[tuple[str, str, torch.Tensor]], column_titles: Sequence[tuple[str, str]], scale: int = 2
) -> Any:
    """A labelled PIL image: one row per method, one column per (class, seed).

    Args:
        rows: ``(title, detail, images)`` with ``images`` ``[columns, 1, H, W]`` in [-1, 1].
        column_titles: ``(class name, "seed s")`` per column.
        scale: pixel upscaling of each sample.
    """
    from PIL import Image, ImageDraw, ImageFont

    _import_work_modules()
    font = ImageFont.load_default()
    to_images = get_zoo().to_images  # uint8, the zoo's 32x32 padding cropped back to 28x28
    h = to_images(rows[0][2][:1, 0]).shape[-1]
    cell, pad = h * scale, 4
    pitch = cell + pad
    label_w, header_h = 210, 30
    width = label_w + pitch * len(column_titles) + pad
    height = header_h + pitch * len(rows) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    def fit(text: str, max_w: float) -> str:
        while text and draw.textlength(text, font=font) > max_w:
            text = text[:-2] + "…" if len(text) > 2 else ""
        return text

    for j, (name, seed) in enumerate(column_titles):
        x = label_w + j * pitch
        draw.text((x, 3), fit(name, pitch - 2), fill="black", font=font)
        draw.text((x, 15), fit(seed, pitch - 2), fill="gray", font=font)
    for i, (title, detail, images) in enumerate(rows):
        y = header_h + i * pitch
        draw.text((6, y + 4), fit(title, label_w - 10), fill="black", font=font)
        words, lines, line = detail.split(" "), [], ""
        for w in words:
            cand = (line + " " + w).strip()
            if draw.textlength(cand, font=font) > label_w - 14 and line:
                lines.append(line)
                line = w
            else:
                line = cand
        lines.append(line)
        for k, text in enumerate(lines[:3]):
            draw.text((10, y + 18 + 12 * k), fit(text, label_w - 14), fill="dimgray", font=font)
        pixels = to_images(images[:, 0])
        for j in range(pixels.shape[0]):
            tile = Image.fromarray(pixels[j].numpy()).resize((cell, cell), Image.NEAREST)
            img.paste(tile.convert("RGB"), (label_w + j * pitch, y))
    return img


def _command_line() -> str:
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "distillpp"
    if prog in ("__main__.py", "cli.py", "-c", "pytest"):
        prog = "distillpp"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def _classifier_fingerprint(classifier: Any) -> str:
    h = hashlib.sha1()
    for t in classifier.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes()[:4096])
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:12]


def _test_features(classifier: Any, args: argparse.Namespace, zoo: Any, cache_dir: Path, quiet: bool) -> RealFeatures:
    """Classifier features of the test set, cached in ``cache_dir`` (they take seconds on a CPU)."""
    images, _ = load_test_set(zoo, args.data_dir)
    key = f"{_classifier_fingerprint(classifier)}-{images.shape[0]}-{float(images[:64].sum()):.4f}"
    path = cache_dir / f"fmnist-test-features-{key}.safetensors"
    if path.is_file():
        return RealFeatures(load_file(path)["features"])
    from tqdm.auto import tqdm

    feats = []
    bs = 500
    with tqdm(total=images.shape[0], desc="test-set features", unit="img", disable=quiet) as bar:
        for start in range(0, images.shape[0], bs):
            f, _ = classifier_outputs(classifier, images[start : start + bs], bs, with_logits=False)
            feats.append(f)
            bar.update(f.shape[0])
    feats = torch.cat(feats)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with staged_outputs(path) as (tmp,):  # an interrupted write must not leave a cache entry to load later
        save_file({"features": feats.contiguous()}, tmp)
    return RealFeatures(feats)


def cpu_threads(requested: int = 0) -> int:
    """Threads for CPU sampling: ``requested``, or (0) the cores the load average says are idle.

    On a busy machine extra threads only contend: measured here, two threads on two cores already
    running other work sampled 3.5x slower than one.
    """
    if requested > 0:
        return requested
    _import_work_modules()
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(torch.get_num_threads(), round(cores - busy)))


def _fmt(v: Any, digits: int) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def check_args(args: argparse.Namespace) -> tuple[list[int], list[int], list[str]]:
    """Validate every option before anything is loaded; returns ``(classes, seeds, students)``.

    Also creates the ``--out`` folder, so that an unusable one fails now rather than after sampling.

    Raises:
        ValueError: naming the option.
    """
    classes, seeds = parse_classes(args.classes), parse_seeds(args.seeds)
    guided_steps = 1 if args.guided_steps is None else args.guided_steps
    for option, value, minimum in (("--per-class", args.per_class, 1), ("--guided-steps", guided_steps, 1),
                                   ("--batch-size", args.batch_size, 1), ("--threads", getattr(args, "threads", 0), 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:  # also refuses NaN
        raise ValueError(f"--strength must be in [0, 1], got {args.strength}")
    if args.teacher_cfg is not None and not math.isfinite(args.teacher_cfg):
        raise ValueError(f"--teacher-cfg must be a finite number, got {args.teacher_cfg}")
    students = [s.strip() for s in str(args.students).split(",") if s.strip()]
    unknown = [s for s in students if s not in STUDENTS]
    if not students or unknown:
        raise ValueError(f"--students must be from {', '.join(STUDENTS)}; got {args.students!r}")
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise ValueError(f"--models-dir {args.models_dir}: no such folder")
    check_device(args.device)
    check_out_dir(args.out)
    return classes, seeds, students


def run(args: argparse.Namespace, zoo: Any = None) -> int:
    """Run the demo (see the module docstring). ``zoo`` replaces :mod:`distillpp.zoo` (tests).

    Args:
        args: the options of :func:`add_arguments`.
        zoo: a stand-in for :mod:`distillpp.zoo` (tests).

    Raises:
        ValueError: a bad option (see :func:`check_args`), before any model is loaded.
    """
    checked = check_args(args)
    _import_work_modules()
    threads = torch.get_num_threads()
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(cpu_threads(getattr(args, "threads", 0)))
    try:
        return _run(args, zoo, *checked)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, zoo: Any, classes: list[int], seeds: list[int], students: list[str]) -> int:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    quiet = bool(args.quiet)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    zoo = zoo if zoo is not None else get_zoo()
    out = Path(args.out)
    models = ModelCache(zoo, device=args.device, models_dir=args.models_dir)
    notes: list[str] = []

    # A student whose weights (or whose teacher's) are missing drops its rows, with a note.
    available = []
    for s in students:
        try:
            for name in (TEACHER_OF[s], s):
                models[name]
        except FileNotFoundError as err:
            notes.append(f"{s} skipped: {err}")
            log(f"skipping {s}: {err}")
            continue
        available.append(s)
    if not available:
        raise FileNotFoundError("none of the requested students could be loaded: " + "; ".join(notes))
    methods = build_methods(available, args)

    n_per_seed = len(classes) * args.per_class
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)], dtype=torch.long)
    images: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(methods))}
    seconds = [0.0] * len(methods)
    total = len(methods) * len(seeds) * n_per_seed
    where = f"{args.device} ({torch.get_num_threads()} threads)" if args.device == "cpu" else args.device
    log(f"demo: {len(methods)} methods x {len(seeds)} seed(s) x {n_per_seed} images on {where}")
    with tqdm(total=total, desc="sampling", unit="img", disable=quiet) as bar:
        for seed in seeds:
            noise = initial_noise(seed, n_per_seed)
            for i, method in enumerate(methods):
                bar.set_postfix_str(method.model + (" + teacher" if method.guidance else ""))
                t0 = time.perf_counter()
                images[i].append(generate(method, models, labels, noise, seed, args.batch_size, progress=bar.update))
                seconds[i] += time.perf_counter() - t0

    # The grid: the first sample of each (seed, class).
    first = [k * args.per_class for k in range(len(classes))]
    columns = [(CLASS_NAMES[c], f"seed {s}") for s in seeds for c in classes]
    rows = []
    for i, method in enumerate(methods):
        title, detail = _row_label(method, models)
        rows.append((title, detail, torch.cat([batch[first] for batch in images[i]])))
    grid_image = comparison_grid(rows, columns)
    grid_path = out / "demo_grid.png"

    # Metrics.
    all_labels = labels.repeat(len(seeds))
    classifier, real, fid_skipped = None, None, None
    try:
        classifier = models.classifier()
    except FileNotFoundError as err:
        notes.append(f"class consistency and FID skipped: {err}")
    n_method = len(seeds) * n_per_seed
    if args.no_fid:
        fid_skipped = "--no-fid was given"
    elif classifier is None:
        fid_skipped = "the classifier is missing"
    else:
        try:
            real = _test_features(classifier, args, zoo, out / "cache", quiet)
        except FileNotFoundError as err:
            fid_skipped = str(err)
        if real is not None and n_method < 2:  # a covariance needs two samples; the rest of the report holds
            real, fid_skipped = None, (f"FID needs at least 2 samples per method, got {n_method} "
                                       "(add classes or seeds, or raise --per-class)")
    results = []
    for i, method in enumerate(methods):
        x = torch.cat(images[i])
        metrics = {}
        if classifier is not None:
            metrics = evaluate_samples(x, all_labels, classifier, real, with_precision_recall=False)
        title, detail = _row_label(method, models)
        results.append({
            "method": f"{title} ({detail})",
            "model": method.model,
            "sampler": models[method.model].sampler,
            "steps": method.resolved_steps(models[method.model]),
            "cfg": method.resolved_cfg(models[method.model]),
            "guidance": dict(method.guidance) if method.guidance else None,
            "nfe_per_image": sample_forwards(method, models),
            "seconds": round(seconds[i], 3),
            "class_consistency": metrics.get("class_consistency"),
            "fid": metrics.get("fid"),
            "nonfinite_samples": metrics.get("nonfinite"),
        })

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "device": args.device,
        "classes": classes,
        "seeds": seeds,
        "per_class": args.per_class,
        "samples_per_method": n_method,
        "fid": {
            "computed": real is not None,
            "skipped_reason": fid_skipped,
            "reference": f"Fashion-MNIST test set ({real.features.shape[0]} images)" if real is not None else None,
            "note": f"FID of {n_method} samples per method: strongly biased upwards at this size; compare rows "
                    "with each other only (benchmarks/results has 10k-sample numbers)",
        },
        "notes": notes,
        "rows": results,
        "grid": str(grid_path),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    json_path, md_path = out / "demo_metrics.json", out / "demo_metrics.md"
    # All three appear together, only now: an interrupted run leaves no grid without its metrics.
    with staged_outputs(grid_path, json_path, md_path) as (grid_tmp, json_tmp, md_tmp):
        grid_image.save(grid_tmp)
        json_tmp.write_text(json.dumps(report, indent=2) + "\n")
        md_tmp.write_text(_markdown(report))

    log(f"done in {report['total_seconds']:.0f}s")
    print(f"grid:    {grid_path}")
    print(f"metrics: {md_path} (and {json_path.name})")
    if fid_skipped and not args.no_fid:
        print(f"FID skipped: {fid_skipped}")
    return 0


def _markdown(report: dict[str, Any]) -> str:
    fid = report["fid"]
    lines = [
        "# distillpp demo: teacher vs students vs teacher-guided students (Fashion-MNIST)",
        "",
        f"- date: {report['date']}; device: {report['device']}; command: `{report['command']}`",
        f"- {report['samples_per_method']} samples per method: classes {report['classes']}, "
        f"seeds {report['seeds']}, {report['per_class']} per class and seed; same initial noise for every method",
        "- class consistency: fraction of samples the zoo classifier assigns to the requested class",
    ]
    if fid["computed"]:
        lines.append(f"- FID against the {fid['reference']}: {fid['note']}")
    else:
        lines.append(f"- FID skipped: {fid['skipped_reason']}")
    lines += [f"- note: {n}" for n in report["notes"]]
    lines += [
        "",
        "| method | NFE / image | time (s) | class consistency | FID |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['nfe_per_image']} | {r['seconds']:.1f} | "
            f"{_fmt(r['class_consistency'], 3)} | {_fmt(r['fid'], 2)} |"
        )
    lines += ["", f"Grid: `{Path(report['grid']).name}`; total time {report['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)
