"""Allgather exchange (the default): every rank gathers every rank's buckets, ``(p, n)``, and applies the rule.

Each rank trusts no other rank's arithmetic: it aggregates the gathered rows
itself. What it trusts is the collective that relays the rows; with ``digest``
(the in-step check: one more allgather, tens of percent of a CPU step, see the
README; the trainer's default is the deferred check in its control row instead) a
block altered in transit, or sent differently to different ranks, stops the step
it happened in (:mod:`fa_hvd.exchange.digest`).

Overlap. Each bucket's allgather starts as soon as backward has produced it (the
optimizer's hooks), and :meth:`AllgatherExchange.finish` works on each bucket as it
arrives, while the later ones are still on the wire: it copies it into the ``(p, n)``
matrix and, for the plain Gram rules (:func:`_gram_as_it_arrives`), checks its rows for NaN/Inf and
adds its column blocks of the Gram product (``K = sum_b G_b G_b^T`` in
:func:`~fa_hvd.aggregators.geometry.gram`'s fixed blocks). Only the ``p x p`` solve and
``c^T G`` wait for the last bucket. The result is the same, bit for bit, as the rule on
the whole matrix after the last bucket (the same blocks of the same matrix, the same
arithmetic, in the same order; only when it runs differs). The mean is not split: a
bucket's mean differs from the whole matrix's mean in the last bit where torch's
kernel treats a block's tail differently, so it runs after the last bucket.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch

from ..aggregators.base import Aggregator, Rows, describe, finite_rows
from ..aggregators.geometry import CentredGram
from .base import GradientExchange, wait
from .digest import check_agreement


class AllgatherExchange(GradientExchange):
    """Every rank gathers every rank's buckets, ``(p, n)``, and applies the aggregator.

    A failed bucket raises Horovod's elastic errors unchanged (with a note naming
    this rank, the step and the bucket) and anything else as a ``RuntimeError``
    saying the same. ``timings``: ``arrived`` (the last bucket received),
    ``assembled`` (its work done, module docstring), ``aggregated``; ``stats``:
    ``overlapped_s``, the seconds of bucket work done before the last bucket arrived
    (inside the optimizer's ``wait_s``).
    """

    def __init__(self, transport, aggregator: Callable[[torch.Tensor], torch.Tensor], compression, prefix: str,
                 digest: bool = False):
        self.transport, self.aggregator, self.compression, self.prefix = transport, aggregator, compression, prefix
        self.digest = digest
        self.pending: dict[int, tuple] = {}
        self.timings: dict = {}
        self.stats: dict = {}
        self._buffer: torch.Tensor | None = None

    def name(self, index: int) -> str:
        return f"{self.prefix}.bucket{index}"

    def start(self, index: int, flat: torch.Tensor) -> None:
        wire, ctx = self.compression.compress(flat)
        handle = self.transport.allgather_async(wire.reshape(1, -1), name=self.name(index))
        self.pending[index] = (handle, ctx, flat.numel(), flat.dtype)

    def finish(self, count: int, device: torch.device, step: int) -> torch.Tensor:
        pending = [self.pending.pop(index) for index in range(count)]
        n = sum(numel for _, _, numel, _ in pending)
        dtype = functools.reduce(torch.promote_types, (dtype for *_, dtype in pending))
        work = _GramAsItArrives(self.aggregator, n) if _gram_as_it_arrives(self.aggregator, dtype) else None
        G = None
        offset, overlapped = 0, 0.0
        for index, (handle, ctx, numel, _) in enumerate(pending):
            gathered = wait(self.transport, handle, step, f"bucket {index}")
            arrived = time.perf_counter()
            rows = self.compression.decompress(gathered, ctx).to(device)
            if count == 1:
                G = rows
            else:
                G = self._matrix((rows.shape[0], n), dtype, device) if index == 0 else G
                G[:, offset: offset + numel].copy_(rows)
            if work is not None:
                work.filled(G, offset, offset + numel)
            offset += numel
            if index < count - 1:  # done while the later buckets travel
                overlapped += time.perf_counter() - arrived
        self.timings = {"arrived": arrived, "assembled": time.perf_counter()}
        self.stats = {"overlapped_s": overlapped}
        update = self.aggregator(G) if work is None else work.result(G)
        if self.digest:
            check_agreement(self.transport, update, step, f"{self.prefix}.digest")
        self.timings["aggregated"] = time.perf_counter()
        return update

    def _matrix(self, shape, dtype, device) -> torch.Tensor:
        """The ``(p, n)`` matrix the buckets are copied into, kept across steps (a fresh one each
        step costs more than the copy: its pages are touched anew). The aggregate is copied into
        ``.grad`` at once, so only a rule that kept a view of its input past the call could see it
        change; none does."""
        buffer = self._buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffer = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def abandon(self) -> None:
        for handle, *_ in self.pending.values():
            self.transport.abandon(handle)
        self.pending.clear()


def _gram_as_it_arrives(rule, dtype: torch.dtype) -> bool:
    """Whether :meth:`AllgatherExchange.finish` may check each bucket's rows and add its Gram blocks
    as it arrives, with the same bits as ``rule(G)`` on the whole matrix: a plain Gram rule (FA's
    default mode, Krum, Multi-Krum, geomed, MDA, nmean: ``c`` from ``K`` alone, no anchors, no
    mixing) on fp32 rows. Anything else (the mean, the coordinate-wise rules, cclip, Bulyan,
    compositions, callables, other dtypes) runs as ``rule(G)`` after the last bucket."""
    return (isinstance(rule, Aggregator) and dtype == torch.float32 and rule.robust and rule.gram_space
            and rule.uses_gram and type(rule).by_columns is Aggregator.by_columns)


class _GramAsItArrives:
    """A Gram rule's work on the buckets as they arrive (:func:`_gram_as_it_arrives`), then its result."""

    def __init__(self, rule, n: int):
        self.rule, self.n = rule, n
        self.product = self.finite = None

    def filled(self, G: torch.Tensor, start: int, stop: int) -> None:
        """Columns ``[start, stop)`` of ``G`` hold their values."""
        if self.product is None:
            self.product = CentredGram(G)
            self.finite = torch.ones(G.shape[0], dtype=torch.bool, device=G.device)
        self.finite &= finite_rows(G[:, start:stop])
        self.product.advance(stop)

    def result(self, G: torch.Tensor) -> torch.Tensor:
        """What ``rule(G)`` gives: with every row finite, the rule from the accumulated Gram (as
        :meth:`~fa_hvd.aggregators.base.Aggregator.__call__` does it); else ``rule(G)`` itself,
        which drops the non-finite rows and takes the Gram of the others."""
        rule, p = self.rule, G.shape[0]
        if not bool(self.finite.all()):
            return rule(G)
        rule.check(p, rule.f)
        rule.weights = rule.gram = None
        K = self.product.result().cpu()  # host_gram(G): the p x p work runs on the host
        update = rule.by_columns(p, K, rule.f)(G, slice(0, self.n))
        rule.diagnostics = describe(p, Rows(None, rule.f), rule.weights, rule.gram)
        rule.observe(update)
        return update
