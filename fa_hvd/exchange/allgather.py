"""Allgather exchange (the default): every rank gathers every rank's buckets, ``(p, n)``, and applies the rule.

Each rank trusts no other rank's arithmetic: it aggregates the gathered rows
itself. What it trusts is the collective that relays the rows; with ``digest``
(off by default: it costs more than 1 % of a step, see the README) a block
altered in transit, or sent differently to different ranks, stops the step it
happened in (:mod:`fa_hvd.exchange.digest`).
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
        handle = self.transport.allgather_async(wire.reshape(1, -1), name=self.name(index))
        self.pending[index] = (handle, ctx, flat.numel(), flat.dtype)

    def finish(self, count: int, device: torch.device, step: int) -> torch.Tensor:
        G = self._assemble(count, device, step)
        self.timings["assembled"] = time.perf_counter()
        update = self.aggregator(G)
        if self.digest:
            check_agreement(self.transport, update, step, f"{self.prefix}.digest")
        self.timings["aggregated"] = time.perf_counter()
        return update

    def _assemble(self, count: int, device: torch.device, step: int) -> torch.Tensor:
        """The buckets side by side, ``(p, n)``: each bucket is copied into place as soon as it
        arrives, while the later ones are still on the wire. The buffer is kept across steps (a
        fresh one each step costs more than the copy: its pages are touched anew); the aggregate
        is copied into ``.grad`` at once, so only a rule that kept a view of its input past the
        call could see the buffer change; none does. ``timings["arrived"]``: the last bucket
        received."""
        pending = [self.pending.pop(index) for index in range(count)]
        if count == 1:
            handle, ctx, _, _ = pending[0]
            gathered = wait(self.transport, handle, step, "bucket 0")
            self.timings = {"arrived": time.perf_counter()}
            return self.compression.decompress(gathered, ctx).to(device)
        n = sum(numel for _, _, numel, _ in pending)
        dtype = functools.reduce(torch.promote_types, (dtype for *_, dtype in pending))
        offset = 0
        for index, (handle, ctx, numel, _) in enumerate(pending):
            gathered = wait(self.transport, handle, step, f"bucket {index}")
            arrived = time.perf_counter()
            rows = self.compression.decompress(gathered, ctx)
            buffer = self._buffer
            shape = (rows.shape[0], n)
            if index == 0 and (buffer is None or buffer.shape != shape or buffer.dtype != dtype
                               or buffer.device != device):
                buffer = self._buffer = torch.empty(shape, dtype=dtype, device=device)
            buffer[:, offset: offset + numel].copy_(rows)
            offset += numel
        self.timings = {"arrived": arrived}
        return buffer

    def abandon(self) -> None:
        for handle, *_ in self.pending.values():
            self.transport.abandon(handle)
        self.pending.clear()
