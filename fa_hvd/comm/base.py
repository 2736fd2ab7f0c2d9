"""The transport interface: allgather (async), alltoall, broadcast and small allreduces, and
object messages built on them without pickle (:mod:`fa_hvd.comm.messages`).

Tensors are gathered along dim 0, so gathering a ``(1, n)`` row from each of
``size`` ranks gives ``(size, n)`` in rank order on every rank. Horovod has no
bfloat16 allgather, so callers send bf16 as fp32 or fp16.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import torch

from . import messages
from .rollcall import RollCall
from .traffic import SocketTraffic

TIMEOUT_ENV = "FA_HVD_COLLECTIVE_TIMEOUT_SECONDS"
STALL_SHUTDOWN_ENV = "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"
FIRST_NOTICE_SECONDS = 60.0  # Horovod's stall inspector warns after 60 s too
GATHER_ROW_BYTES = 1 << 20  # gather_bytes sends rows this wide: split counts in rows stay far below 2**31
_log = logging.getLogger("fa_hvd")


def fits(buffer: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``buffer``, kept across steps, has this ``shape``, ``dtype`` and ``device`` (else a new one is made)."""
    return buffer is not None and buffer.shape == shape and buffer.dtype == dtype and buffer.device == device


def collective_timeout(environ=os.environ) -> float | None:
    """Seconds a rank waits for a collective before giving up; ``None``: wait (the default).

    A rank that is busy (a rank-0 evaluation, a checkpoint) and one that hangs look
    the same to the others, so by default fa_hvd waits, as Horovod does, and a hung
    job is bounded by the batch system's time limit. ``FA_HVD_COLLECTIVE_TIMEOUT_SECONDS``
    bounds the wait (0 or unset: no bound); if it is unset but Horovod's
    ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` is set, the bound is that plus 30 s (Horovod's
    stall shutdown acts only under MPI: this is its backstop under Gloo).
    """
    if TIMEOUT_ENV in environ:
        value = _seconds(environ, TIMEOUT_ENV)
    elif STALL_SHUTDOWN_ENV in environ:
        value = _seconds(environ, STALL_SHUTDOWN_ENV)
        value = value + 30 if value > 0 else 0
    else:
        return None
    return value if value > 0 else None


def _seconds(environ, key: str) -> float:
    try:
        value = float(environ[key])
    except ValueError:
        raise ValueError(f"{key} must be a number of seconds, got {environ[key]!r}") from None
    if value < 0 or value != value:
        raise ValueError(f"{key} must be >= 0 seconds, got {environ[key]!r}")
    return value


def wait_until(done: Callable[[], bool], timeout: float | None, what: str,
               first_notice: float = FIRST_NOTICE_SECONDS, who: Callable[[], str | None] | None = None) -> None:
    """Poll ``done`` until it is true; raise ``TimeoutError`` past ``timeout`` (``None``: never).

    The sleep between polls grows from 10 us to 1 ms in the first second, then to
    10 ms. A wait longer than ``first_notice`` seconds is logged (naming ``what``),
    again at every doubling, so every waiting rank says what it waits for; ``who``
    (:meth:`Transport.stall_report`) adds to each notice and to the error which ranks
    do not answer, with their hosts.
    """
    if done():
        return
    start = time.monotonic()
    notice = first_notice
    pause = 1e-5
    while not done():
        waited = time.monotonic() - start
        if timeout is not None and waited > timeout:
            raise TimeoutError(f"{what}: no answer from every rank within {timeout:.0f} s{_who(who)} "
                               f"(a rank is hung or dead; {TIMEOUT_ENV} sets the limit)")
        if waited > notice:
            _log.warning("%s: still waiting after %.0f s%s (a rank is busy or hung; %s=SECONDS bounds the wait)",
                         what, waited, _who(who), TIMEOUT_ENV)
            notice *= 2
        time.sleep(pause)
        pause = min(2 * pause, 1e-3 if waited < 1 else 1e-2)


def _who(who: Callable[[], str | None] | None) -> str:
    text = who() if who is not None else None
    return f"; {text}" if text else ""


