"""The transport interface: allgather (async), broadcast and small allreduces.

Tensors are gathered along dim 0, so gathering a ``(1, n)`` row from each of
``size`` ranks gives ``(size, n)`` in rank order on every rank. Horovod has no
bfloat16 allgather, so callers send bf16 as fp32 or fp16.
"""

from __future__ import annotations

import torch


class Handle:
    """An allgather in flight; :meth:`Transport.wait` returns its result."""


class Transport:
    name = "transport"
    rank: int
    size: int
    local_rank: int

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Handle:
        raise NotImplementedError

    def wait(self, handle: Handle) -> torch.Tensor:
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.wait(self.allgather_async(tensor, name))

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        """Overwrite ``tensor`` in place with ``root``'s copy."""
        raise NotImplementedError

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (small tensors: counters, checks)."""
        raise NotImplementedError

    def allgather_object(self, obj, name: str) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        raise NotImplementedError
