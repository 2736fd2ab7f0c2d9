"""The set-up: Horovod's build, real multi-rank collectives, the demo, data and configs."""

import gzip
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BIN, ROOT, SCRIPTS, job_env, launch, output, untagged
from fa_hvd import config
from fa_hvd.demo import DemoConfig
from fa_hvd.train import data


def test_horovod_was_built_with_pytorch_mpi_and_gloo():
    proc = subprocess.run([str(BIN / "horovodrun"), "--check-build"], capture_output=True, text=True, env=job_env())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for needle in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert any(needle in line for line in lines), proc.stdout


def test_setup_is_cached():
    proc = subprocess.run(["bash", "tools/setup.sh"], cwd=ROOT, capture_output=True, text=True, env=job_env())
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gloo", "mpi"])
def test_four_rank_allgather(kind):
    proc = launch(kind, 4, ["python", str(SCRIPTS / "allgather_check.py")])
    assert proc.returncode == 0, output(proc)
    assert "GATHERED [0.0, 1.0, 2.0, 3.0] SIZE 4" in untagged(proc.stdout).replace("\n", ""), output(proc)


def _final_accuracy(stdout: str, epochs: int) -> float:
    return float(stdout.split(f"epoch {epochs}/{epochs}")[1].split("test accuracy")[1].split()[0])


@pytest.mark.slow
def test_demo_survives_its_byzantine_rank_and_ranks_agree():
    proc = launch("gloo", 4, ["fa-hvd-demo", "--config", "configs/demo.yaml"])
    assert proc.returncode == 0, output(proc)
    assert "fault: reverse" in proc.stdout and "rank 3 injected: reverse x55" in proc.stdout, output(proc)
    assert "bit-identical on every rank" in proc.stdout, output(proc)
    assert _final_accuracy(untagged(proc.stdout), 5) > 0.85


@pytest.mark.slow
def test_demo_with_mean_falls_to_the_same_byzantine_rank():
    proc = launch("gloo", 4, ["fa-hvd-demo", "--config", "configs/demo.yaml", "--aggregator", "mean", "--f", "1",
                              "--epochs", "2"])
    assert proc.returncode == 0, output(proc)
    assert _final_accuracy(untagged(proc.stdout), 2) < 0.3


def test_digits_is_the_embedded_default():
    split = data.load_dataset("digits")
    assert len(split.train) + len(split.test) == 1797
    assert split.shape == (1, 8, 8) and split.num_classes == 10
    x, y = split.train.tensors
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 and y.dtype == torch.int64


def test_data_dir_npz(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 20), ("test", 6)):
        np.savez(tmp_path / f"{part}.npz", x=rng.integers(0, 256, (n, 5, 5), dtype=np.uint8), y=np.arange(n) % 3)
    split = data.load_dataset("dir", str(tmp_path))
    assert len(split.train) == 20 and split.shape == (1, 5, 5) and split.num_classes == 3
    assert float(split.train.tensors[0].max()) <= 1.0


def _idx(path, array, compress):
    dims = array.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_data_dir_mnist_idx(tmp_path, compress):
    suffix = ".gz" if compress else ""
    rng = np.random.default_rng(1)
    _idx(tmp_path / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (12, 28, 28)), compress)
    _idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(12) % 10, compress)
    _idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (4, 28, 28)), compress)
    _idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(4), compress)
    split = data.load_dataset("dir", str(tmp_path))
    assert len(split.train) == 12 and len(split.test) == 4 and split.shape == (1, 28, 28)
    assert split.train.tensors[1].tolist() == list(np.arange(12) % 10)


def test_data_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="expected train.npz"):
        data.load_dataset("dir", str(tmp_path))
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 4, 4)), False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-5])
    _idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3), False)
    with pytest.raises(ValueError, match="truncated"):
        data.load_dataset("dir", str(tmp_path))
    with pytest.raises(ValueError, match="too small"):
        data.shard(data.load_dataset("digits").test, 0, 1000)


@pytest.mark.parametrize("raw,needle", [
    ({"epochs": "many"}, "epochs: expected an integer"),
    ({"lr": -1.0}, "lr must be > 0"),
    ({"model": "resnet"}, "model: expected one of"),
    ({"aggregator": "nosuch"}, "unknown aggregation rule"),
    ({"aggregator": "mean", "aggregator_params": {"r": 2}}, "mean: unknown parameter"),
    ({"learning_rate": 0.1}, "learning_rate: unknown key"),
    ({"data": "dir"}, "needs data_dir"),
])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(config.ConfigError, match=needle):
        config.from_dict(DemoConfig, raw)


def test_shipped_config_loads():
    conf = config.load(DemoConfig, ROOT / "configs" / "demo.yaml")
    assert conf.aggregator == "flag" and conf.aggregator_params["f"] == 1


def test_demo_help():
    proc = subprocess.run([sys.executable, "-m", "fa_hvd.demo", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--aggregator" in proc.stdout


def _restricted_path(tmp_path, tools):
    """A PATH holding only ``tools`` (symlinks), to play a machine that lacks the others."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        # The interpreter behind the venv: a pyenv shim would need pyenv on PATH.
        found = getattr(sys, "_base_executable", sys.executable) if tool == "python3" else shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _setup_copy(tmp_path):
    import shutil

    copy = tmp_path / "repo"
    (copy / "tools").mkdir(parents=True)
    for name in ("setup.sh", "requirements.txt", "horovod-build.env", "horovod-build.cmake"):
        shutil.copy(ROOT / "tools" / name, copy / "tools" / name)
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


BASIC = ["bash", "cat", "cut", "sha256sum", "dirname", "id", "python3"]


def test_setup_names_a_missing_compiler(tmp_path):
    copy = _setup_copy(tmp_path)
    path = _restricted_path(tmp_path, BASIC + ["make", "cmake"])
    proc = subprocess.run(["bash", "tools/setup.sh"], cwd=copy, capture_output=True, text=True,
                          env={"PATH": path, "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "missing: g++" in proc.stderr and "C++ compiler" in proc.stderr, proc.stderr


def test_setup_names_missing_mpi_and_apt_get(tmp_path):
    copy = _setup_copy(tmp_path)
    path = _restricted_path(tmp_path, BASIC + ["make", "cmake", "g++"])
    proc = subprocess.run(["bash", "tools/setup.sh"], cwd=copy, capture_output=True, text=True,
                          env={"PATH": path, "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "no MPI (mpirun/mpicxx) and no apt-get" in proc.stderr, proc.stderr
