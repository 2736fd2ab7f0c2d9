"""Checkpoint files: streamed, atomic, checksummed, pruned; and the random state of a process.

A checkpoint file is::

    FAHVD-CKPT 1\\n
    {"sha256": "...", "bytes": N, "step": S}<spaces to HEADER_BYTES>\\n
    <N bytes: torch.save of the state dict>

:func:`write` streams ``torch.save`` into a temporary file in the same directory
(``.step-*.ckpt.tmp-PID``) through a hashing writer, so no second copy of the
payload is ever held in memory; the header (fixed width) is written last, the
file fsync'ed and renamed over the final name (``os.replace``, atomic on POSIX),
then the directory fsync'ed, so a crash leaves either the old set of files or
the new one, never a half-written ``step-*.ckpt``. File systems that cannot
fsync a directory (some FUSE and parallel-FS mounts answer ``EINVAL``) get the
rename alone, and the process says so once per directory. A writer killed
mid-write leaves its temporary file behind: :func:`clean_temporaries` removes
them (the trainer does so at start, holding the run directory's lock).

:func:`verify` reads the file in chunks and checks header, length and SHA-256;
:func:`load` then unpickles it chunk by chunk straight from the file
(``torch.load(weights_only=True)``: tensors and plain data only). Any failure,
unpickling included, is a :class:`CorruptCheckpoint` saying what is wrong.

:func:`broadcast_file` and :func:`broadcast_bytes` send a file or a byte string
from one rank to the others in fixed-size uint8 tensor broadcasts (never one
object broadcast of the whole: Horovod's object size is an int32).

:class:`Writer` writes in a background thread a state already copied to host
memory (:func:`host_copy`), so the step loop waits only for that copy; a new
write waits for the previous one.

:func:`rng_state` / :func:`set_rng_state` capture and restore every random
generator a training process uses: Python's ``random``, NumPy's global
generator, torch's CPU generator and every CUDA device's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAGIC = b"FAHVD-CKPT 1\n"
HEADER_BYTES = 256  # the JSON header, padded with spaces; then "\n"
CHUNK = 64 << 20  # bytes per read, hash update and broadcast
NAME = re.compile(r"^step-(\d+)\.ckpt$")
TEMPORARY = re.compile(r"^\.step-\d+\.ckpt\.tmp-\d+$")
_NO_DIRECTORY_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR)


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is torn, truncated, altered or does not unpickle as tensors and plain data."""


@dataclass(frozen=True)
class Header:
    sha256: str
    bytes: int
    step: int
    offset: int  # where the payload starts in the file


def path_for(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.ckpt"


def _header_line(sha256: str, length: int, step: int) -> bytes:
    text = json.dumps({"sha256": sha256, "bytes": length, "step": step}).encode()
    return text.ljust(HEADER_BYTES) + b"\n"


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through."""

    def __init__(self, fh):
        self.fh, self.sha, self.count = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.count += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


class _Window(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable file of its own."""

    def __init__(self, fh, offset: int, length: int):
        self.fh, self.offset, self.length = fh, offset, length
        fh.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.fh.tell() - self.offset

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self.length}[whence]
        self.fh.seek(self.offset + base + pos)
        return base + pos

    def readinto(self, buffer) -> int:
        return self.fh.readinto(memoryview(buffer)[:max(0, self.length - self.tell())])


@contextlib.contextmanager
def _replacing(path: Path):
    """An open temporary file that replaces ``path`` (fsync, rename, fsync of the directory) when the
    block ends without an error; deleted if it raises."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_directory(path.parent)


def write(path: str | Path, state: dict, step: int) -> Header:
    """Stream ``state`` into the checkpoint file ``path`` (atomically: see the module docstring)."""
    with _replacing(Path(path)) as fh:
        fh.write(MAGIC + _header_line("", 0, step))
        payload = _HashingWriter(fh)
        torch.save(state, payload)
        header = Header(payload.sha.hexdigest(), payload.count, step, len(MAGIC) + HEADER_BYTES + 1)
        fh.seek(len(MAGIC))
        fh.write(_header_line(header.sha256, header.bytes, step))
    return header


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete."""
    with _replacing(Path(path)) as fh:
        fh.write(data)


_warned_directories: set[str] = set()


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; where the file system cannot fsync a directory,
    say so once (per directory) and rely on the rename alone."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            raise
        if str(directory) not in _warned_directories:
            _warned_directories.add(str(directory))
            print(f"fa_hvd: note: the file system of {directory} cannot fsync a directory ({exc.strerror}); "
                  f"checkpoints there rely on the rename alone", file=sys.stderr, flush=True)
    finally:
        os.close(fd)


def _read_header(fh, where: str) -> Header:
    head = fh.read(len(MAGIC) + HEADER_BYTES + 1)
    if not head.startswith(MAGIC):
        raise CorruptCheckpoint(f"{where}: not an fa_hvd checkpoint (bad header)")
    end = head.find(b"\n", len(MAGIC))
    try:
        header = json.loads(head[len(MAGIC):end])
        return Header(str(header["sha256"]), int(header["bytes"]), int(header.get("step", -1)), end + 1)
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"{where}: damaged header") from None


