"""Where a run resumes from (fa_hvd.train.resume): every rank decides together, damaged and abandoned
checkpoints are set aside, never deleted, one run per directory; and the trainer's start-up around it
(config.yaml after the check, resharding, signals during set-up, the preemption checkpoint first)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from fa_hvd import checkpoint
from fa_hvd.train import config as train_config
from fa_hvd.train import control, resume, trainer
from local_world import run_ranks
from loopback import LoopbackTransport


class Evil:
    """An object a weights_only load refuses."""


def _write(directory, step, **extra):
    checkpoint.write(checkpoint.path_for(directory, step), {"step": step, **extra}, step)


def _accept(state, path):
    return None


_hidden = threading.local()


def _choose(run_dir, how, p=2, compatible=_accept, hide_from=()):
    """resume.choose on ``p`` in-process ranks; ranks in ``hide_from`` cannot read the run directory."""

    def rank(transport):
        _hidden.on = transport.rank in hide_from
        try:
            state, notes = resume.choose(transport, run_dir, how, compatible,
                                         resume.RunLock(run_dir) if transport.rank == 0 else None)
        except resume.UsageError as exc:
            return ("refused", str(exc))
        return (state and state["step"], notes, transport.calls)

    try:
        return run_ranks(p, rank)
    finally:
        (run_dir / resume.LOCK_NAME).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _unmounted(monkeypatch):
    """A rank with ``_hidden.on`` does not see the run directory (its file system is not shared)."""
    real = checkpoint.verify

    def verify(path):
        if getattr(_hidden, "on", False) and "fa_hvd-ckpt-" not in str(path):
            raise checkpoint.CorruptCheckpoint(f"{path}: cannot be read: not mounted here")
        return real(path)

    monkeypatch.setattr(checkpoint, "verify", verify)


def _steps(directory):
    return [s for s, _ in checkpoint.listing(directory)]


def test_a_torn_newest_file_is_set_aside_and_keep_1_never_loses_the_last_good_one(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _write(ckpts, 20)
    _write(ckpts, 30)
    newest = checkpoint.path_for(ckpts, 30)
    newest.write_bytes(newest.read_bytes()[:-10])
    results = _choose(tmp_path, "auto")
    assert [r[0] for r in results] == [20, 20]
    notes = " | ".join(results[0][1])
    assert "skipping checkpoint" in notes and "torn" in notes and "set aside (not deleted)" in notes
    assert _steps(ckpts) == [20] and [p.name for p in (ckpts / "set-aside").iterdir()] == ["step-000000030.ckpt"]
    writer = checkpoint.Writer(keep=1)  # the run goes on: its first checkpoint prunes only its own line
    writer.submit(checkpoint.path_for(ckpts, 30), {"step": 30}, 30)
    writer.wait()
    assert _steps(ckpts) == [30] and checkpoint.read(checkpoint.path_for(ckpts, 30))["step"] == 30


def test_resume_from_an_older_path_starts_a_new_line_that_auto_continues(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (10, 20, 30):
        _write(ckpts, step, line="old")
    results = _choose(tmp_path, str(checkpoint.path_for(ckpts, 10)))
    assert [r[0] for r in results] == [10, 10]
    assert any("above the resumed step 10" in n for n in results[0][1])
    assert _steps(ckpts) == [10] and sorted(p.name for p in (ckpts / "set-aside").iterdir()) == [
        "step-000000020.ckpt", "step-000000030.ckpt"]
    writer = checkpoint.Writer(keep=3)
    for step in (15, 20):  # the new line, pruned against itself only
        writer.submit(checkpoint.path_for(ckpts, step), {"step": step, "line": "new"}, step)
    writer.wait()
    results = _choose(tmp_path, "auto")
    assert [r[0] for r in results] == [20, 20] and checkpoint.read(checkpoint.path_for(ckpts, 20))["line"] == "new"
    assert len(list((ckpts / "set-aside").iterdir())) == 2  # still there, never deleted


def test_resume_never_deletes_the_old_checkpoints_and_leaves_the_set_aside_ones(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "set-aside").mkdir(parents=True)
    for step in (3, 6, 9):
        _write(ckpts, step)
    (ckpts / "set-aside" / "step-000000012.ckpt").write_bytes(b"kept")
    results = _choose(tmp_path, "never")
    assert [r[0] for r in results] == [None, None]
    assert results[0][1] == [f"--resume never: deleted 3 old checkpoint(s) in {ckpts}"]
    assert _steps(ckpts) == [] and (ckpts / "set-aside" / "step-000000012.ckpt").read_bytes() == b"kept"


def test_a_file_that_fails_unpickling_falls_back_on_every_rank_or_is_refused_on_every_rank(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _write(ckpts, 10)
    checkpoint.write(checkpoint.path_for(ckpts, 20), {"step": 20, "x": Evil()}, 20)
    refused = _choose(tmp_path, str(checkpoint.path_for(ckpts, 20)), p=3)
    assert [r[0] for r in refused] == ["refused"] * 3
    assert "does not load as tensors and plain data" in refused[0][1]
    results = _choose(tmp_path, "auto", p=3)
    assert [r[0] for r in results] == [10, 10, 10]
    assert [p.name for p in (ckpts / "set-aside").iterdir()] == ["step-000000020.ckpt"]


def test_an_incompatible_checkpoint_is_refused_on_every_rank(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _write(ckpts, 10)

    def incompatible(state, path):
        raise resume.UsageError(f"{path}: refusing to resume: other config")

    results = _choose(tmp_path, "auto", p=3, compatible=incompatible)
    assert [r[0] for r in results] == ["refused"] * 3 and _steps(ckpts) == [10]


def test_a_checkpoint_of_another_model_is_refused_even_with_reshard_and_elastic_takes_another_world(tmp_path):
    conf, conf_data = train_config.parse({"model": {"name": "mlp"}}, ())
    state = {"format": resume.CHECKPOINT_FORMAT, "model_name": "cnn", "world_size": 2, "config_hash": "h",
             "config": conf_data}
    with pytest.raises(resume.UsageError, match="the checkpoint is of model 'cnn', the config builds 'mlp'"):
        resume.check_compatible(state, conf, conf_data, "h", 2, tmp_path / "c.ckpt", reshard=True)
    state["model_name"] = "mlp"
    with pytest.raises(resume.UsageError, match="it was written by 2 ranks, this run has 3"):
        resume.check_compatible(state, conf, conf_data, "h", 3, tmp_path / "c.ckpt", reshard=False)
    elastic, elastic_data = train_config.parse({"model": {"name": "mlp"}}, ("elastic=true",))
    resume.check_compatible({**state, "config": elastic_data}, elastic, elastic_data, "h", 3, tmp_path / "c.ckpt",
                            reshard=False)


def test_ranks_that_cannot_see_the_file_get_it_by_chunked_broadcast(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK", 1000)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _write(ckpts, 10, weights=checkpoint.torch.arange(5000.0))
    shared = _choose(tmp_path, "auto", p=3)
    assert [r[0] for r in shared] == [10, 10, 10]
    assert not any("fa_hvd.resume.file" in name for _, name in shared[1][2])  # read from the file system
    hidden = _choose(tmp_path, "auto", p=3, hide_from=(2,))
    assert [r[0] for r in hidden] == [10, 10, 10]
    chunks = [name for kind, name in hidden[2][2] if name.startswith("fa_hvd.resume.file.")]
    size = checkpoint.path_for(ckpts, 10).stat().st_size
    assert len(chunks) == 1 + -(-size // 1000) and size > 20_000  # the length, then 1000-byte chunks


# -- the run directory's lock ---------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_first_and_a_stale_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from fa_hvd.train.resume import RunLock\n"
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(resume.UsageError, match=rf"in use by another fa-hvd-train run: host \S+, pid {holder.pid}"):
            resume.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = resume.RunLock(tmp_path)
    notes = lock.acquire()  # the holder is gone: its lock is stale
    assert len(notes) == 1 and f"removed a stale lock of pid {holder.pid}" in notes[0]
    assert yaml.safe_load((tmp_path / resume.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / resume.LOCK_NAME).exists()


def test_a_lock_from_another_host_is_taken_over_only_by_a_requeued_start_of_its_own_slurm_job(tmp_path,
                                                                                               monkeypatch):
    (tmp_path / resume.LOCK_NAME).write_text('{"host": "node-elsewhere", "pid": 1, "start": "1", "job": "77", '
                                             '"restart": "0"}')
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(resume.UsageError, match="host node-elsewhere, pid 1"):
        resume.RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(resume.UsageError, match="host node-elsewhere, pid 1"):
        resume.RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # this job, requeued: its first start is over
    lock = resume.RunLock(tmp_path)
    assert "removed a stale lock of pid 1 on node-elsewhere" in lock.acquire()[0]
    lock.release()


def test_a_new_rank_0_takes_its_runs_lock_over_and_the_lost_one_leaves_it_alone(tmp_path, monkeypatch):
    """Elastic: rank 0 is lost with its node (its process may come back); the rank that becomes
    rank 0 holds the run's lock from then on and removes it at the end, the lost one does not."""
    lost = resume.RunLock(tmp_path)
    lost.acquire()
    monkeypatch.setattr(resume.socket, "gethostname", lambda: "node1")  # the new rank 0, on another node
    new = resume.RunLock(tmp_path)
    new.take_over()
    holder = json.loads((tmp_path / resume.LOCK_NAME).read_text())
    assert (holder["host"], holder["pid"]) == ("node1", os.getpid()) and new.held
    assert sorted(p.name for p in tmp_path.iterdir()) == [resume.LOCK_NAME]  # no spare file left
    lost.release()  # the lost rank 0, back: the lock is not its own any more
    assert (tmp_path / resume.LOCK_NAME).exists()
    new.release()
    assert not (tmp_path / resume.LOCK_NAME).exists()


