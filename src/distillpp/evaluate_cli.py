"""``distillpp eval``: FID, precision/recall and (optionally) CLIP score of a folder of images.

Features come from a pluggable extractor:

- ``--features zoo`` (default): the zoo classifier's penultimate features, exactly as
  :mod:`distillpp.metrics` scores the Fashion-MNIST zoo (28 x 28 grayscale images, padded to 32 x 32
  with the background value, in [-1, 1]); the reference defaults to the Fashion-MNIST test set;
- ``--features FILE``: a local TorchScript network (``torch.jit.save``) taking float RGB images
  ``[N, 3, H, W]`` in [0, 1] and returning ``[N, dim]`` features, e.g. an Inception-v3 you exported
  yourself; ``--features package.module:factory`` calls a Python function that returns an
  ``nn.Module`` (loading its own local weights).

FID is the Frechet distance of Gaussian fits in float64 (:mod:`distillpp.metrics.fid`), precision and
recall the k-NN manifolds of :mod:`distillpp.metrics.precision_recall`. Nothing is downloaded: a
missing extractor, reference or CLIP folder is an error that says what to pass.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["add_arguments", "run", "load_images", "zoo_inputs", "FeatureExtractor", "load_extractor"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _image_files(folder: str | Path, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no such folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if len(files) < 2:
        raise ValueError(f"{what} {folder} holds {len(files)} image(s); FID needs at least 2")
    return files


def load_images(files: Sequence[Path], mode: str) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` of image files converted to PIL ``mode`` (``"L"`` or ``"RGB"``).

    Raises:
        ValueError: the images differ in size (naming the first that does).
    """
    from PIL import Image

    arrays = []
    for path in files:
        with Image.open(path) as im:
            a = np.asarray(im.convert(mode))
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"{path} is {a.shape[1]}x{a.shape[0]}, unlike {files[0]} ({arrays[0].shape[1]}x"
                             f"{arrays[0].shape[0]}); all images must share one size")
        arrays.append(a)
    out = np.stack(arrays)
    return out[..., None] if out.ndim == 3 else out


def zoo_inputs(images: np.ndarray) -> torch.Tensor:
    """The zoo classifier's input for uint8 grayscale images: ``[N, 1, 32, 32]`` in [-1, 1], 28 x 28
    images padded with the background value (-1), as :func:`distillpp.zoo.data.load_split` does."""
    x = torch.from_numpy(np.ascontiguousarray(images[..., 0])).float().unsqueeze(1) / 127.5 - 1.0
    if x.shape[-2:] == (28, 28):
        x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    if x.shape[-2:] != (32, 32):
        raise ValueError(
            f"the default feature extractor (the zoo classifier) takes 28x28 or 32x32 grayscale images, got "
            f"{x.shape[-1]}x{x.shape[-2]}: pass --features FILE (a local TorchScript feature network such as an "
            "Inception-v3 you exported) with --reference DIR or --stats FILE"
        )
    return x


class FeatureExtractor:
    """Images (uint8 ``[N, H, W, C]``) to float32 CPU features ``[N, dim]``.

    Args:
        name: how the extractor was chosen (recorded in reports and stats files).
        mode: PIL mode the images are read in.
        prepare: uint8 array -> network input tensor.
        forward: network input batch -> features.
        device: where the network runs.
        batch_size: images per forward.
    """

    def __init__(self, name: str, mode: str, prepare: Callable[[np.ndarray], torch.Tensor],
                 forward: Callable[[torch.Tensor], torch.Tensor], device: Any, batch_size: int = 1000,
                 classifier: Any = None):
        self.name, self.mode, self.prepare, self.forward = name, mode, prepare, forward
        self.device, self.batch_size, self.classifier = torch.device(device), batch_size, classifier

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = self.prepare(images)
        out = [self.forward(x[s : s + self.batch_size].to(self.device)).float().flatten(1).cpu()
               for s in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out)


