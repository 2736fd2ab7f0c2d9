"""The set-up: Horovod's build, real multi-rank collectives, the demo, the embedded and local data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BIN, ROOT, SCRIPTS, job_env, launch, output, untagged
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


@pytest.mark.slow
def test_demo_fa_survives_the_byzantine_rank_and_mean_does_not(tmp_path):
    """make demo: the trainer on 4 ranks with FA, then with mean, and the plot of both; run as
    ``.venv/bin/fa-hvd-demo`` with the venv not on PATH (it finds horovodrun and fa-hvd-train beside itself)."""
    env = job_env()
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if d and Path(d).resolve() != BIN.resolve())
    proc = subprocess.run([str(BIN / "fa-hvd-demo"), "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, output(proc)
    lines = proc.stdout.splitlines()
    accuracy = dict(part.split() for part in lines[-2].removeprefix("final test accuracy: ").split(", "))
    assert float(accuracy["flag"]) > 0.85 and float(accuracy["mean"]) < 0.3, proc.stdout
    assert lines[-1] == f"plot: {tmp_path / 'curves.png'}" and (tmp_path / "curves.png").stat().st_size > 10000
    assert sum("parameters bit-identical on every rank" in line for line in lines) == 2, proc.stdout
    flag = json.loads((tmp_path / "flag" / "summary.json").read_text())
    assert flag["faults_injected"] == {"3": {"reverse": flag["step"]}} and flag["world_size"] == 4


def test_digits_is_the_embedded_default():
    split = data.load_dataset("digits")
    assert len(split.train) + len(split.test) == 1797
    assert split.shape == (1, 8, 8) and split.num_classes == 10
    x, y = split.train.tensors
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 and y.dtype == torch.int64


def test_data_dir_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for part, n in (("train", 20), ("test", 6)):
        images[part] = rng.integers(0, 256, (n, 5, 5), dtype=np.uint8)
        np.savez(tmp_path / f"{part}.npz", x=images[part], y=np.arange(n) % 3)
    split = data.load_dataset("dir", str(tmp_path))
    assert len(split.train) == 20 and split.shape == (1, 5, 5) and split.num_classes == 3
    x, y = split.batch(split.train, torch.tensor([2]))
    assert torch.equal(x[0, 0], torch.from_numpy(images["train"][2]).float() / 255) and y.tolist() == [2]


def test_data_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="expected train.npz"):
        data.load_dataset("dir", str(tmp_path))
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (3, 4, 4))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + bytes(3 * 16 - 5))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match="truncated"):
        data.load_dataset("dir", str(tmp_path))


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


def test_setup_refuses_a_python_older_than_the_declared_minimum(tmp_path):
    """pyproject.toml declares what the code needs (BaseException.add_note: 3.11; weights_only=True
    is safe from torch 2.6), and tools/setup.sh checks the interpreter against the same bound."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert "torch>=2.6" in project["dependencies"]
    assert sys.version_info >= (3, 11) and tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)
    copy = _setup_copy(tmp_path)
    path = _restricted_path(tmp_path, BASIC + ["make", "cmake", "g++"])
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/bash\n"  # plays Python 3.10: sys.version_info < (3, 11) is true there
                   "[ \"$1\" = --version ] && { echo 'Python 3.10.12'; exit 0; }\n"
                   "case \"$2\" in *'(3, 11)'*) exit 1 ;; esac\nexit 0\n")
    old.chmod(0o755)
    proc = subprocess.run(["bash", "tools/setup.sh"], cwd=copy, capture_output=True, text=True,
                          env={"PATH": path, "HOME": str(tmp_path), "PYTHON": str(old)})
    assert proc.returncode == 1
    assert "is Python 3.10.12; fa_hvd needs Python >= 3.11" in proc.stderr, proc.stderr
