"""Allgather exchange: every rank gathers every rank's gradient and aggregates the ``(p, n)`` matrix.

Each bucket's allgather starts when the bucket is submitted (so it overlaps the
rest of the backward pass); :meth:`~AllgatherExchange.result` waits for them,
concatenates the buckets into ``G`` (``(p, n)``, rows in rank order) and applies
the aggregator once to the whole gradient. Traffic: every rank receives
``(p - 1) n`` values; memory ``p n`` per rank. Trusts no rank: every rank computes
the aggregate itself from the gradients as sent.
"""

from __future__ import annotations

import torch

from .base import Exchange, noted


class AllgatherExchange(Exchange):
    kind = "allgather"

    def __init__(self, transport, aggregator, sizes, compression=None, name="fa_hvd"):
        super().__init__(transport, aggregator, sizes, compression, name)
        self._pending: list = []

    def submit(self, index: int, flat: torch.Tensor) -> None:
        flat = self._check_submit(index, flat, len(self._pending))
        wire, ctx = self.compression.compress(flat)
        handle = self.transport.allgather_async(wire.reshape(1, -1), name=f"{self.name}.bucket{index}")
        self._pending.append((handle, ctx))

    def result(self) -> torch.Tensor:
        if len(self._pending) != len(self.sizes):
            raise RuntimeError(f"fa_hvd exchange: {len(self._pending)} of {len(self.sizes)} buckets submitted")
        pending, self._pending = self._pending, []
        gathered = []
        for index, (handle, ctx) in enumerate(pending):
            try:
                rows = self.transport.wait(handle)
            except Exception as exc:
                raise noted(exc, f"bucket {index}")
            gathered.append(self.compression.decompress(rows, ctx))
        held = sum(t.numel() * t.element_size() for t in gathered)
        G = torch.cat(gathered, dim=1) if len(gathered) > 1 else gathered[0]
        if len(gathered) > 1:
            held += G.numel() * G.element_size()
        del gathered
        self.stats = {"peak_bytes": held}
        return self.aggregator(G)
