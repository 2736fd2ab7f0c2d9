"""Checkpoint files (atomic, checksummed, pruned), random state, metrics files, progress and plots."""

from __future__ import annotations

import io
import json
import math
import random
import threading

import numpy as np
import pytest
import torch

from fa_hvd import checkpoint, plot
from fa_hvd.train import metrics

STATE = {"step": 7, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"optim": {"lr": 0.1}},
         "ranks": [{"stream": {"position": 3, "shard_size": 10}}]}


def test_roundtrip_and_damage_is_named(tmp_path):
    path = checkpoint.path_for(tmp_path, 7)
    checkpoint.write_atomic(path, checkpoint.encode(STATE, 7))
    back = checkpoint.read(path)
    assert torch.equal(back["model"]["w"], STATE["model"]["w"]) and back["ranks"] == STATE["ranks"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000007.ckpt"]  # no temporary file left
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(checkpoint.CorruptCheckpoint, match="torn: .* of .* payload bytes"):
        checkpoint.read(path)
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="checksum mismatch"):
        checkpoint.read(path)
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(checkpoint.CorruptCheckpoint, match="not an fa_hvd checkpoint"):
        checkpoint.read(path)


class Evil:
    """Anything a weights-only load must refuse."""


def test_payload_is_tensors_and_plain_data_only(tmp_path):
    """weights_only loading: a checkpoint cannot carry arbitrary pickled objects."""
    data = checkpoint.encode({"x": Evil()}, 1)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        checkpoint.decode(data)


def test_newest_valid_skips_torn_files_and_prune_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        checkpoint.write_atomic(checkpoint.path_for(tmp_path, step), checkpoint.encode({"step": step}, step))
    newest = checkpoint.path_for(tmp_path, 30)
    newest.write_bytes(newest.read_bytes()[:50])
    path, state, problems = checkpoint.newest_valid(tmp_path)
    assert path == checkpoint.path_for(tmp_path, 20) and state["step"] == 20
    assert len(problems) == 1 and "step-000000030.ckpt" in problems[0] and "torn" in problems[0]
    assert [p.name for p in checkpoint.prune(tmp_path, 2)] == ["step-000000010.ckpt"]
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [20, 30]


def test_writer_writes_in_the_background_and_reports_failures(tmp_path):
    writer = checkpoint.Writer(keep=2)
    for step in (1, 2, 3):
        writer.submit(checkpoint.path_for(tmp_path, step), checkpoint.encode({"step": step}, step))
    writer.wait()
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [2, 3]
    writer.submit(tmp_path / "no-such-dir" / "step-000000004.ckpt", b"x")
    with pytest.raises(RuntimeError, match="writing a checkpoint failed"):
        writer.wait()


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """The write goes to a temporary file; the final name appears only by rename."""
    path = checkpoint.path_for(tmp_path, 5)
    checkpoint.write_atomic(path, checkpoint.encode({"step": 5, "v": 1}, 5))
    started, release = threading.Event(), threading.Event()
    real_fsync = checkpoint.os.fsync

    def slow_fsync(fd):
        started.set()
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", slow_fsync)
    thread = threading.Thread(target=checkpoint.write_atomic, args=(path, checkpoint.encode({"step": 5, "v": 2}, 5)))
    thread.start()
    started.wait(5)
    assert checkpoint.read(path)["v"] == 1  # mid-write, the old content is what a reader sees
    release.set()
    thread.join()
    assert checkpoint.read(path)["v"] == 2


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    saved = checkpoint.decode(checkpoint.encode({"rng": checkpoint.rng_state()}, 0))["rng"]
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(saved)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == first


def test_metrics_log_cuts_back_to_the_resumed_step(tmp_path):
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", None)
    for step in range(1, 8):
        log.write({"kind": "step", "step": step, "loss": float("nan") if step == 7 else 1.0 / step})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "step", "st')  # torn by a kill
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[6])["loss"] == "nan"
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", 4)
    assert [r["step"] for r in metrics.read(tmp_path)] == [1, 2, 3, 4]
    log.write({"kind": "step", "step": 5})
    log.rewind(2)
    log.write({"kind": "step", "step": 3})
    log.close()
    assert [r["step"] for r in metrics.read(tmp_path)] == [1, 2, 3]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_lines_otherwise():
    bar = metrics.Progress(100, 0, "auto", stream=_Terminal())
    bar.step(50, 2.5, 0.25, 1000.0)
    bar.evaluation(50, 2.5, 0.3, 0.9)
    bar.step(51, 2.55, 0.2, 1000.0)
    bar.close()
    text = bar.stream.getvalue()
    assert text.startswith("\r[############............] step 50/100  epoch 2.50  loss 0.2500")
    assert "ETA 0:00:0" in text and "\neval at step 50" in text and "acc 0.900" in text and text.endswith("\n")
    lines = metrics.Progress(100, 0, "auto", every=25, stream=io.StringIO())
    for step in range(1, 101):
        lines.step(step, step / 10, 1.0, 10.0)
    assert [line.split()[1] for line in lines.stream.getvalue().splitlines()] == ["25/100", "50/100", "75/100",
                                                                                  "100/100"]


def test_plot_draws_several_runs(tmp_path, capsys):
    for name, losses in (("a", [2.0, 1.0, 0.5]), ("b", [2.0, float("inf"), float("nan")])):
        run = tmp_path / name
        run.mkdir()
        log = metrics.MetricsLog(run / "metrics.jsonl", None)
        for step, loss in enumerate(losses, 1):
            log.write({"kind": "step", "step": step, "epoch": step / 3, "loss": loss})
        log.write({"kind": "eval", "step": 3, "epoch": 1.0, "test_loss": 0.4, "test_accuracy": 0.8})
        log.close()
    losses = plot.curves(tmp_path / "b")[1]
    assert losses[:2] == [2.0, float("inf")] and math.isnan(losses[2])
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.png")
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path)])
    assert "no metrics.jsonl" in capsys.readouterr().err