# -- the trainer around it (one process) ----------------------------------------------------------
def _trainer(run_dir, overrides=(), transport=None, **raw):
    raw = {"seed": 5, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": 16},
           "robust": {"aggregator": "mean"}, "train": {"steps": 6, "batch_size": 16, "eval_every_steps": 3},
           "checkpoint": {"every_steps": 3, "keep": 2}, **raw}
    conf, conf_data = train_config.parse(raw, overrides)
    return trainer.Trainer(conf, conf_data, run_dir, transport or LoopbackTransport(1))


def _args(resume_how="auto", reshard=False):
    return argparse.Namespace(resume=resume_how, resume_reshard=reshard)


def _run(t, args=None, signals=None):
    try:
        return trainer.run(t, args or _args(), signals or control.StopSignals())
    finally:
        t.lock.release()


def test_config_yaml_is_written_only_after_the_checkpoint_was_accepted(tmp_path, capfd):
    run_dir = tmp_path / "run"
    assert _run(_trainer(run_dir)) == trainer.EXIT_OK
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(resume.UsageError, match="refusing to resume.*optim.lr"):
        _run(_trainer(run_dir, ["optim.lr=0.5"]))
    assert (run_dir / "config.yaml").read_text() == before


def test_reshard_with_the_same_world_but_other_shards_reshards(tmp_path, capfd):
    """2 ranks, then 2 ranks with data.alpha changed (other shard sizes) and --resume-reshard."""
    run_dir = tmp_path / "run"

    def rank(overrides, args):
        def body(transport):
            t = _trainer(run_dir, overrides, transport=transport)
            return _run(t, args), t.step
        return body

    assert run_ranks(2, rank([], _args())) == [(trainer.EXIT_OK, 6)] * 2
    again = run_ranks(2, rank(["data.alpha=0.3", "train.steps=9"], _args(reshard=True)))
    assert again == [(trainer.EXIT_OK, 9)] * 2
    assert "resumed at step 6 (resharded)" in capfd.readouterr().out


