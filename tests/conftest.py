"""Shared test helpers: launching real multi-rank jobs."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Compiled sorting networks (fa_hvd.aggregators.native) are built on first use, one per rule
# and size; the suite runs the torch path, and tests/test_selection.py compares the two.
os.environ.setdefault("FA_HVD_NATIVE", "0")

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
BIN = Path(sys.executable).parent

LAUNCHERS = {
    "gloo": lambda np: [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"],
    "mpi": lambda np: [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--mpi"],
    "mpi4py": lambda np: ["mpirun", "--oversubscribe", "-np", str(np)],
    "torchrun": lambda np: [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(np), "--no-python"],
}


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.update(extra or {})
    return env


def launch(kind: str, np: int, argv: list[str], timeout: float = 180, env: dict | None = None):
    """Run ``argv`` (a python command line) on ``np`` ranks; returns the CompletedProcess."""
    cmd = LAUNCHERS[kind](np) + argv
    return subprocess.run(
        cmd, cwd=ROOT, env=job_env(env), capture_output=True, text=True, timeout=timeout
    )


RANK_TAG = re.compile(r"\[\d+(?:,\d+)?\]<std(?:out|err)>:")


def untagged(text: str) -> str:
    """``text`` without the launchers' per-rank tags (``[0]<stdout>:``, ``[1,0]<stderr>:``)."""
    return RANK_TAG.sub("", text)


def results(proc) -> list[dict]:
    """The JSON objects printed after a ``RESULT `` marker.

    Open MPI's tagged output can cut a long line into chunks, each with its own
    ``[1,0]<stdout>:`` tag, so the tags are removed before parsing.
    """
    text = untagged(proc.stdout)
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(part)[0] for part in text.split("RESULT ")[1:]]


def output(proc) -> str:
    return f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


@pytest.fixture(autouse=True)
def fixed_global_rngs():
    """Every test starts from the same global RNG states (Python, NumPy, torch), so a test that
    draws from them sees the same numbers whichever tests ran before it, alone or in the suite."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
