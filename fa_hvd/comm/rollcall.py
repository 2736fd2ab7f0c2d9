"""Who answers when a collective stalls: a roll call over TCP, beside the transport.

A rank waiting for a collective cannot tell from the collective which rank is missing.
So every rank also listens on a TCP port of its own (a daemon thread that answers each
connection with one line: its rank and the collective it waits in, if any), and
:class:`RollCall` (collective) gathers every rank's host and port. When a wait stalls,
:meth:`RollCall.report` calls every other rank at once, with a short timeout each, and
names, with their hosts, the ranks that did not answer (a crashed node, a cut link, a
stopped process), those that answer but wait in no collective (busy or hung in their own
code) and those that wait in another one. Ranks on this rank's host are called on
127.0.0.1, the others by host name (as the launcher reaches them).
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

ANSWER_TIMEOUT_S = 2.0
MAX_CALLS_AT_ONCE = 64
MAX_ANSWER_BYTES = 1024


class RollCall:
    """This rank's listener and the roster of its world: every rank's [host, port].

    ``waiting``: the collective this rank waits in now ("" when none), set by
    :meth:`fa_hvd.comm.base.Transport.wait_for` and told to every caller."""

    def __init__(self, transport, timeout: float = ANSWER_TIMEOUT_S):
        """Collective over ``transport``: listen, then gather every rank's host and port."""
        self.rank, self.timeout, self.waiting = transport.rank, timeout, ""
        self.failure_reported = False  # Transport.report_failure: once per roster
        self._socket = socket.create_server(("0.0.0.0", 0), backlog=128)
        threading.Thread(target=self._answer, name="fa_hvd-rollcall", daemon=True).start()
        self.roster = transport.allgather_json([socket.gethostname(), self._socket.getsockname()[1]],
                                               name="fa_hvd.comm.rollcall", schema=(str, int))

    def close(self) -> None:
        """Stop answering (the listener's thread ends: shutdown wakes its accept, close alone does not)."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()

    def _answer(self) -> None:
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(f"{self.rank} {self.waiting}\n".encode()[:MAX_ANSWER_BYTES])
                except OSError:
                    pass

    def _call(self, rank: int) -> str | None:
        """What ``rank`` waits in ("" for nothing), or ``None`` if it did not answer as ``rank``."""
        host, port = self.roster[rank]
        here = host == self.roster[self.rank][0]
        try:
            with socket.create_connection(("127.0.0.1" if here else host, port), timeout=self.timeout) as conn:
                conn.settimeout(self.timeout)
                line = conn.makefile("rb").readline(MAX_ANSWER_BYTES).decode(errors="replace").rstrip("\n")
        except OSError:
            return None
        said, _, waiting = line.partition(" ")
        return waiting if said == str(rank) else None

    def answers(self) -> dict[int, str | None]:
        """Every other rank's answer: the collective it waits in ("": none), ``None``: no answer."""
        others = [r for r in range(len(self.roster)) if r != self.rank]
        if not others:
            return {}
        with ThreadPoolExecutor(max_workers=min(MAX_CALLS_AT_ONCE, len(others))) as pool:
            return dict(zip(others, pool.map(self._call, others)))

    def report(self, where: bool = True) -> str:
        """One clause for a stall message: who did not answer; with ``where``, who waits in no
        or another collective (after a failure the others have left their waits: ``where=False``)."""
        answers = self.answers()

        def named(ranks) -> str:
            return ", ".join(f"rank {r} ({self.roster[r][0]})" for r in ranks)

        missing = [r for r, a in answers.items() if a is None]
        idle = [r for r, a in answers.items() if a == ""]
        elsewhere = [r for r, a in answers.items() if a and a != self.waiting]
        parts = [f"no answer from {named(missing)}"] if missing else []
        if not where:
            return parts[0] if parts else "every other rank answers the roll call"
        if idle:
            parts.append(f"in no collective (busy or hung): {named(idle)}")
        parts += [f"{named([r])} waits in {answers[r]!r}" for r in elsewhere]
        return "; ".join(parts) or "every other rank answers the roll call and waits in this collective"
