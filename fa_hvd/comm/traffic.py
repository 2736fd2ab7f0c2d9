"""Bytes a process really moved over the network, as the kernel counted them.

:class:`SocketTraffic` reads, for every TCP socket the process holds, the
kernel's own per-connection counters (``getsockopt(TCP_INFO)``:
``tcpi_bytes_sent - tcpi_bytes_retrans``, or ``tcpi_bytes_acked`` on kernels
before 4.19, and ``tcpi_bytes_received``): payload bytes handed to and taken
from the wire, without TCP/IP headers and without retransmissions (a loaded
host retransmits on loopback too: up to a tenth of an exchange has been seen,
which says nothing about what the exchange sends). They count
everything the process exchanged over TCP: the gradients, the small collectives,
Horovod's negotiation between ranks, whatever thread sent it.

What it cannot see: transfers that never touch a TCP socket, such as Open MPI's
shared-memory transport between ranks on one node (``vader``/``sm``; launch with
``--mca btl tcp,self`` to route them over TCP), RDMA (InfiniBand verbs, UCX) and
NCCL's GPU transports. Gloo (Horovod's default on CPU) always uses TCP. Sockets
opened and closed between two readings are missed; Horovod and MPI keep theirs
open for the whole job.
"""

from __future__ import annotations

import os
import socket
import struct

_TCP_INFO_BYTES_ACKED = 120  # offsets of the u64 fields in struct tcp_info (linux/tcp.h)
_TCP_INFO_BYTES_RECEIVED = 128
_TCP_INFO_BYTES_SENT = 200  # since Linux 4.19
_TCP_INFO_BYTES_RETRANS = 208  # since Linux 4.19
_TCP_INFO_SIZE = 512

SOURCE = "kernel TCP_INFO byte counts of this process's TCP sockets"


def tcp_socket_bytes() -> dict[int, tuple[int, int]]:
    """``{socket inode: (bytes sent, bytes received)}`` for every TCP socket of this process."""
    counts = {}
    fd_dir = "/proc/self/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return counts
    for name in fds:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if not target.startswith("socket:["):
            continue
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except OSError:
            continue
        finally:
            sock.close()
        if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
            continue
        if len(info) >= _TCP_INFO_BYTES_RETRANS + 8:
            (sent, retransmitted) = struct.unpack_from("QQ", info, _TCP_INFO_BYTES_SENT)
            sent -= retransmitted
        else:
            (sent,) = struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)
        (received,) = struct.unpack_from("Q", info, _TCP_INFO_BYTES_RECEIVED)
        counts[int(target[8:-1])] = (sent, received)
    return counts


class SocketTraffic:
    """Cumulative TCP bytes of this process since the object was made.

    Each reading (:meth:`totals`) scans the process's TCP sockets; a socket seen
    before keeps its last counts after it closes, and counts that existed before
    the object was made are excluded.
    """

    source = SOURCE

    def __init__(self):
        self._start = tcp_socket_bytes()
        self._last = dict(self._start)
        self._retired = [0, 0]  # counts of sockets whose inode was reused

    def totals(self) -> tuple[int, int]:
        """``(bytes sent, bytes received)`` since creation."""
        for inode, (sent, received) in tcp_socket_bytes().items():
            old = self._last.get(inode)
            if old is not None and (sent < old[0] or received < old[1]):  # a new socket, same inode
                base = self._start.pop(inode, (0, 0))
                self._retired[0] += old[0] - base[0]
                self._retired[1] += old[1] - base[1]
            self._last[inode] = (sent, received)
        sent = self._retired[0] + sum(s - self._start.get(i, (0, 0))[0] for i, (s, _) in self._last.items())
        received = self._retired[1] + sum(r - self._start.get(i, (0, 0))[1] for i, (_, r) in self._last.items())
        return sent, received
