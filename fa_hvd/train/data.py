"""Data sets from local files (nothing is downloaded) and the batches a rank trains on.

``load_dataset(name, data_dir, ...)`` returns a :class:`Split`:

* ``digits``: scikit-learn's embedded 8x8 digits (1,797 images; 80/20 split,
  shuffled by ``seed``), the default.
* ``mnist`` / ``fashion_mnist``: torchvision's ``MNIST`` / ``FashionMNIST`` reading
  ``DATA_DIR/MNIST/raw/`` (``FashionMNIST/raw/``): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``.
* ``cifar10`` / ``cifar100``: torchvision's ``CIFAR10`` / ``CIFAR100`` reading
  ``cifar-10-python.tar.gz`` unpacked in ``DATA_DIR`` (``cifar-10-batches-py/``,
  ``cifar-100-python/``); with ``verify`` torchvision's MD5 sums are checked.
* ``imagefolder``: torchvision's ``ImageFolder`` over ``DATA_DIR/train/`` and
  ``DATA_DIR/val/`` (or ``test/``), one folder per class (Tiny ImageNet's ``val``
  must be sorted into class folders first); images are read lazily, as RGB,
  resized to ``image_size``.
* ``synthetic``: Gaussian inputs labelled by a fixed random linear teacher.
* ``dir``: ``train.npz``/``test.npz`` (arrays ``x``, ``y``) or MNIST's IDX files
  (optionally ``.gz``) directly in ``DATA_DIR``.

Images are kept as stored (uint8 for the real data sets) and become float32 in
[0, 1], optionally augmented and normalised, one batch at a time:
``split.batch(dataset, indices, generator)``. Which indices a rank takes is
:mod:`fa_hvd.train.sharding`'s business.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fa_hvd.faults.seeding import derive_seed

SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "dir")

# Per-channel mean and standard deviation of the training images in [0, 1].
STATISTICS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}

CROP_PADDING = 4


@dataclass
class Split:
    """A training and a test set, and how their samples become model inputs.

    ``train``/``test`` are indexable data sets of ``(image, label)``: a
    ``TensorDataset`` (images ``(N, C, H, W)``, uint8 in [0, 255] or float in
    [0, 1]) or a lazy one (``ImageFolder``). ``mean``/``std`` normalise per
    channel (None: no normalisation); ``augment`` is ``"none"`` or ``"crop_flip"``
    (random crop with 4-pixel zero padding and horizontal flip, for training).
    """

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    shape: tuple
    mean: tuple | None = None
    std: tuple | None = None
    augment: str = "none"

    def labels(self, dataset=None) -> torch.Tensor:
        """The labels of ``dataset`` (default the training set) as an int64 tensor."""
        return labels_of(self.train if dataset is None else dataset)

    def batch(self, dataset, indices: torch.Tensor, generator: torch.Generator | None = None):
        """Samples ``indices`` of ``dataset`` as ``(x float32 (B, C, H, W), y int64 (B,))``.

        With a ``generator`` and ``augment == "crop_flip"`` the batch is augmented
        with draws from it (pass a seeded one for a reproducible run).
        """
        x, y = fetch(dataset, indices)
        x = x.float() / 255.0 if not x.is_floating_point() else x.float()
        if generator is not None and self.augment == "crop_flip":
            x = crop_flip(x, generator)
        if self.mean is not None:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x, y


def augment_generator(seed: int, rank: int, step: int, micro: int = 0) -> torch.Generator:
    """The generator for rank ``rank``'s augmentation at ``step`` (micro-batch ``micro``):
    a pure function of its keys, so a resumed run and a simulation draw the same."""
    return torch.Generator().manual_seed(derive_seed(seed, 0xA06, rank, step, micro))


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Random ``H x W`` crops of the zero-padded images, each flipped left-right with probability 1/2."""
    n, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, top:top + height, left:left + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def fetch(dataset, indices: torch.Tensor):
    """``(images, labels)`` of ``indices``: one indexing for a ``TensorDataset``, else item by item."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        return x[indices], y[indices]
    items = [dataset[int(i)] for i in indices]
    x = torch.stack([torch.as_tensor(item[0]) for item in items])
    y = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
    return x, y


def labels_of(dataset) -> torch.Tensor:
    """Every label of ``dataset`` without loading its images (where the data set allows)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].to(torch.int64)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.int64)
    inner = getattr(dataset, "dataset", None)  # a wrapper such as PoisonedDataset
    if inner is not None and len(inner) == len(dataset):
        return labels_of(inner)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


