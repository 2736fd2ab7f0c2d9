"""Where a run resumes from, whether it may, what happens to the other checkpoints, and who may
write the run directory: one home for the plain loop (:mod:`~fa_hvd.train.trainer`) and elastic
mode (:mod:`~fa_hvd.train.elastic`).

:class:`RunLock`: rank 0 holds ``<run dir>/fa-hvd-train.lock`` (host, pid and the pid's start
time, the SLURM job id and restart count) for the whole run. A second run of the same directory
is refused, naming the first one's host and pid; a lock whose process is gone (same host, no
such pid or another process under that pid; or an earlier start of this requeued SLURM job,
wherever it ran) is stale and taken over, saying so. Any other lock from another host cannot be
checked and is never taken over. Under elastic, a rank that becomes rank 0 (the old one lost with
its node) takes its own run's lock over (:meth:`RunLock.take_over`) and releases it at the end.

:func:`choose` (collective, every rank at once) picks the checkpoint:

* ``never``: the run directory's checkpoints are deleted, the run starts at step 0;
* ``auto``: the newest file first, then older ones; ``PATH``: that file only;
* rank 0 checks each candidate's length and SHA-256 (:func:`fa_hvd.checkpoint.verify`) and
  announces its digest; every rank that sees the same file with the same digest loads it from
  the (shared) file system, and if any rank does not, rank 0 sends the file to every rank in
  fixed-size tensor broadcasts (:func:`fa_hvd.checkpoint.broadcast_file`);
* every rank unpickles it and checks that it is compatible with this run (:func:`check_compatible`);
  the ranks then agree: a file damaged anywhere (torn, altered, not loadable as tensors and plain
  data) makes every rank try the previous file (``auto``) or refuse (``PATH``) together; an
  incompatible one is refused on every rank.

Once the run resumes from step S, the checkpoints above S (an abandoned line of work: a resume
from an older PATH, or files written after the chosen one) and the damaged ones are moved to
``checkpoints/set-aside/``, never deleted, and the run says so; pruning after each new write
(``checkpoint.keep``) therefore only ever counts files of the current line. ``config.yaml`` is
written after the checkpoint was accepted, so it always describes the run that is going on.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
import yaml

from fa_hvd import checkpoint
from fa_hvd.comm.messages import Optional
from fa_hvd.config import differences
from fa_hvd.train import config as train_config

CHECKPOINT_FORMAT = 1
LOCK_NAME = "fa-hvd-train.lock"
SET_ASIDE = "set-aside"


class UsageError(Exception):
    """Bad config or input: exit status 2, reported before any rank trains."""


# -- the run directory's lock ---------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` on this host (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


class RunLock:
    """Exclusive use of a run directory by one run (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                   "job": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}
        self.held = False

    def acquire(self) -> list[str]:
        """Take the lock; returns notes for the user. :class:`UsageError` if another run holds it."""
        notes: list[str] = []
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder == self.me:
                    self.held = True
                    return notes
                if not self._stale(holder):
                    raise UsageError(
                        f"run directory {self.path.parent} is in use by another fa-hvd-train run: host "
                        f"{holder.get('host')}, pid {holder.get('pid')} (lock {self.path}, since "
                        f"{holder.get('since', '?')}); give this run its own --run-dir, or remove the lock "
                        f"if that run is gone") from None
                self.path.unlink(missing_ok=True)
                notes.append(f"removed a stale lock of pid {holder.get('pid')} on {holder.get('host')} "
                             f"(that process is gone) from {self.path}")
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._record(), fh)
            self.held = True
            return notes
        raise UsageError(f"cannot take the lock {self.path}: another run keeps creating it")

    def take_over(self) -> None:
        """Hold this run's lock from this process on: an elastic run whose rank 0 was lost goes on
        under a new rank 0. The lost one, if it comes back, leaves the lock alone (:meth:`release`)."""
        if self.held:
            return
        spare = self.path.with_name(f"{LOCK_NAME}.{self.me['host']}.{self.me['pid']}")
        spare.write_text(json.dumps(self._record()))
        os.replace(spare, self.path)
        self.held = True

    def _record(self) -> dict:
        return {**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        since = holder.pop("since", None)
        if holder != self.me and since is not None:
            holder["since"] = since
        return holder

    def _stale(self, holder: dict) -> bool:
        """Whether the lock's process is gone: decidable on its own host, or when it was an earlier
        start of this same SLURM job (a requeued job keeps its id; SLURM ended the earlier start).
        An unreadable lock (a writer killed between creating and filling it) is stale."""
        if not holder:
            return True
        if self.me["job"] and holder.get("job") == self.me["job"] and holder.get("restart") != self.me["restart"]:
            return True
        if holder.get("host") != self.me["host"] or not isinstance(holder.get("pid"), int):
            return False
        start = _process_start(holder["pid"])
        return start is None or (start != "" and holder.get("start") not in (None, start))

    def release(self) -> None:
        if self.held:
            if {k: v for k, v in self._holder().items() if k != "since"} == self.me:
                self.path.unlink(missing_ok=True)
            self.held = False


# -- compatibility ----------------------------------------------------------------------------------
def check_compatible(state: dict, conf, conf_data: dict, config_hash: str, world: int, path, reshard: bool) -> None:
    """:class:`UsageError` unless a run of ``conf`` on ``world`` ranks may continue from ``state``."""
    problems = []
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: checkpoint format {state.get('format')!r}, this trainer reads {CHECKPOINT_FORMAT}")
    if state["model_name"] != conf.model.name:
        raise UsageError(f"{path}: the checkpoint is of model {state['model_name']!r}, the config builds "
                         f"{conf.model.name!r}")
    if state["world_size"] != world and not conf.elastic.enabled:
        problems.append(f"it was written by {state['world_size']} ranks, this run has {world}")
    if state["config_hash"] != config_hash:
        changed = differences(train_config.identity(state["config"]), train_config.identity(conf_data))
        problems.append(f"its config (hash {state['config_hash']}) differs from this one ({config_hash}): "
                        + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
    if problems and not reshard:
        raise UsageError(f"{path}: refusing to resume: " + "; ".join(problems) + " (pass --resume-reshard to "
                         "continue anyway, or --resume never to start over)")


def resharded(state: dict, world: int, config_hash: str) -> bool:
    """Whether resuming ``state`` rebuilds shards and streams (another world or config) instead of
    restoring each rank's own position exactly."""
    ranks = state.get("ranks")
    return ranks is None or len(ranks) != world or state["config_hash"] != config_hash


# -- choosing the checkpoint (collective) ---------------------------------------------------------
def _set_aside(directory: Path, paths: list[Path]) -> list[str]:
    """Move ``paths`` to ``directory/set-aside`` (a name already taken gets a numeric suffix)."""
    if not paths:
        return []
    target = directory / SET_ASIDE
    target.mkdir(exist_ok=True)
    moved = []
    for path in paths:
        dest, n = target / path.name, 0
        while dest.exists():
            n += 1
            dest = target / f"{path.name}.{n}"
        os.replace(path, dest)
        moved.append(dest.name)
    checkpoint.fsync_directory(directory)
    return moved


def _candidates(directory: Path, how: str) -> tuple[list[Path], list[str]]:
    """Rank 0: the files to try, newest first, and notes."""
    if how == "never":
        removed = [path for _, path in checkpoint.listing(directory)]
        for path in removed:
            path.unlink()
        return [], [f"--resume never: deleted {len(removed)} old checkpoint(s) in {directory}"] if removed else []
    if how == "auto":
        return [path for _, path in reversed(checkpoint.listing(directory))], []
    if not Path(how).is_file():
        raise UsageError(f"--resume {how}: no such checkpoint file")
    return [Path(how)], []


def _load_everywhere(transport, path: Path, header: checkpoint.Header | None) -> dict:
    """Collective: every rank's copy of the checkpoint rank 0 verified as ``header``; a rank that
    does not see the same file (digest) gets it from rank 0 by broadcast."""
    mine = None
    if transport.rank != 0:
        try:
            mine = checkpoint.verify(path)
        except checkpoint.CorruptCheckpoint:
            pass
    missing = transport.allreduce_sum(
        torch.tensor([float(transport.rank != 0 and mine != header)]), name="fa_hvd.resume.missing")
    if not float(missing[0]):
        return checkpoint.load(path, header)
    local = checkpoint.broadcast_file(transport, path if transport.rank == 0 else None, 0, "fa_hvd.resume.file")
    try:
        if transport.rank != 0:
            local_header = checkpoint.verify(local)
            if local_header.sha256 != header.sha256:
                raise checkpoint.CorruptCheckpoint(f"{path}: the copy rank 0 sent arrived damaged")
        return checkpoint.load(local, header)
    finally:
        if local != path:
            local.unlink(missing_ok=True)


def choose(transport, run_dir: Path, how: str, compatible, lock: RunLock | None) -> tuple[dict | None, list[str]]:
    """Collective: the state every rank resumes from (None: start at step 0) and rank 0's notes
    for the user; :class:`UsageError` on every rank at once if the run may not go on.
    ``compatible(state, path)`` raises :class:`UsageError` for a checkpoint this run cannot take;
    rank 0 takes ``lock`` first."""
    directory = Path(run_dir) / "checkpoints"
    error, candidates, notes = None, [], []
    if transport.rank == 0:
        try:
            notes = prepare(run_dir, lock)
            candidates, more = _candidates(directory, how)
            notes += more
        except (UsageError, OSError) as exc:
            error = str(exc)
    error, names = transport.broadcast_state((error, [str(p) for p in candidates]) if transport.rank == 0
                                             else None, 0, name="fa_hvd.resume.candidates")
    if error is not None:
        raise UsageError(error)
    damaged = []
    for name in names:
        path = Path(name)
        header, problem = None, None
        if transport.rank == 0:
            try:
                header = checkpoint.verify(path)
            except checkpoint.CorruptCheckpoint as exc:
                problem = str(exc)
        announced = transport.broadcast_state(
            (problem, header and [header.sha256, header.bytes, header.step, header.offset])
            if transport.rank == 0 else None, 0, name="fa_hvd.resume.header")
        problem, fields = announced
        state, refusal = None, None
        if problem is None:
            try:
                state = _load_everywhere(transport, path, checkpoint.Header(*fields))
                compatible(state, path)
            except checkpoint.CorruptCheckpoint as exc:
                problem, state = f"rank {transport.rank}: {exc}" if transport.rank else str(exc), None
            except UsageError as exc:
                refusal = str(exc)
        verdicts = transport.allgather_json([problem, refusal], name="fa_hvd.resume.verdict",
                                            schema=(Optional(str), Optional(str)))
        refusals = [r for _, r in verdicts if r is not None]
        problems = [p for p, _ in verdicts if p is not None]
        if refusals:
            raise UsageError(refusals[0])
        if not problems:
            if transport.rank == 0:
                notes.append(f"resuming from {path} (step {state['step']})")
                notes += _set_aside_notes(directory, damaged, int(state["step"]))
            return state, notes
        if how != "auto":
            raise UsageError(f"--resume {how}: " + "; ".join(problems))
        notes.append(f"skipping checkpoint {'; '.join(problems)}; trying the previous one")
        if verdicts[0][0] is not None:  # damaged as rank 0 sees it: not just one rank's view
            damaged.append(path)
    if transport.rank == 0 and names:
        notes.append("no valid checkpoint left: starting from step 0")
        notes += _set_aside_notes(directory, damaged, 0)
    return None, notes


def _set_aside_notes(directory: Path, damaged: list[Path], step: int) -> list[str]:
    """Rank 0: set aside the damaged files and those above ``step`` in the run's own directory."""
    above = [path for s, path in checkpoint.listing(directory) if s > step and path not in damaged]
    notes = []
    moved = _set_aside(directory, [p for p in damaged if p.parent == directory] + above)
    if moved:
        notes.append(f"set aside (not deleted) in {directory / SET_ASIDE}: " + ", ".join(moved)
                     + f" (damaged, or above the resumed step {step}: a new line of work starts here)")
    return notes


def write_config(run_dir: Path, conf_data: dict, config_hash: str) -> None:
    """Rank 0, once the checkpoint (if any) was accepted: config.yaml, the resolved config and its hash."""
    text = f"# resolved config of this run; config_hash: {config_hash}\n"
    text += yaml.safe_dump(conf_data, sort_keys=False)
    checkpoint.write_atomic(Path(run_dir) / "config.yaml", text.encode())


def prepare(run_dir: Path, lock: RunLock) -> list[str]:
    """Rank 0, before choosing: the run directory, its lock, and no temporaries of killed writers."""
    directory = Path(run_dir) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    notes = lock.acquire()
    stale = checkpoint.clean_temporaries(directory)
    if stale:
        notes.append(f"deleted {len(stale)} temporary file(s) of an interrupted checkpoint write in {directory}: "
                     + ", ".join(p.name for p in stale))
    return notes
