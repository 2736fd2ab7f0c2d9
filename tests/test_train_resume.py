"""Exact resume: interrupted and resumed runs end bit-identical to an uninterrupted one.

For FA and for cclip (whose centre is state), on 3 ranks with a Byzantine rank
(Gaussian noise, sigma 10) and rank 0 slowed down so the run can be interrupted:

1. a reference run of STEPS steps, uninterrupted;
2. the same run, SIGTERM to rank 1 only, mid-run: every rank checkpoints at the
   next step boundary and exits 75, summary.json says "preempted";
3. resumed (``--resume auto``), then SIGKILL of the whole job once a periodic
   checkpoint past the first stop is on disk;
4. the newest checkpoint is torn (truncated) and the job resumed again: the
   torn file is reported and skipped, the previous one taken, and the run ends.

The final parameters (CRC32 over every rank's bytes) and every logged step loss
must equal the reference's. Both aggregators' chains run side by side, under horovodrun (Gloo)
and under torchrun (``robust.transport torch``).
"""

from __future__ import annotations

import re
import signal
import threading

import pytest

from fa_hvd import checkpoint
from train_helpers import finish, kill_tree, last_step, ranks, start, step_losses, summary, wait_for, \
    write_config

STEPS = 60
NP = 3
TRANSPORTS = {"gloo": "horovod", "torchrun": "torch"}  # launcher -> robust.transport
# How each launcher names the exit status of the rank that ended first.
FIRST_EXIT = {"gloo": r"The first process to do so was:\s*Process name: \d+\s*Exit code: (\d+)",
              "torchrun": r"Root Cause \(first observed failure\):\s*\[\d+\]:(?:\s*\w+\s*:[^\n]*\n)*?"
                          r"\s*exitcode\s*:\s*(\d+)"}


def _config(tmp_path, aggregator: str, params: dict, kind: str):
    return write_config(
        tmp_path / f"{aggregator}.yaml",
        seed=3,
        data={"name": "digits"},
        model={"name": "mlp", "hidden": 32, "dropout": 0.1},  # dropout: torch's generator must resume too
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        schedule={"name": "cosine", "warmup_steps": 5},
        train={"steps": STEPS, "batch_size": 16, "eval_every_steps": 20},
        robust={"aggregator": aggregator, "aggregator_params": {"f": 1, **params}, "transport": TRANSPORTS[kind]},
        faults=[{"kind": "gaussian", "ranks": [2], "params": {"sigma": 10.0}},
                {"kind": "slow", "ranks": [0], "params": {"delay": 0.04}}],
        checkpoint={"every_steps": 10, "keep": 3},
    )


def _chain(tmp_path, aggregator: str, params: dict, out: dict, kind: str) -> None:
    config = _config(tmp_path, aggregator, params, kind)
    reference, broken = tmp_path / f"{aggregator}-reference", tmp_path / f"{aggregator}-broken"
    logs = out.setdefault("logs", [])
    reference_job = start(NP, config, reference, kind=kind)
    logs.append(finish(reference_job))

    # SIGTERM to one rank.
    job = start(NP, config, broken, kind=kind)
    wait_for(lambda: last_step(broken) >= 12 and len(ranks(job)) == NP, job, what="step 12")
    ranks(job)[1].send_signal(signal.SIGTERM)
    logs.append(finish(job))
    out["preempted"] = summary(broken)
    out["first_exit"] = re.findall(FIRST_EXIT[kind], logs[-1])

    # Resume, then SIGKILL of everything after a checkpoint past the stop.
    stopped = out["preempted"]["step"]
    target = (stopped // 10 + 2) * 10
    job = start(NP, config, broken, "--resume", "auto", kind=kind)
    wait_for(lambda: checkpoint.path_for(broken / "checkpoints", target).exists(), job, what=f"checkpoint {target}")
    kill_tree(job.pid)
    logs.append(finish(job))
    out["killed_after"] = target

    # Tear the newest checkpoint; resume from the one before.
    newest = checkpoint.listing(broken / "checkpoints")[-1][1]
    newest.write_bytes(newest.read_bytes()[:-100])
    out["torn"] = newest.name
    job = start(NP, config, broken, "--resume", "auto", kind=kind)
    logs.append(finish(job))
    out["resumed_log"] = logs[-1]
    out["reference"], out["final"] = summary(reference), summary(broken)
    out["reference_losses"], out["losses"] = step_losses(reference), step_losses(broken)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
def test_interrupted_runs_resume_bit_identical(tmp_path, kind):
    chains = {"flag": {}, "cclip": {}}
    params = {"flag": {"r": 1}, "cclip": {"tau": 0.5}}
    errors = []

    def run(name):
        try:
            _chain(tmp_path, name, params[name], chains[name], kind)
        except BaseException as exc:  # reported below, with the job logs
            errors.append((name, exc))

    threads = [threading.Thread(target=run, args=(name,)) for name in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, exc in errors:
        logs = "\n=====\n".join(log[-3000:] for log in chains[name].get("logs", []))
        raise AssertionError(f"{name}: {exc}\n{logs}") from exc

    crcs = set()
    for name, out in chains.items():
        preempted, final, reference = out["preempted"], out["final"], out["reference"]
        assert preempted["status"] == "preempted" and 12 <= preempted["step"] < STEPS, (name, preempted)
        assert out["first_exit"] == ["75"], (name, out["logs"][1][-2000:])
        assert "skipping checkpoint" in out["resumed_log"] and out["torn"] in out["resumed_log"], name
        assert reference["status"] == final["status"] == "finished" and final["step"] == STEPS
        assert final["params_identical_on_ranks"] and reference["params_identical_on_ranks"]
        assert final["params_crc32"] == reference["params_crc32"], (name, final, reference)
        assert out["losses"] == out["reference_losses"], name
        assert final["final"] == reference["final"], name
        assert final["faults_injected"]["2"]["gaussian"] == STEPS, final["faults_injected"]
        crcs.add(final["params_crc32"])
    assert len(crcs) == 2  # the two rules really trained differently
