"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) as tensors for the offline zoo.

Images are padded from 28x28 to 32x32 (so the UNets can downsample three times) with the
background value and scaled to [-1, 1]; labels are int64 in 0..9. Class 10 is reserved as the
null label of classifier-free guidance.

The four IDX ``.gz`` files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); another folder can be given as an argument or in the
``DISTILLPP_FASHION_MNIST`` environment variable.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CLASSES",
    "NULL_LABEL",
    "DEFAULT_DIR",
    "ENV_VAR",
    "INSTALL_HINT",
    "dataset_dir",
    "load_split",
    "read_idx",
    "write_idx",
]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NULL_LABEL = 10
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DISTILLPP_FASHION_MNIST"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def dataset_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST folder: ``data_dir``, else ``$DISTILLPP_FASHION_MNIST``, else the Debian path."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_DIR


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its stored dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} values but its header says {tuple(dims)}")
    return data.reshape(tuple(dims))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (used to build small synthetic data sets in tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def load_split(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split, ready for training.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        data_dir: folder with the four IDX ``.gz`` files (see :func:`dataset_dir`).
        device: where to put the tensors (the whole set fits on any GPU: 60,000 x 4 KiB).

    Returns:
        ``images``: float32 ``[N, 1, 32, 32]`` in [-1, 1]; ``labels``: int64 ``[N]`` in 0..9.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (names the path and the fix).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = dataset_dir(data_dir)
    paths = [folder / name for name in _FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {missing[0]} does not exist. Install it with "
            f"`{INSTALL_HINT}` (files go to {DEFAULT_DIR}), or point --data-dir or ${ENV_VAR} "
            "at a folder holding the four IDX .gz files."
        )
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.copy()).to(device=device, dtype=torch.float32)
    x = x.unsqueeze(1) / 127.5 - 1.0
    pad_h, pad_w = 32 - x.shape[-2], 32 - x.shape[-1]
    if pad_h > 0 or pad_w > 0:
        # Background is 0 (black), i.e. -1 after scaling.
        x = torch.nn.functional.pad(
            x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0
        )
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y