def test_the_preemption_checkpoint_comes_before_a_due_evaluation(tmp_path, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    t = _trainer(run_dir)
    seen = []
    real = t.evaluate
    t.evaluate = lambda: (seen.append((t.step, checkpoint.path_for(run_dir / "checkpoints", t.step).exists())),
                          real())[1]
    signals = control.StopSignals()
    real_agree = control.agree

    def agree(transport, loss, stop, **kw):  # SIGUSR1 arrives during step 3, when an evaluation is due
        return real_agree(transport, loss, stop=stop or (t.step == 3), **kw)

    monkeypatch.setattr(control, "agree", agree)
    assert _run(t, signals=signals) == trainer.EXIT_PREEMPTED
    assert seen == [(3, True)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_data_loading_stops_cleanly_before_training(tmp_path, capfd, signum):
    """A real signal to this process while the data set loads: the handler is already installed,
    the run stops at the first agreement, exit 75, and the last checkpoint is untouched."""
    run_dir = tmp_path / "run"
    assert _run(_trainer(run_dir)) == trainer.EXIT_OK
    newest = checkpoint.listing(run_dir / "checkpoints")[-1][1]
    before = newest.read_bytes()
    t = _trainer(run_dir, ["train.steps=9"])
    real_load = t.load_data

    def load_data():
        os.kill(os.getpid(), signum)
        real_load()

    t.load_data = load_data
    signals = control.StopSignals().install()
    try:
        assert _run(t, signals=signals) == trainer.EXIT_PREEMPTED
    finally:
        signals.uninstall()
    assert "during set-up, before training" in capfd.readouterr().out
    assert checkpoint.listing(run_dir / "checkpoints")[-1][1] == newest and newest.read_bytes() == before
    assert not hasattr(t, "optimizer") or t.step == 0


def test_a_checkpoint_is_encoded_off_the_main_thread_from_a_snapshot(tmp_path, monkeypatch):
    """The step loop waits only for the copy to host memory: torch.save and the SHA-256 run in the
    writer's thread, on a snapshot that the next steps (parameters, momentum) do not change."""
    t = _trainer(tmp_path / "run", ["optim.momentum=0.9"])
    t.load_data()
    t.check_world()
    t.build()
    (t.run_dir / "checkpoints").mkdir(parents=True)
    t.train_step()
    t.step = 1
    model = {k: v.clone() for k, v in t.model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in t.optimizer.state.values()]
    release, threads = threading.Event(), []
    real_save = checkpoint.torch.save

    def save(obj, f):  # the main thread saves small messages (the ranks' state, weights-only)
        if threading.current_thread() is not threading.main_thread():
            threads.append(threading.current_thread().name)
            assert release.wait(30)
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    t.save_checkpoint(wait=False)
    with checkpoint.torch.no_grad():  # the loop goes on while the file is written
        for p in t.model.parameters():
            p.add_(1.0)
        for s in t.optimizer.state.values():
            s["momentum_buffer"].add_(1.0)
    release.set()
    t.writer.wait()
    saved = checkpoint.read(checkpoint.path_for(t.run_dir / "checkpoints", 1))
    assert threads == ["fa_hvd-checkpoint"]
    assert all(checkpoint.torch.equal(saved["model"][k], v) for k, v in model.items())
    assert all(checkpoint.torch.equal(a["momentum_buffer"], b)
               for a, b in zip(saved["optimizer"]["state"].values(), momentum))


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (/proc/PID/status, SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.slow
def test_fa_hvd_train_stops_cleanly_on_sigterm_as_soon_as_it_can_catch_it(tmp_path):
    """A real fa-hvd-train process gets SIGTERM the moment its handler exists (before the transport,
    the data and the model are set up): it ends with status 75, says so, and trains no step."""
    from conftest import ROOT, job_env
    from train_helpers import train_argv, write_config

    config = write_config(tmp_path / "c.yaml", seed=1, data={"name": "digits"}, model={"name": "mlp", "hidden": 16},
                          train={"steps": 50, "batch_size": 16})
    proc = subprocess.Popen(train_argv(config, tmp_path / "run"), cwd=ROOT, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == trainer.EXIT_PREEMPTED, out
    assert "stop requested (SIGTERM) during set-up, before training" in out, out
    run_dir = tmp_path / "run"
    assert not (run_dir / "metrics.jsonl").exists() and not checkpoint.listing(run_dir / "checkpoints")


def test_resume_path_to_an_older_step_then_auto_continues_the_new_line(tmp_path, capfd):
    """Steps 3, 6, 9 on disk; --resume PATH to step 3 with another learning rate writes a new step 6;
    the next --resume auto continues from that new step 6, not from the abandoned run's step 9."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    assert _run(_trainer(run_dir, ["train.steps=9"], checkpoint={"every_steps": 3, "keep": 3})) == trainer.EXIT_OK
    assert _steps(ckpts) == [3, 6, 9]
    new_line = ["train.steps=6", "optim.lr=0.2"]
    branch = _trainer(run_dir, new_line, checkpoint={"every_steps": 3, "keep": 3})
    assert _run(branch, _args(str(checkpoint.path_for(ckpts, 3)), reshard=True)) == trainer.EXIT_OK
    assert _steps(ckpts) == [3, 6]
    again = _trainer(run_dir, new_line, checkpoint={"every_steps": 3, "keep": 3})
    assert _run(again) == trainer.EXIT_OK
    out = capfd.readouterr().out
    assert f"resuming from {checkpoint.path_for(ckpts, 6)} (step 6)" in out and again.step == 6
    assert checkpoint.read(checkpoint.path_for(ckpts, 6))["config_hash"] == again.config_hash
    assert sorted(p.name for p in (ckpts / "set-aside").iterdir()) == ["step-000000006.ckpt", "step-000000009.ckpt"]
