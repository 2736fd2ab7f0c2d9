"""Helpers for the trainer's tests: configs, single-process and multi-rank fa-hvd-train jobs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from conftest import BIN, LAUNCHERS, ROOT, job_env

TRAIN = str(BIN / "fa-hvd-train")


def first_host(env: dict) -> str:
    """The host horovodrun's elastic driver puts first (its ranks start at 0) under ``env``, asked of Horovod's
    own code run as the driver runs it: the driver orders the hosts it first discovers (launch/discover-hosts.sh,
    which reads ``env``'s FA_HVD_HOSTS_FILE) by iterating sets (``HostDiscoveryScript.find_available_hosts_and_slots``,
    ``HostManager.order_available_hosts``), so the layout follows PYTHONHASHSEED."""
    probe = ("from horovod.runner.elastic.discovery import HostDiscoveryScript, HostManager\n"
             f"hosts = HostManager(HostDiscoveryScript({str(ROOT / 'launch' / 'discover-hosts.sh')!r}, 1))\n"
             "hosts.update_available_hosts()\n"
             "print(hosts.current_hosts.host_assignment_order[0])")
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def hash_seed_putting_first(host: str, env: dict) -> str:
    """A PYTHONHASHSEED (0 to 63) under which the driver, under ``env``, puts ``host`` first (:func:`first_host`)."""
    for seed in map(str, range(64)):
        if first_host({**env, "PYTHONHASHSEED": seed}) == host:
            return seed
    raise AssertionError(f"no hash seed in 0..63 puts {host} first")


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def train_argv(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [TRAIN, "--config", str(config), "--run-dir", str(run_dir), *extra]


def single(config: Path, run_dir: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """fa-hvd-train as one process (a world of one, no launcher)."""
    return subprocess.run(train_argv(config, run_dir, *extra), cwd=ROOT, env=job_env(), capture_output=True,
                          text=True, timeout=timeout)


def start(np: int, config: Path, run_dir: Path, *extra: str, kind: str = "gloo") -> subprocess.Popen:
    """A multi-rank fa-hvd-train job in the background (output to run_dir/../<name>.log)."""
    log = open(run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(LAUNCHERS[kind](np) + train_argv(config, run_dir, *extra), cwd=ROOT, env=job_env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for ``proc``; its whole output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    proc.log.seek(0)
    return proc.log.read()


def ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The job's rank processes by rank (fa-hvd-train processes whose environment names a rank)."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "fa-hvd-train" not in " ".join(child.cmdline()) or child.name() in ("sh", "bash"):
                continue
            env = child.environ()
        except psutil.Error:
            continue
        rank = env.get("HOROVOD_RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("RANK")))  # RANK: torchrun
        if rank is not None:
            found[int(rank)] = child
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, at once (a node dying)."""
    try:
        root = psutil.Process(pid)
        everyone = [root] + root.children(recursive=True)
    except psutil.Error:
        return
    for p in everyone:
        try:
            p.kill()
        except psutil.Error:
            pass


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            proc.log.seek(0)
            raise AssertionError(f"job ended before {what}:\n{proc.log.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def last_step(run_dir: Path) -> int:
    """The last step record in metrics.jsonl (0 if none yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "step":
            step = record["step"]
    return step


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def step_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "step":
            losses[record["step"]] = record["loss"]
    return losses