def verify(path: str | Path) -> Header:
    """The header of checkpoint ``path`` after checking its length and SHA-256, read in chunks."""
    where = str(path)
    try:
        with open(path, "rb") as fh:
            header = _read_header(fh, where)
            fh.seek(header.offset)
            sha, count = hashlib.sha256(), 0
            while chunk := fh.read(CHUNK):
                sha.update(chunk)
                count += len(chunk)
    except OSError as exc:
        raise CorruptCheckpoint(f"{where}: cannot be read: {exc}") from None
    if count != header.bytes:
        raise CorruptCheckpoint(f"{where}: torn: {count} of {header.bytes} payload bytes")
    if sha.hexdigest() != header.sha256:
        raise CorruptCheckpoint(f"{where}: checksum mismatch (the file was altered)")
    return header


def _unpickle(fh, where: str) -> dict:
    try:
        return torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means the file cannot be used
        raise CorruptCheckpoint(f"{where}: does not load as tensors and plain data: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def load(path: str | Path, header: Header) -> dict:
    """The state in ``path`` (already :func:`verify`'ed as ``header``), unpickled straight from the file."""
    try:
        with open(path, "rb") as fh:
            return _unpickle(_Window(fh, header.offset, header.bytes), str(path))
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: cannot be read: {exc}") from None


def read(path: str | Path) -> dict:
    return load(path, verify(path))


def dumps(state: dict) -> bytes:
    """``state`` as bytes (for :func:`broadcast_bytes`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def loads(data: bytes, where: str = "state") -> dict:
    return _unpickle(io.BytesIO(data), where)


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


def clean_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``directory``; returns them.
    Only for a directory no other process writes to (the caller holds the run's lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(directory / name for name in os.listdir(directory) if TEMPORARY.match(name))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def host_copy(obj):
    """``obj`` with every tensor copied to host memory (a snapshot the training loop may not change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


# -- sending a checkpoint to ranks that cannot read it ---------------------------------------------
def _broadcast_length(transport, length: int, root: int, name: str) -> int:
    return int(transport.broadcast_(torch.tensor([length], dtype=torch.int64), root, f"{name}.length")[0])


def broadcast_file(transport, path: Path | None, root: int, name: str, chunk: int | None = None) -> Path | None:
    """Collective: ``root`` sends the file ``path`` in ``chunk``-byte tensor broadcasts; every other
    rank writes it to a new temporary file (the caller deletes it) and returns its path; ``root``
    returns ``path``."""
    is_root, chunk = transport.rank == root, chunk or CHUNK
    length = _broadcast_length(transport, os.path.getsize(path) if is_root else 0, root, name)
    source = open(path, "rb") if is_root else tempfile.NamedTemporaryFile(prefix="fa_hvd-ckpt-", delete=False)
    with source as fh:
        for i, start in enumerate(range(0, length, chunk)):
            size = min(chunk, length - start)
            if is_root:
                piece = torch.frombuffer(bytearray(fh.read(size)), dtype=torch.uint8)
            else:
                piece = torch.empty(size, dtype=torch.uint8)
            transport.broadcast_(piece, root, f"{name}.{i}")
            if not is_root:
                fh.write(piece.numpy().tobytes())
        return Path(path) if is_root else Path(fh.name)


def broadcast_bytes(transport, data: bytes | None, root: int, name: str, chunk: int | None = None) -> bytes | bytearray:
    """Collective: ``root``'s ``data`` on every rank, in ``chunk``-byte tensor broadcasts."""
    is_root, chunk = transport.rank == root, chunk or CHUNK
    length = _broadcast_length(transport, len(data) if is_root else 0, root, name)
    out = bytearray(0 if is_root else length)
    for i, start in enumerate(range(0, length, chunk)):
        size = min(chunk, length - start)
        if is_root:
            piece = torch.frombuffer(bytearray(data[start:start + size]), dtype=torch.uint8)
        else:
            piece = torch.frombuffer(out, dtype=torch.uint8, offset=start, count=size)
        transport.broadcast_(piece, root, f"{name}.{i}")
    return data if is_root else out


class Writer:
    """Writes checkpoint files one at a time in a background thread, then prunes."""

    def __init__(self, keep: int):
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, state: dict, step: int) -> None:
        """Start writing ``state`` (a host copy nobody changes any more) to ``path``, after the
        previous write has finished."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(Path(path), state, step),
                                        name="fa_hvd-checkpoint", daemon=True)
        self._thread.start()

    def _write(self, path: Path, state: dict, step: int) -> None:
        try:
            write(path, state, step)
            prune(path.parent, self.keep)
        except BaseException as exc:  # reported by wait() in the training thread
            self._error = exc

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

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
