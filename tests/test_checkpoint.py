"""Checkpoint files (atomic, checksummed, pruned), random state, metrics files, progress and plots."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from fa_hvd import checkpoint, plot
from fa_hvd.train import metrics
from local_world import run_ranks

STATE = {"step": 7, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"optim": {"lr": 0.1}},
         "ranks": [{"stream": {"position": 3, "shard_size": 10}}]}


def test_roundtrip_and_damage_is_named(tmp_path):
    path = checkpoint.path_for(tmp_path, 7)
    checkpoint.write(path, STATE, 7)
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


def test_a_file_that_passes_its_checksum_but_not_weights_only_loading_is_corrupt(tmp_path):
    """weights_only loading: a checkpoint cannot carry arbitrary pickled objects, and one that tries
    is a CorruptCheckpoint like any other damage (so the resume falls back or refuses)."""
    path = checkpoint.path_for(tmp_path, 1)
    checkpoint.write(path, {"x": Evil()}, 1)
    assert checkpoint.verify(path).step == 1  # length and SHA-256 are fine
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does not load as tensors and plain data"):
        checkpoint.read(path)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does not load as tensors and plain data"):
        checkpoint.loads(checkpoint.dumps({"x": Evil()}))


def test_prune_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        checkpoint.write(checkpoint.path_for(tmp_path, step), {"step": step}, step)
    assert [p.name for p in checkpoint.prune(tmp_path, 2)] == ["step-000000010.ckpt"]
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [20, 30]


def test_writer_writes_in_the_background_and_reports_failures(tmp_path):
    writer = checkpoint.Writer(keep=2)
    for step in (1, 2, 3):
        writer.submit(checkpoint.path_for(tmp_path, step), {"step": step}, step)
    writer.wait()
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [2, 3]
    writer.submit(tmp_path / "no-such-dir" / "step-000000004.ckpt", {"step": 4}, 4)
    with pytest.raises(RuntimeError, match="writing a checkpoint failed"):
        writer.wait()


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """The write goes to a temporary file; the final name appears only by rename."""
    path = checkpoint.path_for(tmp_path, 5)
    checkpoint.write(path, {"step": 5, "v": 1}, 5)
    started, release = threading.Event(), threading.Event()
    released = []  # whether each held fsync was released by the test, not by its wait's (hang guard) timeout
    real_fsync = checkpoint.os.fsync

    def slow_fsync(fd):
        started.set()
        released.append(release.wait(60))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", slow_fsync)
    thread = threading.Thread(target=checkpoint.write, args=(path, {"step": 5, "v": 2}, 5))
    thread.start()
    try:
        assert started.wait(60), "the writer never reached its fsync"
        assert checkpoint.read(path)["v"] == 1  # mid-write, the old content is what a reader sees
    finally:
        release.set()
        thread.join()
    assert released and all(released), released
    assert checkpoint.read(path)["v"] == 2


def test_directory_fsync_einval_degrades_and_says_so_once(tmp_path, monkeypatch, capsys):
    """Some FUSE and parallel-FS mounts cannot fsync a directory: the checkpoint is still written."""
    real_fsync = checkpoint.os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    for step in (1, 2):
        checkpoint.write(checkpoint.path_for(tmp_path, step), {"step": step}, step)
    assert [checkpoint.read(p)["step"] for _, p in checkpoint.listing(tmp_path)] == [1, 2]
    err = capsys.readouterr().err
    assert err.count("cannot fsync a directory") == 1 and str(tmp_path) in err


WRITER = """
import sys, torch
from fa_hvd import checkpoint
state = {f"t{i}": torch.full((1 << 21,), float(i)) for i in range(int(sys.argv[2]))}  # 8 MiB each
checkpoint.write(sys.argv[1], state, 3)
"""


def test_a_writer_killed_mid_write_leaves_a_temporary_that_the_next_start_cleans(tmp_path):
    """A real kill -9 in the middle of torch.save: the final name never appears, the temporary
    stays behind, and clean_temporaries (run at start, under the run's lock) deletes it."""
    path = checkpoint.path_for(tmp_path, 3)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "48"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".step-") and p.stat().st_size > (32 << 20) for p in tmp_path.iterdir()):
            assert writer.poll() is None and time.monotonic() < deadline, "the writer ended before it was killed"
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    finally:
        if writer.poll() is None:
            writer.kill()
    left = [p.name for p in tmp_path.iterdir()]
    assert left == [f".{path.name}.tmp-{writer.pid}"] and not path.exists()
    assert [p.name for p in checkpoint.clean_temporaries(tmp_path)] == left
    assert list(tmp_path.iterdir()) == []


def test_files_and_bytes_travel_in_chunks_of_tensor_broadcasts(tmp_path):
    """broadcast_file / broadcast_bytes: many fixed-size uint8 broadcasts, never one object."""
    data = bytes(random.Random(1).randrange(256) for _ in range(10_000))
    source = tmp_path / "source"
    source.write_bytes(data)

    def rank(transport):
        got = checkpoint.broadcast_file(transport, source if transport.rank == 0 else None, 0, "f", chunk=999)
        received = got.read_bytes()
        if got != source:
            got.unlink()
        return received, bytes(checkpoint.broadcast_bytes(transport, data if transport.rank == 0 else None, 0,
                                                          "b", chunk=4096)), transport.calls

    results = run_ranks(3, rank)
    assert all(f == data and b == data for f, b, _ in results)
    calls = results[1][2]
    assert [kind for kind, _ in calls] == ["broadcast"] * (1 + 11 + 1 + 3)


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    saved = checkpoint.loads(checkpoint.dumps({"rng": checkpoint.rng_state()}))["rng"]
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
        log.write({"kind": "step", "step": 4})  # hand-made records without the figures drawn
        log.write({"kind": "eval", "step": 4})
        log.close()
    steps, losses, eval_steps, accuracies = plot.curves(tmp_path / "b")
    assert steps == [1, 2, 3] and losses[:2] == [2.0, float("inf")] and math.isnan(losses[2])
    assert eval_steps == [3] and accuracies == [0.8]
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.png")
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path)])
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_files_written_before_the_fixed_width_header_still_read(tmp_path):
    """The earlier writer put the JSON header unpadded before the payload; the reader takes both."""
    payload = checkpoint.dumps(STATE)
    header = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload), "step": 7}
    path = checkpoint.path_for(tmp_path, 7)
    path.write_bytes(checkpoint.MAGIC + json.dumps(header).encode() + b"\n" + payload)
    assert checkpoint.verify(path).step == 7
    assert torch.equal(checkpoint.read(path)["model"]["w"], STATE["model"]["w"])
