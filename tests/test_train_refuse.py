"""A checkpoint from another world size or config is refused unless --resume-reshard; under
mpirun with the mpi4py transport, a stopped job's ranks exit 75.

One 1-rank run (no launcher) leaves a checkpoint at step 40. Then, on 2 ranks under
mpirun (``robust.transport=mpi``): resuming is refused (exit 2, one message naming
the world sizes and the changed key); with ``--resume-reshard`` the run continues
from the checkpoint's parameters on 2 ranks, and SIGUSR1 to one rank stops it with
exit status 75 (mpirun passes the ranks' status on).
"""

from __future__ import annotations

import signal

import pytest

from conftest import untagged
from train_helpers import finish, last_step, ranks, single, start, step_losses, summary, wait_for, write_config


@pytest.mark.slow
def test_refuse_then_reshard_then_stop(tmp_path):
    config = write_config(
        tmp_path / "c.yaml", seed=1, data={"name": "digits"}, model={"name": "mlp", "hidden": 32},
        optim={"lr": 0.1}, train={"steps": 40, "batch_size": 16, "eval_every_epochs": 0},
        robust={"aggregator": "median", "aggregator_params": {"f": 0}, "transport": "mpi"},
        faults=[{"kind": "slow", "ranks": [0], "params": {"delay": 0.03}}],
    )
    run_dir = tmp_path / "run"
    first = single(config, run_dir)
    assert first.returncode == 0, first.stderr
    initial_loss = step_losses(run_dir)[1]

    refused = start(2, config, run_dir, "--set", "optim.lr=0.05", kind="mpi4py")
    out = untagged(finish(refused))
    assert refused.returncode == 2, out
    message = [line for line in out.splitlines() if line.startswith("fa-hvd-train: error:")]
    assert len(message) == 1, out
    assert "refusing to resume: it was written by 1 ranks, this run has 2" in message[0]
    assert "optim.lr: 0.1 -> 0.05" in message[0] and "--resume-reshard" in message[0]

    resharded = start(2, config, run_dir, "--resume-reshard", "--set", "train.steps=400", kind="mpi4py")
    wait_for(lambda: last_step(run_dir) >= 60 and len(ranks(resharded)) == 2, resharded, what="step 60")
    ranks(resharded)[1].send_signal(signal.SIGUSR1)
    out = untagged(finish(resharded))
    assert resharded.returncode == 75, out
    stopped = summary(run_dir)
    assert stopped["status"] == "preempted" and stopped["world_size"] == 2 and 60 <= stopped["step"] < 400
    losses = step_losses(run_dir)
    assert sorted(losses)[:41] == list(range(1, 42))  # the 1-rank history, then step 41 on 2 ranks
    assert losses[41] < 0.5 * initial_loss, (losses[41], initial_loss)  # it went on from the trained model
    assert "stop requested (SIGUSR1)" in out or "stop requested (signal on another rank)" in out
