"""Shared test helpers: launching real multi-rank jobs."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """SIGTERM ends the run as Ctrl-C does, with every fixture's teardown (the network cluster's
    ``down`` stops its sshd, SLURM and the jobs on it) instead of a process that dies and leaves
    them running. ``make test`` stops its side process (tests/test_multinode.py) with SIGTERM when
    it is interrupted, and so does a CI runner's timeout."""
    signal.signal(signal.SIGTERM, _interrupt)


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # The suite runs 4-rank jobs on 2 cores, often two jobs at once. Horovod's background loop runs a
    # negotiation among the ranks every HOROVOD_CYCLE_TIME ms (default 1): a 4-rank Gloo job of 36 steps,
    # one rank sleeping 0.5 s a step (31 s), took 36.6 s of CPU at 1 ms and 26.4 s at 5 ms, in the same
    # wall time. Open MPI's ranks spin in a collective; yielding lets the ranks with work run. Both are
    # Horovod's and Open MPI's tuning knobs; no test checks their latency.
    env.setdefault("HOROVOD_CYCLE_TIME", "5")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test runs with one torch intra-op thread, and whatever a test sets is undone after it:
    some code run in-process (``fa_hvd.bench``, ``fa_hvd.eval``) sets the process-wide count and
    leaves it, so without this a later test's last bits (a multi-threaded reduction's order) would
    depend on which tests ran before it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_kernel_agreement_between_tests(monkeypatch):
    """Every test starts before any ranks' agreement on the compiled kernels
    (:func:`fa_hvd.exchange.agree_on_compiled_kernels`): an optimizer an earlier test built in
    this process (the suite runs ``FA_HVD_NATIVE=0``) must not switch them off for a later one."""
    from fa_hvd.aggregators import native

    monkeypatch.setattr(native, "_everywhere", None)


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


class NetCluster:
    """The nodes of tools/cluster/cluster.sh: run commands on them, fault their links."""

    def __init__(self, env: dict):
        self.env = env
        self.script = str(ROOT / "tools" / "cluster" / "cluster.sh")

    def __call__(self, *args: str) -> str:
        """``cluster.sh ARGS`` (up, link, partition, crash...); its output, asserting it succeeded."""
        proc = subprocess.run([self.script, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"cluster.sh {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc.stdout + proc.stderr

    def on(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` as it runs on ``node``."""
        return ["env", *(f"{k}={self.env[k]}" for k in ("FA_HVD_CLUSTER_PREFIX", "FA_HVD_CLUSTER_DIR")),
                self.script, "exec", node, *argv]

    def namespace(self, node: str) -> str:
        return f"{self.env['FA_HVD_CLUSTER_PREFIX']}-{node}"

    def port_bytes(self, node: str) -> int:
        """Bytes through the switch port of ``node`` so far, both directions."""
        proc = subprocess.run(["ip", "-n", self.namespace("sw"), "-s", "-j", "link", "show",
                               f"v-{node}"], capture_output=True, text=True, check=True)
        stats = json.loads(proc.stdout)[0]["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def slurm_job(query, job: str) -> dict:
    """``scontrol show job -o JOB``'s fields, where ``query()`` runs that command and returns the
    CompletedProcess; asked up to 10 times, 1 s apart, since a controller busy on a loaded machine may
    drop a query (``scontrol`` then dies of SIGPIPE, status 141, with no output)."""
    for _ in range(10):
        proc = query()
        if proc.returncode == 0:
            return dict(field.split("=", 1) for field in proc.stdout.split() if "=" in field)
        time.sleep(1)
    raise AssertionError(f"scontrol show job {job}: status {proc.returncode}\n{output(proc)}")


def slurm_log(directory: Path, job: str) -> str:
    """The output file of ``job`` in ``directory`` (``*-JOBID.out``)."""
    files = list(directory.glob(f"*-{job}.out"))
    return files[0].read_text() if files else "(no output file)"


def cluster_env(owner: str) -> dict:
    return {**job_env(), "FA_HVD_CLUSTER_PREFIX": f"fahvdt{owner}", "FA_HVD_CLUSTER_DIR": f"/tmp/fa_hvd-cluster-{owner}"}


@pytest.fixture(scope="session")
def netcluster():
    """Three nodes (network namespaces node1..node3 with sshd), shared by every test of the session:
    the jobs run on node1 and node2; node3 is the spare that a SLURM requeue may land on."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tools/cluster/cluster.sh makes network namespaces and runs sshd")
    probe = subprocess.run(["ip", "netns", "add", f"fahvdprobe-{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces are not available here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", f"fahvdprobe-{os.getpid()}"], check=True)
    # Named after this process: a cluster brought up by hand, or by another session, is left
    # alone; one left by a killed session (its process gone) is taken down first.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for pid in {m.group(1) for m in map(re.compile(r"fahvdt(\d+)-").match, listed) if m}:
        if not Path(f"/proc/{pid}").exists():
            NetCluster(cluster_env(pid))("down")
    cluster = NetCluster(cluster_env(str(os.getpid())))
    cluster("up", "3")
    yield cluster
    cluster("down")
