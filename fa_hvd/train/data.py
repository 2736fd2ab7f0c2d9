"""Data sets: the embedded default (scikit-learn's 8x8 digits) and local files.

Nothing is downloaded. ``load_dataset("digits")`` uses the 1,797 images that
scikit-learn ships; ``load_dataset("dir", data_dir=...)`` reads a local directory
holding either

* ``train.npz`` and ``test.npz``, each with arrays ``x`` (``(N, H, W)`` or
  ``(N, C, H, W)``, any numeric dtype; integers are scaled by 1/255) and ``y``
  (integer labels), or
* MNIST's IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (optionally ``.gz``).

Images come back as float32 ``(N, C, H, W)`` in [0, 1], labels as int64.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass
class Split:
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    shape: tuple


def load_dataset(name: str = "digits", data_dir: str | None = None, seed: int = 0) -> Split:
    """The ``digits`` data set, or the files in ``data_dir`` (name ``dir``)."""
    if name == "digits":
        return _digits(seed)
    if name == "dir":
        if not data_dir:
            raise ValueError("data set 'dir' needs data_dir")
        return _from_dir(Path(data_dir))
    raise ValueError(f"unknown data set {name!r}; known: digits, dir")


def shard(dataset: TensorDataset, rank: int, size: int) -> TensorDataset:
    """Rank ``rank``'s contiguous 1/size of ``dataset`` (equal sizes, the tail dropped)."""
    per = len(dataset) // size
    if per == 0:
        raise ValueError(f"data set of {len(dataset)} items is too small for {size} ranks")
    x, y = dataset.tensors
    return TensorDataset(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])


def _digits(seed: int) -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    return Split(TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]), 10, tuple(x.shape[1:]))


def _from_dir(path: Path) -> Split:
    if not path.is_dir():
        raise ValueError(f"data_dir {path} is not a directory")
    if (path / "train.npz").exists():
        train, test = (_npz(path / f"{part}.npz") for part in ("train", "test"))
    elif _find(path, "train-images-idx3-ubyte"):
        train = _idx_pair(path, "train")
        test = _idx_pair(path, "t10k")
    else:
        raise ValueError(f"data_dir {path}: expected train.npz/test.npz or MNIST IDX files")
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    return Split(TensorDataset(*train), TensorDataset(*test), num_classes, tuple(train[0].shape[1:]))


def _images(x: np.ndarray, where) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{where}: images must be (N, H, W) or (N, C, H, W), got shape {x.shape}")
    scale = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    return torch.from_numpy(x.astype(np.float32) / scale)


def _npz(file: Path):
    with np.load(file) as data:
        if "x" not in data or "y" not in data:
            raise ValueError(f"{file}: needs arrays 'x' and 'y', has {sorted(data.files)}")
        x, y = _images(data["x"], file), torch.from_numpy(data["y"].astype(np.int64))
    if len(x) != len(y):
        raise ValueError(f"{file}: {len(x)} images but {len(y)} labels")
    return x, y


def _find(path: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (path / name).exists():
            return path / name
    return None


def _read_idx(file: Path) -> np.ndarray:
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{file}: not an unsigned-byte IDX file")
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{file}: header says {shape} but holds {data.size} bytes (truncated?)")
    return data.reshape(shape)


def _idx_pair(path: Path, prefix: str):
    images, labels = _find(path, f"{prefix}-images-idx3-ubyte"), _find(path, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise ValueError(f"data_dir {path}: missing {prefix}-images-idx3-ubyte or {prefix}-labels-idx1-ubyte")
    x, y = _images(_read_idx(images), images), torch.from_numpy(_read_idx(labels).astype(np.int64))
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} {prefix} images but {len(y)} labels")
    return x, y
