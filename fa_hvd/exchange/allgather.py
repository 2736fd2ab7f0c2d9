"""Allgather exchange (the default): every rank gathers every rank's buckets, ``(p, n)``, and applies the rule.

Each rank trusts no other rank's arithmetic: it aggregates the gathered rows
itself. What it trusts is the collective that relays the rows; with ``digest``
(the in-step check: one more allgather, tens of percent of a CPU step, see the
README; the trainer's default is the deferred check in its control row instead) a
block altered in transit, or sent differently to different ranks, stops the step
it happened in (:mod:`fa_hvd.exchange.digest`).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch

from .base import GradientExchange, wait
from .digest import check_agreement


class AllgatherExchange(GradientExchange):
    """Every rank gathers every rank's buckets, ``(p, n)``, and applies the aggregator.

    A failed bucket raises Horovod's elastic errors unchanged (with a note naming
    this rank, the step and the bucket) and anything else as a ``RuntimeError``
    saying the same.
    """

    def __init__(self, transport, aggregator: Callable[[torch.Tensor], torch.Tensor], compression, prefix: str,
                 digest: bool = False):
        self.transport, self.aggregator, self.compression, self.prefix = transport, aggregator, compression, prefix
        self.digest = digest
        self.pending: dict[int, tuple] = {}
        self.timings: dict = {}
        self._buffer: torch.Tensor | None = None

    def name(self, index: int) -> str:
        return f"{self.prefix}.bucket{index}"

    def start(self, index: int, flat: torch.Tensor) -> None:
        wire, ctx = self.compression.compress(flat)
        self.pending[index] = (self.transport.allgather_async(wire.reshape(1, -1), name=self.name(index)), ctx)

    def finish(self, count: int, device: torch.device, step: int) -> torch.Tensor:
        rows = []
        for index in range(count):
            handle, ctx = self.pending.pop(index)
            gathered = wait(self.transport, handle, step, f"bucket {index}")
            rows.append(self.compression.decompress(gathered, ctx).to(device))
        self.timings = {"arrived": time.perf_counter()}
        update = self.aggregator(self._concatenate(rows))
        if self.digest:
            check_agreement(self.transport, update, step, f"{self.prefix}.digest")
        self.timings["aggregated"] = time.perf_counter()
        return update

    def _concatenate(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """The buckets side by side, ``(p, n)``, in a buffer kept across steps (a fresh
        one each step costs more than the copy: its pages are touched anew). The
        aggregate is copied into ``.grad`` at once, so only a rule that kept a view of
        its input past the call could see the buffer change; none does."""
        if len(rows) == 1:
            return rows[0]
        shape = (rows[0].shape[0], sum(r.shape[1] for r in rows))
        dtype = functools.reduce(torch.promote_types, (r.dtype for r in rows))
        buffer = self._buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != rows[0].device:
            buffer = self._buffer = torch.empty(shape, dtype=dtype, device=rows[0].device)
        return torch.cat(rows, dim=1, out=buffer)

    def abandon(self) -> None:
        for handle, _ in self.pending.values():
            self.transport.abandon(handle)
        self.pending.clear()
