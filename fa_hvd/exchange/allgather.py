"""Allgather exchange (the default): every rank gathers every rank's buckets, ``(p, n)``, and applies the rule.

Each rank trusts no other rank's arithmetic: it aggregates the gathered rows
itself. What it trusts is the collective that relays the rows; with ``digest``
(the in-step check: one more allgather, tens of percent of a CPU step, see the
README; the trainer's default is the deferred check in its control row instead) a
block altered in transit, or sent differently to different ranks, stops the step
it happened in (:mod:`fa_hvd.exchange.digest`).

Overlap. Each bucket's allgather starts as soon as backward has produced it (the
optimizer's hooks), and each bucket is worked on as it arrives, while the later ones are
still on the wire: it is copied into the ``(p, n)`` matrix and, for the plain Gram rules
(:func:`_gram_as_it_arrives`), its column blocks of the Gram product are added
(``K = sum_b G_b G_b^T`` in :func:`~fa_hvd.aggregators.geometry.gram`'s fixed blocks; its
diagonal then tells whether every row is finite); for the mean (:func:`_mean_as_it_arrives`) its
columns' mean is taken and handed to the optimizer (``bucket_final``), which writes it into the
bucket's gradients then, as Horovod's in-place allreduce does, so that only the last bucket's
write-back follows backward. Only
the ``p x p`` solve and ``c^T G`` wait for the last bucket. The result is the same, bit for
bit, as the rule on the whole matrix after the last bucket (the same blocks of the same
matrix, the same arithmetic, in the same order; only when it runs differs).

Where that work runs. Once the optimizer has told the exchange the buckets' sizes
(:meth:`AllgatherExchange.plan`) and the transport may be waited on from any thread
(``Transport.waits_from_any_thread``), it runs on one worker thread per exchange, as
Horovod's background thread reduces: the training thread goes on with backward, and
:meth:`AllgatherExchange.finish` only waits for the worker. The worker takes the buckets in
index order whatever order they started in, with the process's intra-op thread count, so
the arithmetic and its order are fixed (no dependence on thread scheduling).
Otherwise (no plan: ``fa_hvd.ddp``, the mpi4py transport) the same work runs inside
:meth:`~AllgatherExchange.finish`, bucket by bucket, on the calling thread.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Callable

import torch

from ..aggregators.base import Aggregator, Rows, describe
from ..aggregators.geometry import CentredGram
from ..aggregators.mean import Mean
from ..comm import wire_format
from .base import GradientExchange, Outputs, Worker, check_planned, fits, raise_failure
from .digest import check_agreement


class AllgatherExchange(GradientExchange):
    """Every rank gathers every rank's buckets, ``(p, n)``, and applies the aggregator.

    A failed bucket raises Horovod's elastic errors unchanged (with a note naming
    this rank, the step and the bucket) and anything else as a ``RuntimeError``
    saying the same. ``timings``: ``arrived`` (the last bucket received, or
    :meth:`finish` called if that was later), ``assembled`` (the bucket work done,
    module docstring), ``aggregated``; ``stats``: ``overlapped_s``, the seconds of
    bucket work done before the last bucket arrived (on the calling thread, inside the
    optimizer's ``wait_s``), or with the worker thread ``worker_s``, its seconds of
    bucket work this step (beside the training thread, not inside ``wait_s``).
    """

    def __init__(self, transport, aggregator: Callable[[torch.Tensor], torch.Tensor], compression, prefix: str,
                 digest: bool = False):
        self.transport, self.aggregator, self.prefix = transport, aggregator, prefix
        self.compression = wire_format(compression)
        self.digest = digest
        self.pending: dict[int, tuple] = {}
        self.timings: dict = {}
        self.stats: dict = {}
        self._buffer: torch.Tensor | None = None
        self._outputs = Outputs()
        self._plan: tuple[list[int], torch.dtype, torch.device] | None = None
        self._worker: Worker | None = None
        self._step: _Assembly | None = None  # the worker's step in progress

    def name(self, index: int) -> str:
        return f"{self.prefix}.bucket{index}"

    def plan(self, sizes: list[int], dtype: torch.dtype, device: torch.device) -> None:
        """Every step sends ``len(sizes)`` buckets of these sizes (elements), each of ``dtype`` or
        narrower, aggregated on ``device``: the bucket work may then run on the worker thread
        (module docstring). :meth:`start` refuses a bucket off the plan."""
        if getattr(self.transport, "waits_from_any_thread", False) and sizes:
            self._plan = (list(sizes), dtype, device)

    def start(self, index: int, flat: torch.Tensor) -> None:
        if self._plan is not None:
            check_planned(self._plan, index, flat)
        wire, ctx = self.compression.compress(flat)
        handle = self.transport.allgather_async(wire.reshape(1, -1), name=self.name(index))
        self.pending[index] = (handle, ctx, flat.numel(), flat.dtype)
        if self._plan is not None:
            if self._step is None:
                sizes, dtype, device = self._plan
                self._step = _Assembly(self, len(sizes), sum(sizes), dtype, device)
                if self._worker is None:
                    self._worker = Worker()
            self._step.entries[index] = self.pending.pop(index)
            self._worker.jobs.put(self._step.advance)

    def finish(self, count: int, device: torch.device, step: int) -> torch.Tensor:
        called = time.perf_counter()
        if self._step is not None:
            work = self._step
            self._step = None
            if count != work.count or device != work.device:
                self.abandon_step(work)
                raise ValueError(f"fa_hvd: finish({count}, {device}) after planning {work.count} buckets on "
                                 f"{work.device}")
            work.finished.wait()
            work.raise_error(step)
            self.timings = {"arrived": max(work.arrived, called), "assembled": max(work.assembled, called)}
            self.stats = {"worker_s": work.busy}
        else:
            pending = [self.pending.pop(index) for index in range(count)]
            n = sum(numel for _, _, numel, _ in pending)
            dtype = functools.reduce(torch.promote_types, (dtype for *_, dtype in pending))
            work = _Assembly(self, count, n, dtype, device)
            for index, entry in enumerate(pending):
                work.entries[index] = entry
                work.advance()
                work.raise_error(step)
            self.timings = {"arrived": work.arrived, "assembled": work.assembled}
            self.stats = {"overlapped_s": work.overlapped}
        update = self._outputs.finished(work.result())
        if self.digest:
            check_agreement(self.transport, update, step, f"{self.prefix}.digest")
        self.timings["aggregated"] = time.perf_counter()
        return update

    def _matrix(self, shape, dtype, device) -> torch.Tensor:
        """The ``(p, n)`` matrix the buckets are copied into, kept across steps (a fresh one each
        step costs more than the copy: its pages are touched anew). The aggregate is copied into
        ``.grad`` at once, so only a rule that kept a view of its input past the call could see it
        change; none does."""
        if not fits(self._buffer, shape, dtype, device):
            self._buffer = torch.empty(shape, dtype=dtype, device=device)
        return self._buffer

    def abandon(self) -> None:
        if self._step is not None:
            self.abandon_step(self._step)
            self._step = None
        for handle, *_ in self.pending.values():
            self.transport.abandon(handle)
        self.pending.clear()

    def abandon_step(self, work: "_Assembly") -> None:
        """Drop the worker's step: it touches nothing after; the buckets it had not received are the
        transport's to forget. A worker still inside a wait is left to it (it then stops) and a new
        worker takes the next step."""
        with work.lock:
            work.cancelled = True
            stuck = work.waiting
            left = [entry for index, entry in work.entries.items() if index >= work.next]
        for handle, *_ in left:
            self.transport.abandon(handle)
        if stuck:
            self._worker = None


class _Assembly:
    """One step's buckets becoming the ``(p, n)`` matrix (and the rule's work on them), in index order."""

    def __init__(self, exchange: AllgatherExchange, count: int, n: int, dtype: torch.dtype, device: torch.device):
        self.exchange, self.count, self.n, self.dtype, self.device = exchange, count, n, dtype, device
        rule = exchange.aggregator
        self.work = (_GramAsItArrives(rule, n, exchange._outputs.take) if _gram_as_it_arrives(rule, dtype)
                     else _MeanAsItArrives(rule, exchange._outputs.take(n, dtype, device)) if _mean_as_it_arrives(rule, dtype)
                     else None)
        self.entries: dict[int, tuple] = {}
        self.next = self.offset = 0
        self.G: torch.Tensor | None = None
        self.arrived = self.assembled = 0.0
        self.overlapped = self.busy = 0.0
        self.error: Exception | None = None
        self.failed = ""  # the wait that failed
        self.cancelled = self.waiting = False
        self.lock = threading.Lock()
        self.finished = threading.Event()

    def advance(self) -> None:
        """Wait for and work on every started bucket from the next one in index order."""
        exchange = self.exchange
        while self.error is None and self.next in self.entries:
            handle, ctx, numel, _ = self.entries[self.next]
            with self.lock:
                if self.cancelled:
                    return
                self.waiting = True
            try:
                gathered = exchange.transport.wait(handle)
            except Exception as exc:  # noqa: BLE001 - finish() raises it, naming its step (raise_failure)
                self._fail(exc, f"bucket {self.next}")
                return
            arrived = time.perf_counter()
            with self.lock:
                self.waiting = False
                if self.cancelled:
                    return
                try:
                    self._take(gathered, ctx, numel)
                except Exception as exc:  # noqa: BLE001 - finish() raises it as it is
                    self._fail(exc, "")
                    return
            done = time.perf_counter()
            self.arrived, self.assembled = arrived, done
            self.busy += done - arrived
            if self.next < self.count:
                self.overlapped += done - arrived
            else:
                self.finished.set()

    def _fail(self, exc: Exception, stage: str) -> None:
        """Keep the failure for :meth:`AllgatherExchange.finish` (``stage``: the wait that failed, or
        empty for the bucket work) and stop: the worker thread itself never raises."""
        self.error, self.failed = exc, stage
        self.finished.set()

    def raise_error(self, step: int) -> None:
        if self.error is not None:
            if self.failed:
                raise_failure(self.exchange.transport, self.error, step, self.failed)
            raise self.error

    def _take(self, gathered: torch.Tensor, ctx, numel: int) -> None:
        rows = self.exchange.compression.decompress(gathered, ctx).to(self.device)
        if isinstance(self.work, _MeanAsItArrives):
            values = self.work.add(rows, self.offset)
            if self.exchange.bucket_final is not None and not self.exchange.digest:  # the in-step check first
                self.exchange.bucket_final(self.next, values)
        elif self.count == 1:
            self.G = rows
        else:
            if self.G is None:
                self.G = self.exchange._matrix((rows.shape[0], self.n), self.dtype, self.device)
            self.G[:, self.offset: self.offset + numel].copy_(rows)
        if isinstance(self.work, _GramAsItArrives):
            self.work.filled(self.G, self.offset, self.offset + numel)
        self.offset += numel
        self.next += 1

    def result(self) -> torch.Tensor:
        return self.exchange.aggregator(self.G) if self.work is None else self.work.result(self.G)


def _gram_as_it_arrives(rule, dtype: torch.dtype) -> bool:
    """Whether :meth:`AllgatherExchange.finish` may check each bucket's rows and add its Gram blocks
    as it arrives, with the same bits as ``rule(G)`` on the whole matrix: a plain Gram rule (FA's
    default mode, Krum, Multi-Krum, geomed, MDA, nmean: ``c`` from ``K`` alone, no anchors, no
    mixing) on fp32 rows. Anything else (the mean, the coordinate-wise rules, cclip, Bulyan,
    compositions, callables, other dtypes) runs as ``rule(G)`` after the last bucket."""
    return (isinstance(rule, Aggregator) and dtype == torch.float32 and rule.robust and rule.gram_space
            and rule.uses_gram and rule.combines_columns)


def _mean_as_it_arrives(rule, dtype: torch.dtype) -> bool:
    """Whether each bucket's mean may be taken as it arrives, straight from the gathered rows (no
    ``(p, n)`` matrix): the plain mean (:class:`~fa_hvd.aggregators.mean.Mean`, whose bits do not
    depend on how the columns are split) on fp32 or fp64 rows."""
    return type(rule) is Mean and dtype in (torch.float32, torch.float64)


class _MeanAsItArrives:
    """The mean, bucket by bucket (:meth:`~fa_hvd.aggregators.mean.Mean.columns`)."""

    def __init__(self, rule: Mean, out: torch.Tensor):
        self.rule, self.out = rule, out  # (n,): this step's buffer (Outputs.take)
        self.p = 0

    def add(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        """A bucket's gathered ``(p, w)`` rows, columns ``[start, start + w)`` of the whole; returns their mean
        (a view of the step's buffer: final)."""
        self.p = rows.shape[0]
        values = self.out[start: start + rows.shape[1]]
        self.rule.columns(rows.to(self.out.dtype), values)
        return values

    def result(self, G=None) -> torch.Tensor:
        """What ``rule(G)`` gives (:meth:`~fa_hvd.aggregators.base.Aggregator.__call__`)."""
        rule, p = self.rule, self.p
        rule.check(p, rule.f)
        rule.weights = rule.gram = None
        rule.diagnostics = describe(p, Rows(None, rule.f), None, None)
        rule.observe(self.out)
        return self.out


class _GramAsItArrives:
    """A Gram rule's work on the buckets as they arrive (:func:`_gram_as_it_arrives`), then its result."""

    def __init__(self, rule, n: int, output: Callable[..., torch.Tensor]):
        self.rule, self.n, self.output = rule, n, output
        self.product = None

    def filled(self, G: torch.Tensor, start: int, stop: int) -> None:
        """Columns ``[start, stop)`` of ``G`` hold their values."""
        if self.product is None:
            self.product = CentredGram(G)
        self.product.advance(stop)

    def result(self, G: torch.Tensor) -> torch.Tensor:
        """What ``rule(G)`` gives. The Gram's diagonal is finite exactly when every row is
        (:mod:`~fa_hvd.aggregators.geometry` redoes rows that overflow fp32 in fp64), so clean rows
        need no pass of their own: then the rule from the accumulated Gram (as
        :meth:`~fa_hvd.aggregators.base.Aggregator.__call__` does it); else ``rule(G)`` itself,
        which drops the non-finite rows and takes the Gram of the others."""
        rule, p = self.rule, G.shape[0]
        K = self.product.result().cpu()  # host_gram(G): the p x p work runs on the host
        if not bool(torch.isfinite(K.diagonal()).all()):
            return rule(G)
        rule.check(p, rule.f)
        rule.weights = rule.gram = None
        update = rule.by_columns(p, K, rule.f)(G, slice(0, self.n), out=self.output(self.n, G.dtype, G.device))
        rule.diagnostics = describe(p, Rows(None, rule.f), rule.weights, rule.gram)
        rule.observe(update)
        return update