def _rgb01(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def load_extractor(spec: str, device: Any = "cpu", batch_size: int = 1000) -> FeatureExtractor:
    """The feature extractor named by ``--features``.

    Args:
        spec: ``"zoo"``, a TorchScript file, or ``"package.module:factory"``.
        device: where to run it.
        batch_size: images per forward.

    Raises:
        FileNotFoundError: a missing file (the message says what to pass).
        ValueError: a spec that is none of the above.
    """
    if spec == "zoo":
        from .metrics import classifier_outputs
        from .zoo import load_classifier

        clf = load_classifier(device=device)
        return FeatureExtractor(
            "zoo-classifier", "L", zoo_inputs,
            lambda x: classifier_outputs(clf, x, batch_size=len(x), with_logits=False)[0], device, batch_size,
            classifier=clf,
        )
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"--features {spec}: cannot import {attr!r} from {module_name!r} ({err})") from None
        net = factory()
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"--features {spec}: no such file. Pass 'zoo' for zoo images, a local TorchScript file "
                "(torch.jit.save of a network from float RGB [N, 3, H, W] in [0, 1] to [N, dim] features), or "
                "package.module:factory; weights are never downloaded"
            )
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=device)
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"--features {spec}: expected a torch.nn.Module, got {type(net).__name__}")
    net = net.to(device).eval()
    return FeatureExtractor(spec, "RGB", _rgb01, net, device, batch_size)


def _load_stats(path: str, extractor: FeatureExtractor) -> dict[str, Any]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"--stats: no such file: {path} (write one with --save-stats)")
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"--stats {path} must hold 'mu' and 'sigma' tensors, has {sorted(keys)}")
        out = {k: f.get_tensor(k) for k in keys}
    if meta.get("extractor") and meta["extractor"] != extractor.name:
        raise ValueError(f"--stats {path} was computed with features {meta['extractor']!r}, not {extractor.name!r}")
    return out


def _clip_score(folder: str, files: Sequence[Path], prompts: Sequence[str], device: Any) -> float:
    """Mean of ``100 * max(cos(image, text), 0)`` with a local CLIP model (Hessel et al. 2021, CLIPScore)."""
    if not Path(folder, "config.json").is_file():
        raise FileNotFoundError(f"--clip {folder}: not a local CLIP folder (no config.json); pass a folder saved "
                                "by transformers' CLIPModel.save_pretrained with its processor")
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    scores = []
    with torch.no_grad():
        for start in range(0, len(files), 64):
            chunk = files[start : start + 64]
            images = [Image.open(p).convert("RGB") for p in chunk]
            inputs = processor(text=list(prompts[start : start + 64]), images=images, return_tensors="pt",
                               padding=True, truncation=True).to(device)
            # The forward's projected embeddings (transformers 4 and 5 agree on these; 5 changed what
            # get_image_features returns).
            out = model(**inputs)
            cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
            scores.append((100 * cos.clamp(min=0)).cpu())
    return float(torch.cat(scores).mean())


def _manifest_prompts(folder: Path, files: Sequence[Path]) -> list[str] | None:
    path = folder / "manifest.jsonl"
    if not path.is_file():
        return None
    by_file = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_file[rec["file"]] = rec["prompt"]
    prompts = [by_file.get(p.name) for p in files]
    return None if any(p is None for p in prompts) else prompts