def load_dataset(name: str = "digits", data_dir: str | None = None, seed: int = 0, *, normalize: bool = True,
                 augment: str = "none", verify: bool = True, image_size: int = 64, synthetic=None) -> Split:
    """The data set ``name`` (see the module docstring); ``ValueError`` names what is missing."""
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(SOURCES)}")
    if name == "digits":
        split = _digits(seed)
    elif name == "synthetic":
        split = _synthetic(seed, synthetic)
    else:
        if not data_dir:
            raise ValueError(f"data set {name!r} needs data_dir (nothing is downloaded)")
        root = Path(data_dir)
        if not root.is_dir():
            raise ValueError(f"data_dir {root} is not a directory")
        if name in ("mnist", "fashion_mnist"):
            split = _mnist(name, root)
        elif name in ("cifar10", "cifar100"):
            split = _cifar(name, root, verify)
        elif name == "imagefolder":
            split = _image_folder(root, image_size)
        else:
            split = _from_dir(root)
    if normalize and name in STATISTICS:
        split.mean, split.std = STATISTICS[name]
    split.augment = augment
    return split


def digits_file() -> Path:
    """scikit-learn's ``digits.csv.gz`` (64 pixels in 0..16 and the label per row), found
    without importing scikit-learn (which takes a second per rank)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ValueError("data set 'digits' comes with scikit-learn, which is not installed")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def _digits(seed: int) -> Split:
    table = np.loadtxt(digits_file(), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1].reshape(-1, 1, 8, 8) / 16.0)
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    return Split(TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]), 10, tuple(x.shape[1:]))


def _synthetic(seed: int, conf) -> Split:
    from fa_hvd.train.config import SyntheticConfig

    conf = conf or SyntheticConfig()
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x5E7))
    shape = tuple(conf.shape)
    n = conf.train_size + conf.test_size
    x = torch.randn((n,) + shape, generator=generator)
    teacher = torch.randn(int(np.prod(shape)), conf.num_classes, generator=generator)
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    cut = conf.train_size
    return Split(TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]), conf.num_classes, shape)


def _missing(root: Path, folder: str, files, how: str) -> None:
    missing = [name for name in files if not (root / folder / name).is_file()]
    if missing:
        raise ValueError(f"data_dir {root}: missing {', '.join(f'{folder}/{m}' for m in missing)} ({how}; "
                         f"nothing is downloaded)")


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def _mnist(name: str, root: Path) -> Split:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    _missing(root, f"{cls.__name__}/raw", MNIST_FILES, "the four uncompressed IDX files")
    try:
        parts = [cls(str(root), train=train, download=False) for train in (True, False)]
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ValueError(f"data_dir {root}: {cls.__name__} files could not be read: {exc}") from None
    train, test = (TensorDataset(p.data.unsqueeze(1).contiguous(), p.targets.to(torch.int64)) for p in parts)
    return Split(train, test, 10, tuple(train.tensors[0].shape[1:]))


CIFAR_LAYOUT = {  # folder, its files, the archive that holds them, classes
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
                "cifar-10-python.tar.gz", 10),
    "cifar100": ("cifar-100-python", ("train", "test", "meta"), "cifar-100-python.tar.gz", 100),
}


def _cifar(name: str, root: Path, verify: bool) -> Split:
    from torchvision import datasets

    folder, files, archive, num_classes = CIFAR_LAYOUT[name]
    _missing(root, folder, files, f"unpack {archive} there")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if not verify:  # presence was checked above; skip torchvision's MD5 sums
        cls = type(cls.__name__, (cls,), {"_check_integrity": lambda self: True, "_load_meta": lambda self: None})
    try:
        parts = [cls(str(root), train=train, download=False) for train in (True, False)]
    except RuntimeError as exc:
        raise ValueError(f"data_dir {root}: {folder} failed torchvision's MD5 check ({exc}); these are not the "
                         f"original files: replace them, or set data.verify false") from None
    except (OSError, EOFError, KeyError, ValueError) as exc:
        raise ValueError(f"data_dir {root}: {folder} could not be read: {exc}") from None
    train, test = (
        TensorDataset(torch.from_numpy(np.ascontiguousarray(p.data.transpose(0, 3, 1, 2))),
                      torch.as_tensor(p.targets, dtype=torch.int64))
        for p in parts
    )
    return Split(train, test, num_classes, tuple(train.tensors[0].shape[1:]))


def _image_folder(root: Path, image_size: int) -> Split:
    from torchvision import datasets, transforms

    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ValueError(f"data_dir {root}: an image folder needs train/ and val/ (or test/), each with one "
                         f"sub-folder of images per class")
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=transform)
        test = datasets.ImageFolder(str(test_dir), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"data_dir {root}: {exc}") from None
    if train.classes != test.classes:
        raise ValueError(f"data_dir {root}: train/ has classes {train.classes[:5]}... but {test_dir.name}/ has "
                         f"{test.classes[:5]}...: the same class folders are needed in both")
    return Split(train, test, len(train.classes), (3, image_size, image_size))


def _from_dir(path: Path) -> Split:
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
    if x.dtype == np.uint8:
        return torch.from_numpy(np.array(x, copy=True))
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


def eval_indices(size: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s share of a test set of ``size`` samples: every ``world``-th one from ``rank``.

    Together the ranks cover every test sample exactly once."""
    return torch.arange(rank, size, world)
