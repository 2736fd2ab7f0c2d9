"""fa-hvd-train under torchrun (robust.transport torch, Gloo).

* An uninterrupted reference run on two "nodes": two torchrun agents on this host
  (``NNODES=2 RDZV_ENDPOINT=... launch/torchrun.sh 2 ...``, c10d rendezvous), 2 ranks each.
* The same run on one node, ``MAX_RESTARTS=1 launch/torchrun.sh 4 ...``: one worker is SIGKILLed
  once a checkpoint is on disk; torchrun restarts the whole group, which resumes (``--resume
  auto``, the default) from the newest checkpoint and ends with the reference's parameters (CRC32
  over every rank's bytes) and every logged step loss.
* Launched by torchrun with another transport: refused with one line before any rank trains.
"""

from __future__ import annotations

import random
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, job_env
from fa_hvd import checkpoint
from train_helpers import finish, ranks, step_losses, summary, train_argv, wait_for, \
    write_config

pytestmark = pytest.mark.slow

STEPS = 40
TORCHRUN = str(BIN / "torchrun")


def _config(tmp_path):
    return write_config(
        tmp_path / "run.yaml",
        seed=5,
        data={"name": "digits"},
        model={"name": "mlp", "hidden": 32, "dropout": 0.1},  # dropout: torch's generator must resume too
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        train={"steps": STEPS, "batch_size": 16, "eval_every_steps": 20},
        robust={"aggregator": "flag", "aggregator_params": {"f": 1}, "transport": "torch"},
        faults=[{"kind": "gaussian", "ranks": [3], "params": {"sigma": 10.0}},
                {"kind": "slow", "ranks": [0], "params": {"delay": 0.05}}],  # time to kill a worker mid-run
        checkpoint={"every_steps": 10, "keep": 3},
        log={"progress": "lines"},
    )


def _free_port() -> int:
    """A port free now and outside the kernel's ephemeral range (ip_local_port_range), so that between
    this check and the agent's bind no outgoing connection or bind(0), of which the suite's jobs make
    many, can be given it. Without such ports (a range over them all): any free port."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 1024, 65535
    outside = [port for port in range(20000, 65536) if not low <= port <= high]
    for port in random.SystemRandom().sample(outside, min(50, len(outside))):  # not the suite's seeded RNG
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, nproc: int, config, run_dir, **env) -> subprocess.Popen:
    """launch/torchrun.sh NPROC CONFIG --run-dir RUN_DIR in the background (``env``: its variables)."""
    log = open(tmp_path / f"{run_dir.name}.{len(list(tmp_path.glob('*.log')))}.log", "w+")
    job = subprocess.Popen(["launch/torchrun.sh", str(nproc), str(config), "--run-dir", str(run_dir)], cwd=ROOT,
                           env=job_env(env), stdout=log, stderr=subprocess.STDOUT, text=True)
    job.log = log
    return job


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_bit_identical(tmp_path):
    config = _config(tmp_path)
    reference, restarted = tmp_path / "reference", tmp_path / "restarted"
    nodes = {"NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}", "RDZV_ID": "reference"}
    agents = [_launch(tmp_path, 2, config, reference, **nodes) for _ in range(2)]
    logs = [finish(agent) for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n=====\n".join(log[-3000:] for log in logs)

    job = _launch(tmp_path, 4, config, restarted, MAX_RESTARTS="1")
    wait_for(lambda: checkpoint.path_for(restarted / "checkpoints", 10).exists() and len(ranks(job)) == 4, job,
             what="the checkpoint at step 10")
    victim = ranks(job)[1]
    victim.kill()
    log = finish(job)
    assert job.returncode == 0, log[-4000:]

    ref, final = summary(reference), summary(restarted)
    assert ref["world_size"] == final["world_size"] == 4 and final["step"] == STEPS, final
    resumed = [int(e.split()[3]) for e in final["events"] if e.startswith("resumed at step")]
    assert len(resumed) == 1 and 10 <= resumed[0] < STEPS, final["events"]  # one restart, mid-run
    assert final["params_identical_on_ranks"] and ref["params_identical_on_ranks"]
    assert final["params_crc32"] == ref["params_crc32"], (final, ref)
    assert step_losses(restarted) == step_losses(reference)
    assert final["faults_injected"]["3"]["gaussian"] == STEPS, final["faults_injected"]


def test_torchrun_with_another_transport_is_refused_before_training(tmp_path):
    config = _config(tmp_path)
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python",
                           *train_argv(config, tmp_path / "run", "--set", "robust.transport=horovod")],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "fa-hvd-train: error: launched by torchrun, but robust.transport is horovod" in proc.stderr
    assert not (tmp_path / "run").exists()