def channel_of(name: str) -> str:
    """The prepared name whose channel ``name`` uses: ``NAME`` for ``NAME#k``, else ``name`` itself."""
    return name.split("#", 1)[0]


class Handle:
    """An allgather in flight; :meth:`Transport.wait` returns its result."""


class Transport:
    """Collectives over a group of ranks.

    ``included``: whether this process belongs to the group (a Horovod process set
    need not hold every rank; ``rank`` is then -1). ``passthrough_errors`` are the
    exception types that must leave the optimizer unchanged (Horovod's elastic mode
    resets on them). ``refresh()`` re-reads rank and size after the group changed
    (an elastic reset) and says whether they did.
    """

    name = "transport"
    rank: int
    size: int
    local_rank: int
    included = True
    passthrough_errors: tuple[type[BaseException], ...] = ()
    lies = None  # fault injection: fa_hvd.faults.roles.RoleLies, asked what this rank's messages say
    timeout: float | None = None  # seconds a wait may last (fa_hvd.comm.base.collective_timeout)
    roll_call: RollCall | None = None  # once start_roll_call() ran: who answers when a wait stalls
    # wait() may run on another thread than allgather_async(), and collectives under a prepared name may be
    # started there (an exchange's worker: fa_hvd.exchange.base.Worker)
    waits_from_any_thread = False
    # allgathers started together that move one large gather fastest (the sharded exchange's aggregate:
    # fa_hvd.exchange.sharded.gather_bounds): measured for Gloo under torch.distributed, which moves 4 at once in
    # half the time of one; MPI keeps it unmeasured
    gather_pieces = 4

    def start_roll_call(self) -> None:
        """Collective: (re)start this rank's part of the roll call (:mod:`fa_hvd.comm.rollcall`),
        after which a stalled wait names the ranks that do not answer. Again after the world changed."""
        self.stop_roll_call()
        self.roll_call = RollCall(self)

    def stop_roll_call(self) -> None:
        """Stop answering the roll call and forget its roster."""
        if self.roll_call is not None:
            self.roll_call.close()
            self.roll_call = None

    def wait_for(self, done: Callable[[], bool], name: str) -> None:
        """:func:`wait_until` ``done`` (``self.timeout``) for collective ``name``; meanwhile the roll
        call tells the other ranks that this rank waits in ``name``."""
        call = self.roll_call
        if call is not None:
            call.waiting = name
        try:
            wait_until(done, self.timeout, f"fa_hvd: rank {self.rank}: {name!r}", who=self.stall_report)
        finally:
            if call is not None:
                call.waiting = ""

    def report_failure(self, name: str | None = None) -> None:
        """After the backend gave up on a peer (Gloo's timeout, a reset connection): log, once per
        roll call, who does not answer it (the others have left their waits). ``name``: the
        collective that failed, when this rank knows it."""
        call = self.roll_call
        if call is not None and not call.failure_reported:
            call.failure_reported = True
            _log.warning("fa_hvd: rank %d: %s failed in Horovod; %s", self.rank,
                         repr(name) if name else "a collective", call.report(where=False))

    def stall_report(self) -> str | None:
        """Who does not answer the roll call (``None`` before :meth:`start_roll_call`)."""
        return self.roll_call.report() if self.roll_call is not None else None

    def refresh(self) -> bool:
        return False

    def close(self) -> None:
        """Release what this transport set up, once every collective is done (the end of a
        program that owns it). Nothing to do unless the transport started the backend."""

    def prepare(self, names: list[str]) -> None:
        """Collective (every rank, same order): ``names`` will be gathered under, in any order
        relative to each other. Transports whose collectives must be ordered set up one
        channel per name here; ``NAME#k`` (:func:`channel_of`) goes on ``NAME``'s channel, so
        a family of collectives started in order by one thread shares one (Horovod needs a
        name of its own for each collective in flight)."""

    def has_channel(self, name: str) -> bool:
        """Whether collectives under ``name`` are matched among themselves, apart from every other
        name's, so one thread may start them while others start other names' (Horovod matches by
        name; the ordered transports once :meth:`prepare` gave ``name`` a channel)."""
        return True

    def abandon(self, handle: "Handle") -> None:
        """Forget an allgather in flight (its result will not be read)."""

    def allgather_async(self, tensor: torch.Tensor, name: str, out: torch.Tensor | None = None) -> Handle:
        """Start gathering every rank's ``tensor`` along dim 0. ``out``, a tensor of the gathered shape, dtype
        and device that the caller keeps across steps, receives the result (a transport may ignore it and
        return a tensor of its own): a fresh output's pages cost more than the transfer (18 ms for 45 MB on a
        2-core CPU)."""
        raise NotImplementedError

    def wait(self, handle: Handle) -> torch.Tensor:
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.wait(self.allgather_async(tensor, name) if out is None else self.allgather_async(tensor, name, out))

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        """Overwrite ``tensor`` in place with ``root``'s copy."""
        raise NotImplementedError

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (small tensors: counters, checks)."""
        raise NotImplementedError

    # -- object messages without pickle (:mod:`fa_hvd.comm.messages`) -------------------
    def allgather_bytes(self, data: bytes, name: str, limit: int = messages.MAX_MESSAGE_BYTES) -> list[bytes]:
        """Every rank's ``data``, in rank order: the lengths, then the bytes padded to the longest
        (two tensor allgathers of equal shapes, so every transport carries them). A length over
        ``limit`` raises :class:`~fa_hvd.comm.messages.MessageError` naming its rank, before
        anything of that size is allocated."""
        data, lengths = self._announce(data, name, limit)
        row = torch.zeros(1, max(1, *lengths), dtype=torch.uint8)
        _write_bytes(row, data)
        rows = self.allgather(row, name=name)
        return [bytes(rows[r, :length].numpy().tobytes()) for r, length in enumerate(lengths)]

    def _announce(self, data: bytes, name: str, limit: int) -> tuple[bytes, list[int]]:
        """This rank's ``data`` as it goes out (what fault injection makes of it) and every rank's length,
        each checked against ``limit`` on every rank alike (collective)."""
        if self.lies is not None:
            data = self.lies.message(data)
        lengths = self.allgather(torch.tensor([[len(data)]], dtype=torch.int64), name=f"{name}.lengths")
        lengths = lengths.reshape(-1).tolist()
        for sender, length in enumerate(lengths):
            messages.check_length(sender, length, limit, name)
        return data, lengths

    def gather_bytes(self, data: bytes, root: int, name: str,
                     limit: int = messages.MAX_MESSAGE_BYTES) -> list[bytes] | None:
        """Every rank's ``data`` on ``root``, in rank order (``None`` elsewhere): the lengths are
        allgathered and checked on every rank, as :meth:`allgather_bytes` does, then each rank's bytes
        travel to ``root`` alone (an alltoall of rows ``GATHER_ROW_BYTES`` wide, so no split count
        overflows), and no other rank holds more than its own."""
        data, lengths = self._announce(data, name, limit)
        width = max(1, min(max(lengths), GATHER_ROW_BYTES))
        rows = [-(-length // width) for length in lengths]
        mine = torch.zeros(rows[self.rank], width, dtype=torch.uint8)
        _write_bytes(mine, data)
        splits = [rows[self.rank] if r == root else 0 for r in range(self.size)]
        received = rows if self.rank == root else [0] * self.size
        got = self.wait(self.alltoall_async(mine, splits, name=name, received=received))
        if self.rank != root:
            return None
        starts = [sum(rows[:r]) for r in range(self.size)]
        return [bytes(got[start:start + count].reshape(-1)[:length].numpy().tobytes())
                for start, count, length in zip(starts, rows, lengths)]

    def allgather_json(self, obj, name: str, schema, limit: int = messages.MAX_MESSAGE_BYTES) -> list:
        """Every rank's JSON-able ``obj``, in rank order, each checked against ``schema``
        (:func:`~fa_hvd.comm.messages.check`); a malformed one raises naming its rank."""
        data = self.allgather_bytes(messages.encode_json(obj, limit), name, limit)
        return [messages.decode_json(d, schema, sender, name) for sender, d in enumerate(data)]

    def gather_state(self, state, root: int, name: str, limit: int | None = None) -> list | None:
        """Every rank's tensor ``state`` on ``root``, read back weights-only (``None`` elsewhere): a
        checkpoint's per-rank state without every rank holding ``p`` copies (:meth:`gather_bytes`). A
        malformed state raises :class:`~fa_hvd.comm.messages.MessageError` naming its sender on every
        rank alike: ``root`` reads them and broadcasts which one failed."""
        data = self.gather_bytes(messages.encode_state(state), root, name,
                                 messages.MAX_STATE_BYTES if limit is None else limit)
        states, failed, error = [], -1, None
        for sender, item in enumerate(data or []):
            try:
                states.append(messages.decode_state(item, sender, name))
            except messages.MessageError as exc:
                failed, error = sender, exc
                break
        failed = int(self.broadcast_(torch.tensor([failed], dtype=torch.int64), root, name=f"{name}.verdict"))
        if error is not None:
            raise error
        if failed >= 0:
            raise messages.MessageError(f"fa_hvd: rank {failed} sent a malformed {name} message (read by rank {root})")
        return states if data is not None else None

    def broadcast_state(self, state, root: int, name: str, limit: int | None = None):
        """``root``'s tensor ``state`` on every rank, read back weights-only (no code runs); at most
        ``limit`` bytes (default ``messages.MAX_STATE_BYTES``)."""
        data = messages.encode_state(state) if self.rank == root else b""
        length = self.broadcast_(torch.tensor([len(data)], dtype=torch.int64), root, name=f"{name}.length")
        messages.check_length(root, int(length), messages.MAX_STATE_BYTES if limit is None else limit, name)
        payload = torch.zeros(int(length), dtype=torch.uint8)
        if self.rank == root:
            _write_bytes(payload, data)
        payload = self.broadcast_(payload, root, name=name)
        return messages.decode_state(payload.numpy().tobytes(), root, name)

    # -- alltoall and traffic counters (the sharded exchange) ------------------------
    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str,
                       received: list[int] | None = None) -> Handle:
        """Send ``splits[r]`` rows of ``tensor`` (split along dim 0, in rank order) to rank ``r``.

        :meth:`wait` gives the rows every rank sent here, concatenated in rank order.
        ``received`` (rows from each rank), when the caller knows it, saves the
        transport from asking.
        """
        raise NotImplementedError

    @property
    def traffic(self) -> SocketTraffic:
        """This process's TCP byte counts (:mod:`fa_hvd.comm.traffic`), from the first use on."""
        if "_traffic" not in self.__dict__:
            self._traffic = SocketTraffic()
        return self._traffic

    @property
    def bytes_sent(self) -> int:
        """Bytes this process sent over TCP since :attr:`traffic` was first used (all of its traffic)."""
        return self.traffic.totals()[0]

    @property
    def bytes_received(self) -> int:
        """Bytes this process received over TCP since :attr:`traffic` was first used."""
        return self.traffic.totals()[1]


def _write_bytes(tensor: torch.Tensor, data: bytes) -> None:
    """``data`` into the start of the uint8 CPU ``tensor`` (contiguous, at least ``len(data)`` elements), with
    no copy of ``data`` on the way (a torch view of immutable bytes would need one)."""
    tensor.numpy().reshape(-1)[: len(data)] = np.frombuffer(data, dtype=np.uint8)


class NoCompression:
    """The wire format when no ``compression`` is given: tensors travel as they are."""

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


def wire_format(compression):
    """``compression`` (Horovod's ``hvd.Compression.none`` / ``.fp16``, or any object with ``compress(tensor)
    -> (tensor, ctx)`` and ``decompress(tensor, ctx)``), or :class:`NoCompression` for None; anything else is a
    ``ValueError`` here, not an ``AttributeError`` at the first step."""
    if compression is None:
        return NoCompression
    if not all(callable(getattr(compression, name, None)) for name in ("compress", "decompress")):
        raise ValueError(f"fa_hvd: compression must be hvd.Compression.none or hvd.Compression.fp16 (an object "
                         f"with compress and decompress), got {compression!r}")
    return compression
