"""Checkpoint files: atomic, checksummed, pruned; and the random state of a process.

A checkpoint file is::

    FAHVD-CKPT 1\\n
    {"sha256": "...", "bytes": N, "step": S}\\n
    <N bytes: torch.save of the state dict>

written as a temporary file in the same directory, flushed and fsync'ed, renamed
over the final name (``os.replace``, atomic on POSIX) and followed by an fsync of
the directory, so a crash leaves either the old set of files or the new one,
never a half-written ``step-*.ckpt``. :func:`read` checks the header, the length
and the SHA-256 before unpickling (``torch.load(weights_only=True)``: tensors and
plain data only), and raises :class:`CorruptCheckpoint` saying what is wrong.

:class:`Writer` writes in a background thread, so the other ranks wait for a
checkpoint no longer than it takes to copy the state to host memory; a new write
waits for the previous one.

:func:`rng_state` / :func:`set_rng_state` capture and restore every random
generator a training process uses: Python's ``random``, NumPy's global
generator, torch's CPU generator and every CUDA device's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import threading
from pathlib import Path

import numpy as np
import torch

MAGIC = b"FAHVD-CKPT 1\n"
NAME = re.compile(r"^step-(\d+)\.ckpt$")


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is torn, truncated or altered."""


def path_for(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.ckpt"


def encode(state: dict, step: int) -> bytes:
    """The bytes of a checkpoint file holding ``state``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload), "step": step}
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


def decode(data: bytes, where: str = "checkpoint") -> dict:
    """The state held in checkpoint bytes ``data``; :class:`CorruptCheckpoint` if they are damaged."""
    if not data.startswith(MAGIC):
        raise CorruptCheckpoint(f"{where}: not an fa_hvd checkpoint (bad header)")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):end])
        expected, length = header["sha256"], int(header["bytes"])
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"{where}: damaged header") from None
    payload = data[end + 1:]
    if len(payload) != length:
        raise CorruptCheckpoint(f"{where}: torn: {len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CorruptCheckpoint(f"{where}: checksum mismatch (the file was altered)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def read(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: cannot be read: {exc}") from None
    return decode(data, str(path))


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listing(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory) if (m := NAME.match(name))]
    return sorted(found)


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths."""
    old = [path for _, path in listing(directory)[:-keep]] if keep > 0 else []
    for path in old:
        path.unlink(missing_ok=True)
    return old


def newest_valid(directory: str | Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint in ``directory`` that reads back intact.

    Returns ``(path, state, problems)``: ``problems`` describes each newer file
    that was skipped (torn, truncated, altered). ``(None, None, problems)`` when
    there is none.
    """
    problems = []
    for _, path in reversed(listing(directory)):
        try:
            return path, read(path), problems
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
    return None, None, problems


class Writer:
    """Writes checkpoint files one at a time in a background thread, then prunes."""

    def __init__(self, keep: int):
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, data: bytes) -> None:
        """Start writing ``data`` to ``path`` (after the previous write has finished)."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(Path(path), data), name="fa_hvd-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
            prune(path.parent, self.keep)
        except BaseException as exc:  # reported by wait() in the training thread
            self._error = exc

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error


def rng_state() -> dict:
    """Every random generator of this process, as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generators captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
