"""Random-init stand-ins for the Fashion-MNIST zoo, in the zoo's own folder format.

For tests and timing only: the networks are untrained (samples are noise), but they have the real
architecture (or the tiny test one), load through ``distillpp.zoo.load`` and run every code path of
the demo and of ``benchmarks/fmnist_eval.py``. A synthetic "dataset" of random IDX files goes with
them so FID and precision/recall code runs without Fashion-MNIST.

    python benchmarks/standin_models.py DIR [--tiny]   # writes DIR/models/<name>/ and DIR/data/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

_DATA_FILES = {
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}


def write_standin_models(models_dir: str | Path, tiny: bool = True, seed: int = 0) -> Path:
    """Write random-init teacher, students, flow models and classifier under ``models_dir``."""
    from distillpp.zoo import ZOO_NAMES
    from distillpp.zoo.nets import (
        ZooClassifier, flow_scheduler_config, make_unet, save_weights, vp_scheduler_config, write_json,
    )

    root = Path(models_dir)
    torch.manual_seed(seed)
    for name in ZOO_NAMES:
        folder = root / name
        if (folder / "config.json").is_file():
            continue
        save_weights(make_unet(tiny=tiny), folder)
        if name.startswith("flow"):
            write_json(folder / "scheduler_config.json", flow_scheduler_config())
        else:
            write_json(folder / "scheduler_config.json", vp_scheduler_config("lcm" if name == "lcm" else "ddim"))
    folder = root / "classifier"
    if not (folder / "config.json").is_file():
        from distillpp.zoo.train import TINY_CLASSIFIER

        clf = ZooClassifier(**TINY_CLASSIFIER) if tiny else ZooClassifier()
        save_weights(clf.eval(), folder)
    (root / "STANDIN.json").write_text(json.dumps({"tiny": tiny, "seed": seed, "note": "random-init stand-ins"}))
    return root


def write_standin_data(data_dir: str | Path, n_test: int = 200, n_train: int = 0, seed: int = 0) -> Path:
    """Write random 28x28 images with balanced labels as Fashion-MNIST IDX files under ``data_dir``."""
    from distillpp.zoo.data import write_idx

    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("test", n_test), ("train", n_train)):
        images_name, labels_name = _DATA_FILES[split]
        if n <= 0 or (root / images_name).is_file():
            continue
        write_idx(root / images_name, rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(root / labels_name, (np.arange(n) % 10).astype(np.uint8))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="writes DIR/models and DIR/data")
    parser.add_argument("--tiny", action="store_true", help="tiny test networks instead of the real architecture")
    parser.add_argument("--n-test", type=int, default=10000, help="synthetic test images")
    args = parser.parse_args(argv)
    write_standin_models(Path(args.dir) / "models", tiny=args.tiny)
    write_standin_data(Path(args.dir) / "data", n_test=args.n_test)
    print(f"stand-in models in {Path(args.dir) / 'models'}, synthetic data in {Path(args.dir) / 'data'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
