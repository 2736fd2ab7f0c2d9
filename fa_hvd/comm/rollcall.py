"""Who answers when a collective stalls: a roll call over TCP, beside the transport.

A rank waiting for a collective cannot tell from the collective which rank is missing.
So every rank also listens on a TCP port of its own (a daemon thread that answers each
connection with one line: its rank), and :class:`RollCall` (collective) gathers every
rank's host and port. When a wait stalls, :meth:`RollCall.absent` calls every other rank
at once, with a short timeout each, and names those that did not answer, with their hosts:
a crashed node, a cut link, a stopped process. A rank that answers is alive: busy, or
waiting elsewhere. Ranks on this rank's host are called on 127.0.0.1, the others by host
name (as the launcher reaches them).
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

ANSWER_TIMEOUT_S = 2.0
MAX_CALLS_AT_ONCE = 64


class RollCall:
    """This rank's listener and the roster of its world: every rank's [host, port]."""

    def __init__(self, transport, timeout: float = ANSWER_TIMEOUT_S):
        """Collective over ``transport``: listen, then gather every rank's host and port."""
        self.rank, self.timeout = transport.rank, timeout
        self._socket = socket.create_server(("0.0.0.0", 0), backlog=128)
        threading.Thread(target=_answer, args=(self._socket, self.rank), name="fa_hvd-rollcall", daemon=True).start()
        self.roster = transport.allgather_json([socket.gethostname(), self._socket.getsockname()[1]],
                                               name="fa_hvd.comm.rollcall", schema=(str, int))

    def close(self) -> None:
        """Stop answering (the listener's thread ends: shutdown wakes its accept, close alone does not)."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()

    def _answers(self, rank: int) -> bool:
        host, port = self.roster[rank]
        here = host == self.roster[self.rank][0]
        try:
            with socket.create_connection(("127.0.0.1" if here else host, port), timeout=self.timeout) as conn:
                conn.settimeout(self.timeout)
                return conn.makefile("rb").readline().strip() == str(rank).encode()
        except OSError:
            return False

    def absent(self) -> list[tuple[int, str]]:
        """(rank, host) of every other rank that does not answer within the timeout."""
        others = [r for r in range(len(self.roster)) if r != self.rank]
        if not others:
            return []
        with ThreadPoolExecutor(max_workers=min(MAX_CALLS_AT_ONCE, len(others))) as pool:
            answered = list(pool.map(self._answers, others))
        return [(r, self.roster[r][0]) for r, ok in zip(others, answered) if not ok]

    def report(self) -> str:
        """One clause for a stall message: who did not answer the roll call."""
        missing = self.absent()
        if not missing:
            return "every other rank answers the roll call (a rank is busy, or waits in another collective)"
        return "no answer from " + ", ".join(f"rank {r} ({host})" for r, host in missing)


def _answer(server: socket.socket, rank: int) -> None:
    """Answer each connection with ``rank``, until ``server`` is closed."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(f"{rank}\n".encode())
            except OSError:
                pass
