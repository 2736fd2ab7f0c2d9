"""Shared test helpers: launching real multi-rank jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
BIN = Path(sys.executable).parent

LAUNCHERS = {
    "gloo": lambda np: [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"],
    "mpi": lambda np: [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--mpi"],
    "mpi4py": lambda np: ["mpirun", "--oversubscribe", "-np", str(np)],
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


def results(proc) -> list[dict]:
    """The JSON objects printed by ranks after a ``RESULT `` marker."""
    found = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if "RESULT " in line:
            found.append(json.loads(line.split("RESULT ", 1)[1]))
    return found


def output(proc) -> str:
    return f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