def _class_labels(prompts: Sequence[str]) -> torch.Tensor | None:
    from .zoo.data import CLASSES

    lookup = {c.lower(): i for i, c in enumerate(CLASSES)} | {str(i): i for i in range(len(CLASSES))}
    labels = [lookup.get(p.strip().lower()) for p in prompts]
    return None if any(v is None for v in labels) else torch.tensor(labels)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``parser``."""
    parser.add_argument("--images", required=True, help="folder of generated images (e.g. a `distillpp batch` --out)")
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--reference", default=None, help="folder of real images")
    ref.add_argument("--stats", default=None, help="reference statistics file (safetensors, see --save-stats)")
    parser.add_argument("--features", default="zoo",
                        help="feature extractor: 'zoo' (the zoo classifier), a local TorchScript file, or "
                             "package.module:factory returning an nn.Module")
    parser.add_argument("--data-dir", default=None,
                        help="Fashion-MNIST folder, the default reference for --features zoo "
                             "(default: $DISTILLPP_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--save-stats", default=None, help="write the reference statistics to this file")
    parser.add_argument("--clip", default=None, help="local CLIP folder: also report CLIP score against the prompts "
                                                     "in the images folder's manifest.jsonl")
    parser.add_argument("--k", type=int, default=3, help="nearest-neighbour size of precision/recall")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per feature forward")
    parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="report path without suffix (default: <images>/eval): "
                                                    "writes .json and .md")
    return parser


def _reference_features(args: argparse.Namespace, extractor: FeatureExtractor) -> tuple[torch.Tensor, str]:
    if args.reference:
        files = _image_files(args.reference, "--reference")
        return extractor(load_images(files, extractor.mode)), f"{args.reference} ({len(files)} images)"
    if extractor.name != "zoo-classifier":
        raise ValueError(f"--features {args.features}: pass --reference DIR (real images) or --stats FILE")
    from .metrics import RealFeatures
    from .zoo.harness import get_zoo, load_test_set

    images, _ = load_test_set(get_zoo(), data_dir=args.data_dir)
    real = RealFeatures.from_images(extractor.classifier, images, extractor.batch_size, extractor.device)
    return real.features, f"Fashion-MNIST test set ({len(images)} images)"


def run(args: argparse.Namespace) -> int:
    """Run ``eval``; writes ``<out>.json`` and ``<out>.md`` and prints the table."""
    from .metrics import feature_statistics, frechet_distance, precision_recall

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stats and not Path(args.stats).is_file():
        raise FileNotFoundError(f"--stats: no such file: {args.stats} (write one with --save-stats)")
    if args.reference and not Path(args.reference).is_dir():
        raise FileNotFoundError(f"--reference: no such folder: {args.reference}")
    t0 = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    files = _image_files(args.images, "--images")
    extractor = load_extractor(args.features, device, args.batch_size)
    fake = extractor(load_images(files, extractor.mode))
    report: dict[str, Any] = {"images": str(args.images), "num_images": len(fake), "features": extractor.name,
                              "feature_dim": int(fake.shape[1])}
    mu, sigma = feature_statistics(fake)
    real = None
    if args.stats:
        stats = _load_stats(args.stats, extractor)
        real_mu, real_sigma = stats["mu"], stats["sigma"]
        real = torch.from_numpy(stats["features"]) if "features" in stats else None
        report["reference"] = f"{args.stats}"
    else:
        real, report["reference"] = _reference_features(args, extractor)
        real_mu, real_sigma = feature_statistics(real)
    report["fid"] = frechet_distance(mu, sigma, real_mu, real_sigma)
    if real is not None and min(len(real), len(fake)) > args.k:
        report.update(precision_recall(real, fake, k=args.k))
        report["k"] = args.k
    prompts = _manifest_prompts(Path(args.images), files)
    if prompts is not None and extractor.name == "zoo-classifier":
        labels = _class_labels(prompts)
        if labels is not None:
            from .metrics import class_consistency, classifier_outputs

            _, logits = classifier_outputs(extractor.classifier, zoo_inputs(load_images(files, "L")), args.batch_size)
            report["class_consistency"] = class_consistency(logits, labels)
    if args.clip:
        if prompts is None:
            raise ValueError(f"--clip needs the prompts: {args.images} has no manifest.jsonl covering every image")
        report["clip_score"] = _clip_score(args.clip, files, prompts, device)
    if args.save_stats:
        from safetensors.numpy import save_file

        tensors = {"mu": np.asarray(real_mu), "sigma": np.asarray(real_sigma)}
        if real is not None:
            tensors["features"] = real.numpy()
        save_file(tensors, args.save_stats, metadata={"extractor": extractor.name, "source": report["reference"]})
    report["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out) if args.out else Path(args.images) / "eval"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = _markdown(report)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md, end="")
    return 0


def _markdown(report: dict[str, Any]) -> str:
    rows = [("images", f"{report['images']} ({report['num_images']})"), ("reference", report["reference"]),
            ("features", f"{report['features']} (dim {report['feature_dim']})"), ("FID", f"{report['fid']:.4f}")]
    for key, label in (("precision", "precision"), ("recall", "recall"),
                       ("class_consistency", "class consistency"), ("clip_score", "CLIP score")):
        if key in report and report[key] is not None and math.isfinite(report[key]):
            rows.append((label, f"{report[key]:.4f}"))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"
