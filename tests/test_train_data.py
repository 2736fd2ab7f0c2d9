"""Data sources from files the tests write (IDX, CIFAR pickles, an image folder), models, augmentation."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from fa_hvd.train import data, models

RNG = np.random.default_rng(0)


def _idx(path, array, compress=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if compress else open)(path, "wb") as fh:  # closed: gzip writes its end on close
        fh.write(header + array.astype(np.uint8).tobytes())


def _mnist_files(folder, n_train=20, n_test=6, size=28, compress=False):
    suffix = ".gz" if compress else ""
    images = {p: RNG.integers(0, 256, (n, size, size)) for p, n in (("train", n_train), ("t10k", n_test))}
    labels = {p: np.arange(len(images[p])) % 10 for p in images}
    for prefix in images:
        _idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images[prefix], compress)
        _idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels[prefix], compress)
    return images, labels


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_and_fashion_mnist_through_torchvision(tmp_path, name, folder):
    images, labels = _mnist_files(tmp_path / folder / "raw")
    split = data.load_dataset(name, str(tmp_path))
    assert split.shape == (1, 28, 28) and split.num_classes == 10 and len(split.test) == 6
    x, y = split.train.tensors
    assert torch.equal(x[:, 0], torch.from_numpy(images["train"].astype(np.uint8)))
    assert y.tolist() == labels["train"].tolist()
    batch, by = split.batch(split.train, torch.tensor([3, 1]))
    mean, std = data.STATISTICS[name]
    assert torch.allclose(batch[0, 0], (torch.from_numpy(images["train"][3]).float() / 255 - mean[0]) / std[0])
    assert by.tolist() == [3, 1]


def test_missing_mnist_files_are_named(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    _idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    with pytest.raises(ValueError) as info:
        data.load_dataset("mnist", str(tmp_path))
    message = str(info.value)
    assert "missing MNIST/raw/train-labels-idx1-ubyte, MNIST/raw/t10k-images-idx3-ubyte" in message
    assert "nothing is downloaded" in message


def _cifar_files(root, hundred=False, per_batch=4):
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    written = {}
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        pixels = RNG.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = list(RNG.integers(0, 100 if hundred else 10, per_batch))
        written[name] = (pixels, labels)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": pixels, key: labels}, fh)
    classes = [str(i) for i in range(100 if hundred else 10)]
    meta = {"fine_label_names": classes} if hundred else {"label_names": classes}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return written


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_through_torchvision(tmp_path, hundred):
    written = _cifar_files(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    split = data.load_dataset(name, str(tmp_path), verify=False)
    assert split.shape == (3, 32, 32) and split.num_classes == (100 if hundred else 10)
    train_parts = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    pixels = np.concatenate([written[p][0] for p in train_parts]).reshape(-1, 3, 32, 32)
    labels = sum((written[p][1] for p in train_parts), [])
    x, y = split.train.tensors
    assert torch.equal(x, torch.from_numpy(pixels)) and y.tolist() == labels
    test_part = "test" if hundred else "test_batch"
    assert split.test.tensors[1].tolist() == written[test_part][1]
    with pytest.raises(ValueError, match="failed torchvision's MD5 check.*data.verify false"):
        data.load_dataset(name, str(tmp_path), verify=True)


def test_missing_cifar_files_are_named(tmp_path):
    _cifar_files(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ValueError, match="missing cifar-10-batches-py/data_batch_3, cifar-10-batches-py/test_batch "
                                         r"\(unpack cifar-10-python.tar.gz there"):
        data.load_dataset("cifar10", str(tmp_path))


def test_image_folder(tmp_path):
    from PIL import Image

    written = {}
    for part, count in (("train", 3), ("val", 2)):
        for label, cls in enumerate(("ant", "bee")):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(count):
                pixels = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / part / cls / f"{i}.png")
                written[(part, cls, i)] = pixels
    split = data.load_dataset("imagefolder", str(tmp_path), image_size=16, normalize=False)
    assert split.num_classes == 2 and split.shape == (3, 16, 16) and len(split.train) == 6 and len(split.test) == 4
    assert split.labels().tolist() == [0, 0, 0, 1, 1, 1]
    x, y = split.batch(split.train, torch.tensor([4]))
    assert y.tolist() == [1]
    assert torch.allclose(x[0], torch.from_numpy(written[("train", "bee", 1)]).permute(2, 0, 1).float() / 255)
    (tmp_path / "val" / "bee").rename(tmp_path / "val" / "wasp")
    with pytest.raises(ValueError, match="the same class folders"):
        data.load_dataset("imagefolder", str(tmp_path))


def test_synthetic_is_learnable_and_seeded():
    from fa_hvd.train.config import SyntheticConfig

    conf = SyntheticConfig(train_size=300, test_size=50, shape=[4], num_classes=3)
    a = data.load_dataset("synthetic", seed=1, synthetic=conf)
    b = data.load_dataset("synthetic", seed=1, synthetic=conf)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and a.shape == (4,)
    x, y = a.train.tensors
    solution = torch.linalg.lstsq(x, torch.nn.functional.one_hot(y, 3).float()).solution
    assert float(((x @ solution).argmax(1) == y).float().mean()) > 0.8  # labels are a linear function of x


@pytest.mark.parametrize("compress", [False, True])
def test_dir_source_reads_idx_files(tmp_path, compress):
    images, labels = _mnist_files(tmp_path, n_train=12, n_test=4, compress=compress)
    split = data.load_dataset("dir", str(tmp_path))
    assert len(split.train) == 12 and split.shape == (1, 28, 28) and split.mean is None
    assert split.train.tensors[1].tolist() == labels["train"].tolist()


def test_crop_flip_gives_crops_of_the_padded_images():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = data.crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(2):
        candidates = [padded[i, :, t:t + 6, l:l + 6] for t in range(5) for l in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in candidates)
    again = data.crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, again) and not torch.equal(out, data.crop_flip(x, torch.Generator().manual_seed(1), 2))


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet18", (3, 32, 32)),
                                        ("torchvision:resnet18", (3, 32, 32))])
def test_models_build_and_run(name, shape):
    model = models.build(name, shape, 7)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)
    if name == "resnet18":
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_torchvision_models_need_three_channels():
    with pytest.raises(ValueError, match="takes 3-channel images; the data has 1"):
        models.build("torchvision:resnet18", (1, 28, 28), 10)


def test_digits_read_directly_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    split = data.load_dataset("digits", seed=4)
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(4))
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16).unsqueeze(1)[order]
    y = torch.from_numpy(bunch.target.astype(np.int64))[order]
    assert torch.equal(torch.cat([split.train.tensors[0], split.test.tensors[0]]), x)
    assert torch.equal(torch.cat([split.train.tensors[1], split.test.tensors[1]]), y)
