"""Elastic mode: a rank crashes, the survivors finish; a host comes back, the world grows again.

One elastic job on this machine, started by the launcher users run (``launch/elastic.sh``
with ``launch/discover-hosts.sh``): horovodrun takes each name of a local address for a
host of its own (``localhost``, ``127.0.0.1``, the address of another interface). 3 slots
on localhost, 1 on 127.0.0.1, a ``crash`` fault at step 15 on the rank that lands on
127.0.0.1: Horovod blacklists that host and the survivors continue on 3 ranks. The
discovery script prints the hosts file (``FA_HVD_HOSTS_FILE``) the test edits: once the
survivors say so, a third host name with one slot is added, a new worker starts there and
the run ends on 4 ranks. The crash is not repeated by the newcomer.

Horovod orders newly discovered hosts by iterating a Python set, so which host gets
rank 0 depends on string hashing: the job runs with ``PYTHONHASHSEED=0`` and the test
iterates the same set under the same seed to know where rank 0 goes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, job_env, untagged
from train_helpers import kill_tree, write_config

STEPS = 400


def third_local_host() -> str:
    """An IPv4 address of this machine other than loopback: a third host name for horovodrun."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    raise AssertionError("this machine has no IPv4 interface besides loopback: nowhere to grow the world")


def first_host(env: dict) -> str:
    """The host Horovod's driver (under ``env``) puts first: it iterates ``set(discovered hosts)``."""
    code = "print(next(iter(set(['localhost', '127.0.0.1']))))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_crash_then_growth(tmp_path):
    hosts = tmp_path / "hosts"
    env = job_env({"PYTHONHASHSEED": "0", "FA_HVD_HOSTS_FILE": str(hosts)})
    crash_rank = 3 if first_host(env) == "localhost" else 0  # the rank on 127.0.0.1, the 1-slot host
    config = write_config(
        tmp_path / "elastic.yaml",
        data={"name": "digits"},
        model={"name": "mlp", "hidden": 32},
        optim={"lr": 0.05},
        train={"steps": STEPS, "batch_size": 16, "eval_every_steps": 100},
        robust={"aggregator": "flag", "aggregator_params": {"f": 1}},
        faults=[{"kind": "crash", "ranks": [crash_rank], "start_step": 15},
                {"kind": "signflip", "ranks": [2]},
                {"kind": "slow", "ranks": [1], "params": {"delay": 0.05}}],
        elastic={"enabled": True, "commit_every_steps": 5},
    )
    hosts.write_text("localhost:3\n127.0.0.1:1\n")
    run_dir = tmp_path / "run"
    log = open(tmp_path / "job.log", "w+")
    cmd = [str(ROOT / "launch" / "elastic.sh"), "4", "3", "4", str(config), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)

    def text():
        log.seek(0)
        return untagged(log.read())

    try:
        deadline = time.monotonic() + 240
        while "on 3 ranks" not in text():
            assert proc.poll() is None and time.monotonic() < deadline, text()[-5000:]
            time.sleep(0.2)
        hosts.write_text(f"localhost:3\n127.0.0.1:1\n{third_local_host()}:1\n")
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    out = text()
    assert proc.returncode == 0, out[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    events = summary["events"]
    assert summary["status"] == "finished" and summary["step"] == STEPS, summary
    assert "[elastic.sh] + python -m fa_hvd.horovodrun -np 4 --min-np 3 --max-np 4 --host-discovery-script" in out, out[:3000]
    assert f"fa_hvd fault: rank {crash_rank} crashes at step 15" in out
    assert out.count("crashes at step") == 1, out[-6000:]
    assert any("from 4 to 3 ranks" in e for e in events) and any("from 3 to 4 ranks" in e for e in events), events
    assert summary["world_size"] == 4 and summary["params_identical_on_ranks"], summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # one history: redone steps replace the lost ones
    sizes = [r["world_size"] for r in steps]
    assert sizes[0] == 4 and 3 in sizes and sizes[-1] == 4, sorted(set(sizes))
    assert summary["final"]["test_accuracy"] > 0.8, summary  # signflip on rank 1 did not break FA
