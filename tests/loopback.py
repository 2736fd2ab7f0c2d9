"""An in-process stand-in for a transport: rank 0 of ``size`` simulated ranks.

The other ranks' rows are ``others(row, r)`` (default ``(1 + r) * row``), so a
single process can check what the optimizer does with the gathered matrix.
``resize(n)`` imitates an elastic reset: the next ``refresh()`` reports it.
"""

from __future__ import annotations

import torch

from fa_hvd.comm import Handle, Transport


class _Done(Handle):
    def __init__(self, rows):
        self.rows = rows


class LoopbackTransport(Transport):
    name = "loopback"

    def __init__(self, size: int = 1, others=None):
        self.rank, self.size, self.local_rank = 0, size, 0
        self._next_size = size
        self.others = others or (lambda row, r: (1 + r) * row)
        self.gathered: list[str] = []  # names, in launch order

    def resize(self, size: int) -> None:
        self._next_size = size

    def refresh(self) -> bool:
        changed = self._next_size != self.size
        self.size = self._next_size
        return changed

    def allgather_async(self, tensor, name, out=None):
        self.gathered.append(name)
        rows = [tensor] + [self.others(tensor, r) for r in range(1, self.size)]
        return _Done(torch.cat(rows, dim=0))

    def wait(self, handle):
        return handle.rows

    def broadcast_(self, tensor, root, name):
        return tensor

    def allreduce_sum(self, tensor, name):
        return tensor * self.size

    def allgather_bytes(self, data, name, limit=None):
        return [data] * self.size

    def gather_bytes(self, data, root, name, limit=None):
        return [data] * self.size if root == self.rank else None

    def broadcast_object(self, obj, root, name):
        return obj
