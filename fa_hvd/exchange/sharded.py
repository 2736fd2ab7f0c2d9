"""Sharded exchange: the robust aggregate at the traffic of one ring allreduce, O(n) memory per rank.

Every bucket of ``n_b`` values is cut into ``p`` contiguous chunks of
``W_b = ceil(n_b / p)`` (the last ones shorter); rank ``j`` owns chunk ``j`` of every
bucket, its shard ``G_j`` (``p x n/p`` over all buckets).

1. alltoall, one per bucket as soon as the optimizer starts it: rank ``j`` receives
   chunk ``j`` of that bucket from every rank (rows in rank order).
2. Rank ``j`` computes its partial Gram ``K_j = G_j G_j^T`` bucket by bucket, as each
   alltoall arrives while the later ones travel (fp64, with the rule's anchors appended,
   e.g. cclip's centre; :func:`~fa_hvd.aggregators.base.anchored_gram`)
   and which rows of ``G_j`` hold NaN or Inf (from the Gram's diagonal for fp32 and
   narrower data, where fp64 sums of squares cannot overflow; by
   :func:`~fa_hvd.aggregators.base.finite_rows` otherwise and for rules without a Gram).
3. One allgather of the packed ``K_j`` and flags (``p + p (p + 1) / 2`` words per
   rank) and, for a robust rule, each rank's own word on its own row (``2 p`` words:
   which of its chunks are finite, their squared norms, computed on what it sent
   while each bucket's alltoall travels); every rank sums the ``K_j`` in shard order in fp64, so ``K``
   is bit for bit the same everywhere, whatever order a reduction collective would
   have used.
4. Every rank weighs the owners' reports against the senders' words
   (:mod:`.evidence`: a row its sender declares non-finite is dropped and counted
   against ``f``, as in allgather mode; a disputed row costs both parties their rows;
   an owner proven to lie stops the step) and turns ``K`` into the rule's column form
   (:meth:`~fa_hvd.aggregators.base.Aggregator.by_columns`): coefficients ``c`` for
   Gram rules, Bulyan's selection, cclip's ``(a, c)``; the coordinate-wise rules need
   no ``K``. The ``p x p`` work runs on the host (one transfer of ``K``, no device
   synchronisation per iteration).
5. Rank ``j`` computes its shard of the aggregate, ``a_j = c^T G_j`` (or the
   coordinate-wise rule on ``G_j``), and an allgather of the ``a_j`` (in a few pieces
   of columns at once, faster than one) gives the aggregate on every rank (only one
   copy of each ``a_j`` exists, so every rank holds the same bits), reassembled in
   bucket order; with ``digest`` (the in-step check) one word per rank compares the
   aggregates (:mod:`.digest`).

Early rules. A rule whose every column depends on that column alone (the mean, median,
trimmed mean: no ``K``; :func:`_early`) does not wait for the last bucket: as each
bucket's alltoall arrives, rank ``j`` computes its shard of that bucket's aggregate for
all ``p`` rows and starts its allgather at once (under ``<prefix>.out``, a channel of its
own: :meth:`ShardedExchange.channels`, as ``<prefix>.out#<bucket>``), so the aggregate's allgathers overlap backward
as an allreduce's buckets do. Where the transport allows it (``waits_from_any_thread``, and
``<prefix>.out`` matched apart from other names: Horovod; torch.distributed once the
optimizer or the DDP hook prepared it) this runs on one worker thread per exchange, in
bucket order, beside the training thread; otherwise inside :meth:`~ShardedExchange.finish`. Steps 3 and 4 still run
after the last bucket (a robust rule must know which rows every owner saw non-finite, and
the evidence): when every row is kept with ``f`` unchanged, the shards gathered early are
the aggregate, bit for bit what step 5 would have made of the same pieces; otherwise (a
dropped row, a dispute) every rank alike waits them out unused and runs step 5 on the kept
rows as above.

Traffic per rank: ``(p - 1) W`` values each way for the alltoall and for the
allgather (``W = sum_b W_b``), a ring allreduce's ``2 n (p - 1) / p``, plus the Gram
words; see :mod:`.cost`. Memory: the received shard and the gathered aggregate,
about ``2 n`` values, and the reassembled ``n``. Compute: ``O(n p)`` per rank for the
Gram instead of ``O(n p^2)``. With ``compression`` (Horovod's ``Compression.fp16``)
the alltoall and the allgather of the aggregate both travel compressed, as both
halves of Horovod's allreduce do.

Trust: every rank's gradient may be anything (the rule sees every row). Each
owner's flags and the diagonal of its partial Gram are checked against the senders
(:mod:`.evidence`); what stays trusted unreplicated is the rest of its partial Gram
within those checks and its shard of the aggregate. ``replicas = k > 1`` buys that
back at ``k`` times the traffic: chunk ``s`` of every bucket is held by ranks
``s, s + 1, ..., s + k - 1`` (mod ``p``), which exchange a BLAKE2b digest of every
chunk they received, their partial Grams and flags, and their shards of the
aggregate. ``k`` must be 1 or more than ``f`` (else ``f`` liars could hold every copy
of a shard). Every rank compares the copies bit for bit and uses the one more than
``f`` holders agree on (it has an honest holder; with ``k >= 2f + 1`` there always is
one), naming the others in the diagnostics' ``repaired``; when there is none, a
:class:`ShardMismatch` on every rank alike names the holders, blaming none.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time

import torch

from ..aggregators.base import Aggregator, Rows, anchored_gram, describe, finite_rows
from ..comm import wire_format
from .base import GradientExchange, Outputs, Worker, check_planned, fits, raise_failure, rule_name, wait
from .digest import check_agreement
from .evidence import Verdict, majority, not_a_gram, verdict

HALF = (torch.float16, torch.bfloat16)
MIN_GATHER_PIECE = 1 << 16  # columns: narrower pieces cost more in latency than they gain
CLAIM_PIECE = 1 << 20
"""Values per fp64 squared-norm call in a sender's word (:meth:`ShardedExchange._claim`): torch's norm of fp32
values with an fp64 accumulator took 0.4-0.7 ns a value up to 4M values and 3.5-3.7 ns from 4.5M (one thread, torch
2.14 on this project's 2-core CPU), so a longer chunk (one large parameter's bucket: an embedding) is summed in
pieces, 0.4-0.6 ns a value at any length."""


class ShardMismatch(RuntimeError):
    """A shard owner's report is proven false (:mod:`.evidence`), or replicas of a shard disagree with no
    copy held by more than ``f`` of them: the step stops on every rank alike."""


class ShardedExchange(GradientExchange):
    """The optimizer's gradient exchange (``exchange="sharded"``), one shard of the coordinates per rank.

    Built as ``ShardedExchange(transport, aggregator, compression, prefix)`` by the
    optimizer; :func:`replicated` makes a factory with ``replicas``. :meth:`start` takes
    each bucket's flat gradient (in any order), :meth:`finish` returns the aggregate
    (:meth:`finish_buckets` each bucket's part of it: the DDP hook's),
    :meth:`abandon` drops a step in flight. ``timings`` holds the last finish's
    ``arrived`` (the last alltoall received and worked on), ``gram`` (the partial Gram, its allgather
    and the evidence), ``solved`` (the rule's ``p x p`` work), ``combined`` (this rank's
    shard of the aggregate), ``gathered`` (the aggregate's allgather) and ``aggregated``
    stamps, so the optimizer's ``aggregate_s`` includes the two small collectives after
    the alltoalls; ``stats`` holds its ``peak_bytes`` (the most bytes of tensors the
    exchange itself held at once) and ``bucket_work_s`` (the seconds of work on the buckets
    as they arrived: on the worker thread beside the step, or else inside ``arrived``).
    """

    def __init__(self, transport, aggregator, compression=None, prefix: str = "fa_hvd", replicas: int = 1,
                 lies=None, digest: bool = False):
        if not isinstance(aggregator, Aggregator) or not aggregator.columnwise:
            rule = rule_name(aggregator)
            raise ValueError(
                f"fa_hvd: exchange='sharded' needs a rule computable by column blocks (Gram rules, median, "
                f"trimmed_mean, bulyan, cclip and their compositions), got {rule!r}; use exchange='allgather'"
            )
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"fa_hvd: replicas must be a positive integer, got {replicas!r}")
        if 1 < replicas <= aggregator.f:
            raise ValueError(
                f"fa_hvd: replicas={replicas} cannot keep the promise for f={aggregator.f}: f ranks could hold "
                f"every copy of a shard; use replicas >= f + 1 = {aggregator.f + 1} (a lie is detected) or "
                f">= 2f + 1 = {2 * aggregator.f + 1} (a lie is repaired), or 1")
        self.transport, self.aggregator, self.prefix, self.replicas = transport, aggregator, prefix, replicas
        self.digest = digest  # compare the aggregates' digests every step (fa_hvd.exchange.digest)
        self.lies = lies  # fault injection: a rank lying in its roles (fa_hvd.faults.roles.RoleLies)
        self.compression = wire_format(compression)
        self.timings: dict = {}
        self.stats: dict = {}
        self.p = self.rank = None
        self._step: _Step | None = None  # the step in progress
        self._plan: tuple[list[int], torch.dtype, torch.device] | None = None
        self._worker: Worker | None = None
        self._outputs = Outputs()
        self._gathered: list[torch.Tensor | None] = []  # every rank's shards of the aggregate, kept across steps
        self._shards: tuple[tuple, torch.Tensor] | None = None  # this rank's shards of it (:meth:`_shards_buffer`)
        transport.traffic  # noqa: B018 -- the transport's byte counters start with the exchange

    @property
    def shards(self) -> torch.Tensor | None:
        """This rank's shards of the last aggregate combined after the last bucket (None before one, and
        for an early rule, whose shards travel bucket by bucket): what step 5's allgather sends."""
        return None if self._shards is None else self._shards[1]

    def name(self, index: int) -> str:
        """The collective name of bucket ``index`` (the optimizer prepares ordered channels by it)."""
        return f"{self.prefix}.bucket{index}"

    # -- layout ---------------------------------------------------------------------------
    def _follow_world(self) -> None:
        """Rank and size from the transport, read at each step's first bucket (elastic resets)."""
        p, rank = self.transport.size, self.transport.rank
        if self.replicas > p:
            raise ValueError(f"fa_hvd: replicas={self.replicas} needs at least as many ranks, got {p}")
        self.p, self.rank = p, rank
        self.held = [(rank - t) % p for t in range(self.replicas)]  # the chunks this rank computes

    def chunk(self, size: int, s: int) -> tuple[int, int]:
        """Chunk ``s`` of a bucket of ``size`` values: ``[start, stop)``."""
        width = -(-size // self.p)
        return min(s * width, size), min((s + 1) * width, size)

    def holders(self, s: int) -> list[int]:
        """Ranks that compute chunk ``s`` (the first one's copy is used)."""
        return [(s + t) % self.p for t in range(self.replicas)]

    def plan(self, sizes: list[int], dtype: torch.dtype, device: torch.device) -> None:
        """Every step sends these buckets (:meth:`GradientExchange.plan`): where the transport may be
        waited on from any thread, each bucket's work (its pieces, partial Gram and row flags) then
        runs on the worker thread as its alltoall arrives, beside backward. A bucket off the plan is
        refused (:func:`~.base.check_planned`)."""
        if self.transport.waits_from_any_thread and sizes:
            self._plan = (list(sizes), dtype, device)

    def channels(self) -> list[str]:
        return [f"{self.prefix}.out"]  # the aggregate's allgathers, started on the worker thread (early rules)

    # -- 1. alltoall -------------------------------------------------------------------------
    def start(self, index: int, flat: torch.Tensor) -> None:
        if flat.dtype == torch.bfloat16:
            flat = flat.float()  # no bf16 on Horovod's wire
        if self._plan is not None:
            check_planned(self._plan, index, flat)
        if self._step is None:
            self._follow_world()
            self._step = _Step(self, flat)
        work = self._step
        size, parts, splits = flat.numel(), [], []
        for rank in range(self.p):
            ranges = [self.chunk(size, (rank - t) % self.p) for t in range(self.replicas)]
            parts += [flat[a:b] for a, b in ranges]
            splits.append(sum(b - a for a, b in ranges))
        send = flat if self.replicas == 1 else torch.cat(parts)  # k = 1: the chunks in rank order
        wire, ctx = self.compression.compress(send)
        if self.aggregator.robust:  # claimed by advance() while the alltoall travels
            work.unclaimed[index] = (wire, ctx, size, splits)
        if self.lies is not None:
            wire = self.lies.sent(wire, splits)
        received = sum(b - a for a, b in (self.chunk(size, s) for s in self.held))
        handle = self.transport.alltoall_async(wire, splits, name=self.name(index), received=[received] * self.p)
        work.entries[index] = (handle, ctx, flat.dtype, size, send if self.replicas > 1 else None)
        if work.threaded:
            if self._worker is None:
                self._worker = Worker()
            self._worker.jobs.put(work.advance)

    def _claim(self, work: "_Step", seen: torch.Tensor, size: int, splits: list[int]) -> None:
        """This rank's own word on its row, per chunk (finite? squared norm in fp64), on the values
        the owners will see; summed over the step's buckets (see :mod:`.evidence`)."""
        if work.claims is None:
            work.claims = (torch.ones(self.p, dtype=torch.bool, device=seen.device),
                           torch.zeros(self.p, dtype=torch.float64, device=seen.device))
        finite, norms = work.claims
        for s in range(self.p):
            a, b = self.chunk(size, s)
            at = sum(splits[:s])  # the first copy of chunk s goes to rank s
            x = seen[at : at + b - a]
            norm = squared_norm(x)
            norms[s] += norm
            finite[s] &= x.isfinite().all() if seen.dtype == torch.float64 else norm.isfinite()

    def abandon(self) -> None:
        work, self._step = self._step, None
        if work is not None and work.abandon():
            self._worker = None  # stuck in a wait: a new worker takes the next step

    # -- 2. each bucket as its alltoall arrives ----------------------------------------------------
    def _arrive(self, work: "_Step", index: int, wire: torch.Tensor) -> None:
        """Bucket ``index``'s alltoall is in: its pieces kept, their partial Gram and row flags added
        (while later buckets travel) and, for an early rule, its shard of the aggregate computed and
        its allgather started (module docstring)."""
        _, ctx, _, size, _ = work.entries[index]
        chunks = wire.reshape(self.p, -1)  # row i: what rank i sent here
        values = self.compression.decompress(chunks, ctx).to(work.device)
        work.held += _bytes(wire) + (_bytes(values) if values.data_ptr() != wire.data_ptr() else 0)
        if work.partial is None:
            n = sum(entry[3] for entry in work.entries.values())  # every bucket's, where K needs it (not threaded)
            work.partial = _PartialGram(self.aggregator, self.p, len(self.held), n, work.compute, work.device)
        column, mine = 0, []
        for t, s in enumerate(self.held):
            a, b = self.chunk(size, s)
            piece = values[:, column : column + b - a]
            if self.replicas > 1:  # replicas compare bits: the same memory layout on every holder
                piece = piece.contiguous()
                work.held += _bytes(piece)
                for source in range(self.p):
                    work.digests[t][source].update(chunks[source, column : column + b - a].contiguous()
                                                   .view(torch.uint8).cpu().numpy())
            if b > a:  # (bucket, coordinates in the whole gradient, the chunk from every rank)
                cols = slice(work.offset + a, work.offset + b)
                work.pieces[t].append((index, cols, piece))
                work.partial.add(t, piece, cols)
                mine.append((cols, piece))
            column += b - a
        work.offset += size
        if work.rule is not None:
            out = torch.zeros(1, -(-size // self.p), dtype=work.result, device=work.device)  # chunk padded to W_b
            for cols, piece in mine:
                out[0, : piece.shape[1]] = work.rule(piece.to(work.compute), cols)
            if self.lies is not None:
                out = self.lies.aggregate(self.held, out)
            sent, out_ctx = self.compression.compress(out)
            work.held += _bytes(out)
            handle = self.transport.allgather_async(sent, name=f"{self.prefix}.out#{index}")  # on .out's channel
            work.early.append((handle, out_ctx, size))

    # -- 3 .. 5 ---------------------------------------------------------------------------------
    def finish(self, count: int, device: torch.device, step: int) -> torch.Tensor:
        """Wait for buckets ``0..count-1``; the ``(n,)`` aggregate on ``device``, the same bits on every rank."""
        return self._finish(count, device, step, None)

    def finish_buckets(self, sizes: list[int], device: torch.device, step: int) -> list[torch.Tensor]:
        """As :meth:`finish`, each bucket's part of the aggregate; an early rule's are its buckets'
        gathered shards themselves (no copy)."""
        return self._finish(len(sizes), device, step, sizes)

    def _finish(self, count: int, device: torch.device, step: int, sizes: list[int] | None):
        called = time.perf_counter()
        work, self._step = self._step, None
        if work is None:
            self._follow_world()
            work = _Step(self, torch.empty(0, device=device))
        if sorted(work.entries) != list(range(count)):
            work.abandon()
            raise ValueError(f"fa_hvd: finish({count}) after buckets {sorted(work.entries)} started")
        if work.threaded and work.entries:
            done = threading.Event()
            self._worker.jobs.put(done.set)  # after every bucket's work (the jobs run in order)
            done.wait()
        else:
            work.settle(device)
            work.advance()
        work.arrived = max(work.arrived, called)
        return self._aggregate(work, count, device, step, sizes)  # a failure drops the step's collectives, as it is

    def _aggregate(self, work: "_Step", count: int, device: torch.device, step: int, parts: list[int] | None):
        """The aggregate, or with ``parts`` (the buckets' sizes) each bucket's part of it."""
        work.raise_error(step)
        sizes = [work.entries[index][3] for index in range(count)]
        result, compute = _step_dtypes([work.entries[index][2] for index in range(count)])
        held = work.held + sum(send.numel() * send.element_size() for *_, send in work.entries.values()
                               if send is not None)
        if work.partial is None or (work.compute, work.device) != (compute, device):  # no bucket, or off the guess
            work.partial = _PartialGram(self.aggregator, self.p, len(self.held), work.offset, compute, device)
            for t, shard in enumerate(work.pieces):
                for _, cols, piece in shard:
                    work.partial.add(t, piece.to(device), cols)
        self.timings = {"arrived": work.arrived}
        n = work.offset
        K, rows, evidence = self._gram(work, step)
        self.timings["gram"] = time.perf_counter()
        self.aggregator.weights = self.aggregator.gram = None
        if rows.none_left:
            work.drain(step)
            self.aggregator.diagnostics = {**describe(self.p, rows, None), **evidence}
            self.stats = {"peak_bytes": held, "bucket_work_s": work.busy}
            self.timings["aggregated"] = time.perf_counter()
            zeros = torch.zeros(n, dtype=result, device=device)
            return zeros if parts is None else list(zeros.split(parts))
        kept = self.p if rows.keep is None else rows.keep.numel()
        early = (work.rule is not None and rows.keep is None and rows.f == self.aggregator.f
                 and (work.result, work.compute, work.device) == (result, compute, device))
        if early:  # the shards' allgathers started as the buckets arrived
            self.timings["solved"] = self.timings["combined"] = time.perf_counter()
            self.aggregator.diagnostics = {**describe(self.p, rows, None), **evidence}
            pieces, gathered = self._gather_early(work, step)
            if parts is not None and not self.digest:  # an early rule observes nothing (_early)
                self.stats = {"peak_bytes": held + gathered, "bucket_work_s": work.busy}
                self.timings["gathered"] = self.timings["aggregated"] = time.perf_counter()
                return pieces
            aggregate = torch.cat(pieces, out=self._outputs.take(n, result, device)) if pieces else \
                torch.zeros(0, dtype=result, device=device)
            gathered += _bytes(aggregate)
        else:
            work.drain(step)
            aggregate, gathered = self._combine(work, rows, K, kept, sizes, result, compute, device, evidence, step)
        held += gathered
        self.timings["gathered"] = time.perf_counter()
        self.stats = {"peak_bytes": held, "bucket_work_s": work.busy}
        if self.digest:
            check_agreement(self.transport, aggregate, step, f"{self.prefix}.digest")
        self.aggregator.observe(aggregate)
        self.timings["aggregated"] = time.perf_counter()
        return self._outputs.finished(aggregate) if parts is None else list(aggregate.split(parts))

    def _combine(self, work: "_Step", rows: Rows, K, kept: int, sizes, result, compute, device, evidence,
                 step: int) -> tuple[torch.Tensor, int]:
        """Step 5 after the last bucket: the rule's column form from ``K``, this rank's shards of the
        aggregate and their allgather; ``(aggregate, bytes held)``."""
        self.aggregator.check(kept, rows.f)
        if K is not None and rows.keep is not None:
            keep = torch.cat([rows.keep, torch.arange(self.p, K.shape[0])])  # anchors stay
            K = K[keep][:, keep]
        rule = self.aggregator.by_columns(kept, K, rows.f)
        self.timings["solved"] = time.perf_counter()
        self.aggregator.diagnostics = {**describe(self.p, rows, self.aggregator.weights, self.aggregator.gram),
                                       **evidence}
        widths = [-(-size // self.p) for size in sizes]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        out = self._shards_buffer(widths, result, device)
        into = self.aggregator.combines_columns and compute == result  # c^T block written in place
        for t, shard in enumerate(work.pieces):
            for index, cols, piece in shard:
                block = (piece if rows.keep is None else piece[rows.keep.to(piece.device)]).to(device=device,
                                                                                                dtype=compute)
                target = out[t, starts[index] : starts[index] + piece.shape[1]]
                if into:
                    rule(block, cols, out=target)
                else:
                    target.copy_(rule(block, cols))
        if self.lies is not None:
            out = self.lies.aggregate(self.held, out)
        self.timings["combined"] = time.perf_counter()
        aggregate, gathered = self._gather(out, sizes, widths, starts, step)
        return aggregate, gathered + _bytes(out)

    def _gather_early(self, work: "_Step", step: int) -> tuple[list[torch.Tensor], int]:
        """Step 5 for an early rule: each bucket's allgather of the shards, that bucket's aggregate (the
        shards in rank order, as :meth:`_gather` reassembles them); ``(each bucket's, bytes held)``."""
        pieces, held = [], 0
        for handle, ctx, size in work.early:
            gathered = wait(self.transport, handle, step, "aggregate")
            values = self.compression.decompress(gathered, ctx)  # (p, W_b): shard s in row s
            held += _bytes(gathered) + (_bytes(values) if values.data_ptr() != gathered.data_ptr() else 0)
            pieces.append(values.reshape(-1)[:size])
        work.early.clear()
        return pieces, held

    def _gram(self, work: "_Step", step: int) -> tuple[torch.Tensor | None, Rows, dict]:
        """Steps 2 to 4: ``K`` (fp64 on the host, summed in shard order; None if the rule needs none),
        the rows the rule aggregates and what the evidence showed (:mod:`.evidence`; replicas: the
        majority's copy of each shard, the odd holders named). Nothing travels where nothing would be
        read: a rule that is not robust and needs no ``K`` (the mean), one holder per shard."""
        p, aggregator, partial, digests = self.p, self.aggregator, work.partial, work.digests
        if not aggregator.robust and not aggregator.uses_gram and self.replicas == 1:
            return None, Rows(None, aggregator.f), {}
        compute, m = partial.compute, partial.m
        upper = torch.triu_indices(m, m)
        packed = []
        for t in range(len(self.held)):
            finite, K = partial.result(t)
            if self.lies is not None:
                finite, K = self.lies.report(self.held[t], finite, K)
            fields = [finite.long()]
            if self.replicas > 1:
                fields.append(torch.tensor([_signed(d.digest()) for d in digests[t]], dtype=torch.int64))
            if aggregator.uses_gram:
                fields.append(K[upper[0], upper[1]].view(torch.int64))
            packed.append(torch.cat(fields))
        if aggregator.robust:
            claimed_finite, claimed_norms = (c.cpu() for c in work.claims)
            if self.lies is not None:
                claimed_finite, claimed_norms = self.lies.claim(claimed_finite, claimed_norms)
            packed.append(torch.cat([claimed_finite.long(), claimed_norms.view(torch.int64)]))
        mine = torch.cat(packed)
        everyone = wait(self.transport, self.transport.allgather_async(mine.reshape(1, -1), name=f"{self.prefix}.gram"),
                        step, "partial Grams")
        claims = everyone[:, mine.numel() - 2 * p :] if aggregator.robust else None
        length = (mine.numel() - (0 if claims is None else 2 * p)) // self.replicas
        flags = torch.ones(p, p, dtype=torch.bool)
        partials = torch.zeros(p, m, m, dtype=torch.float64) if aggregator.uses_gram else None
        owners, repaired = [], {}
        for s in range(p):
            holders = self.holders(s)
            copies = [everyone[h, t * length : (t + 1) * length] for t, h in enumerate(holders)]
            chosen = self._choose(s, copies, holders, "the partial Gram and row flags", repaired)
            owners.append(holders[chosen])
            flags[s] = copies[chosen][:p].bool()
            if partials is not None:
                partials[s][upper[0], upper[1]] = copies[chosen][-upper.shape[1] :].view(torch.float64)
                partials[s] += partials[s].triu(1).T
        evidence = {"repaired": repaired} if repaired else {}
        if not aggregator.robust:
            return (None if partials is None else _sum_in_order(partials)), Rows(None, aggregator.f), evidence
        judged = self._judge(owners, flags, partials, claims, compute)
        if judged.disputes:
            evidence.update({"disputes": [list(d) for d in judged.disputes], "blamed": judged.blamed})
        if not judged.keep.all():
            rows = Rows(judged.keep.nonzero().flatten(), judged.f)
        else:
            rows = Rows(None, judged.f)
        K = None if partials is None else _sum_in_order(partials)
        return K, rows, evidence

    def _choose(self, s: int, copies, holders: list[int], what: str, repaired: dict) -> int:
        """Which holder's copy of shard ``s`` to use: the only one (``replicas = 1``), else the copy
        more than ``f`` holders agree on (the odd ones out are recorded in ``repaired``); with no
        such copy, :class:`ShardMismatch` on every rank, blaming no one."""
        if self.replicas == 1:
            return 0
        found = majority(copies, holders, self.aggregator.f)
        if found is None:
            p = self.p
            for source in range(p):
                if what.startswith("the partial") and len({int(c[p + source]) for c in copies}) > 1:
                    raise ShardMismatch(
                        f"fa_hvd: sharded exchange: ranks {holders} received different data from rank {source} "
                        f"for shard {s}: rank {source} sent different chunks to the replicas, or one of "
                        f"{holders} misreports what it received (no one copy is held by more than "
                        f"f={self.aggregator.f} of them)")
            raise ShardMismatch(f"fa_hvd: sharded exchange: {what} of shard {s}: ranks {holders} disagree and "
                                f"no one copy is held by more than f={self.aggregator.f} of them")
        if found.odd:  # the aggregate's shards are chosen piece by piece: a holder odd in any of them is named
            known = repaired.setdefault(what, {}).setdefault(s, [])
            known[:] = sorted(set(known) | set(found.odd))
        return found.chosen

    def _judge(self, owners, flags, partials, claims, compute) -> Verdict:
        """Owners' reports against senders' claims (:func:`.evidence.verdict`); a lying owner stops the step."""
        p, f = self.p, self.aggregator.f
        not_grams = {}
        if partials is not None:
            for s, owner in enumerate(owners):
                why = not_a_gram(partials[s], flags[s], strict_finite=compute != torch.float64)
                if why is not None:
                    not_grams.setdefault(owner, f"its partial Gram of shard {s} is {why}")
        diagonals = None if partials is None else partials[:, torch.arange(p), torch.arange(p)]
        judged = verdict(f, owners, flags, diagonals, claims[:, :p].bool(), claims[:, p:].view(torch.float64),
                         not_grams)
        if judged.lying_owners:
            named = sorted(judged.lying_owners)
            reasons = "; ".join(f"rank {r}: {why}" for r, why in sorted(judged.lying_owners.items()))
            raise ShardMismatch(f"fa_hvd: sharded exchange: rank(s) {named} lied about their shard "
                                f"(f={f}): {reasons}")
        return judged

    def _shards_buffer(self, widths: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This rank's shards of the aggregate, ``(replicas, sum W_b)``, kept across steps while the buckets'
        widths stay: a fresh buffer's pages are touched anew each step (:class:`~.base.Outputs`). Made with
        zeros: the columns past a bucket's last, shorter chunk are never written, so they travel as zeros."""
        key = (tuple(widths), dtype, device)
        if self._shards is None or self._shards[0] != key:
            self._shards = (key, torch.zeros(self.replicas, sum(widths), dtype=dtype, device=device))
        return self._shards[1]

    def _gather(self, out: torch.Tensor, sizes, widths, starts, step: int) -> tuple[torch.Tensor, int]:
        """Step 5: allgather the shards of the aggregate, in up to the transport's ``gather_pieces`` pieces
        of columns started together (torch.distributed's Gloo moves a few allgathers at once faster than
        one of their total: 4 pieces of 5.6M fp32 values per rank into kept outputs take 20-24 ms
        against 41-42 at p = 2, 41-43 against 73-79 at p = 4; under Horovod they gain nothing, so it
        gathers in one), reassembled in bucket order; ``(aggregate, bytes held)``."""
        bounds = gather_bounds(out.shape[1], self.transport.gather_pieces)
        count = len(bounds) - 1
        if len(self._gathered) != count:
            self._gathered = [None] * count
        handles = []
        for k in range(count):
            wire, ctx = self.compression.compress(out[:, bounds[k] : bounds[k + 1]].reshape(1, -1))
            shape = (self.p, wire.shape[1])
            if not fits(self._gathered[k], shape, wire.dtype, wire.device):
                self._gathered[k] = torch.empty(shape, dtype=wire.dtype, device=wire.device)  # read within this call
            handles.append((self.transport.allgather_async(wire, name=f"{self.prefix}.out#piece{k}",
                                                           out=self._gathered[k]), ctx))
        pieces, held, repaired = [], 0, {}
        try:
            for handle, ctx in handles:
                gathered = wait(self.transport, handle, step, "aggregate")
                values = self.compression.decompress(gathered, ctx).reshape(self.p, self.replicas, -1)
                held += _bytes(gathered) + (_bytes(values) if values.data_ptr() != gathered.data_ptr() else 0)
                pieces.append(self._chosen_shards(values, repaired))
        except BaseException:
            for handle, _ in handles[len(pieces) + 1 :]:
                self.transport.abandon(handle)
            self._gathered, self._shards = [], None  # failed allgathers may still use them: the next step takes others
            raise
        if repaired:
            diagnostics = self.aggregator.diagnostics
            diagnostics["repaired"] = {**diagnostics.get("repaired", {}), **repaired}
        aggregate = self._outputs.take(sum(sizes), pieces[0].dtype, pieces[0].device)
        offset = 0
        for size, width, start in zip(sizes, widths, starts):
            full = size // width if width else 0  # shards wholly inside the bucket; the next one, if any, is cut
            _copy_columns(aggregate[offset : offset + full * width].view(full, width), pieces, bounds, start, 0)
            if full * width < size:
                _copy_columns(aggregate[offset + full * width : offset + size].view(1, -1), pieces, bounds, start, full)
            offset += size
        return aggregate, held + _bytes(aggregate)

    def _chosen_shards(self, values: torch.Tensor, repaired: dict) -> torch.Tensor:
        """``(p, w)``: shard ``s`` of these columns in row ``s`` from ``values`` (``(p, replicas, w)``, holder
        ``(s + t) % p``'s copy of chunk ``s`` in its slot ``t``), the copy more than ``f`` holders agree on."""
        if self.replicas == 1:
            return values[:, 0]
        chosen = []
        for s in range(self.p):
            copies = [values[h, t] for t, h in enumerate(self.holders(s))]
            t = self._choose(s, copies, self.holders(s), "the aggregate", repaired)
            chosen.append(values[self.holders(s)[t], t])
        return torch.stack(chosen)


class _Step:
    """One step's buckets, worked on in index order as their alltoalls arrive (:meth:`ShardedExchange._arrive`):
    on the exchange's worker thread (``threaded``) or inside :meth:`~ShardedExchange.finish`.

    ``rule``: for an early rule (:func:`_early`), the rule's column form for all ``p`` rows and
    ``f``, made before the first bucket; its shards' allgathers are ``early``. The step's dtypes
    and device (``result``, ``compute``, ``device``) are the plan's (:meth:`ShardedExchange.plan`),
    else its first bucket's; a step whose buckets end up otherwise has its partial Grams added again
    after the last bucket, and a step that does so, or whose rows are not all kept, uses the
    allgathers started early for nothing (every rank alike) and aggregates after the last bucket
    as a Gram rule does."""

    def __init__(self, exchange: ShardedExchange, first: torch.Tensor):
        plan, transport = exchange._plan, exchange.transport
        dtype, self.device = (first.dtype, first.device) if plan is None else plan[1:]
        self.exchange = exchange
        self.result, self.compute = _step_dtypes([dtype])
        aggregator, p = exchange.aggregator, exchange.p
        self.rule = None
        ordered = transport.has_channel(exchange.channels()[0])  # the worker may start the shards' allgathers
        if _early(aggregator, exchange.replicas) and aggregator.min_workers(aggregator.f) <= p and (
                ordered or not transport.waits_from_any_thread):
            self.rule = aggregator.by_columns(p, None, aggregator.f)
        self.threaded = transport.waits_from_any_thread and (self.rule is not None or plan is not None)
        self.entries: dict[int, tuple] = {}  # index -> (handle, ctx, dtype, size, what was sent if kept)
        self.early: list[tuple] = []  # (handle, ctx, size) of each bucket's shards of the aggregate
        self.pieces: list[list[tuple[int, slice, torch.Tensor]]] = [[] for _ in exchange.held]  # per held chunk
        self.digests = [[hashlib.blake2b(digest_size=8) for _ in range(p)] for _ in exchange.held]
        self.partial = None if plan is None else _PartialGram(aggregator, p, len(exchange.held), sum(plan[0]),
                                                               self.compute, self.device)
        self.claims: tuple[torch.Tensor, torch.Tensor] | None = None
        self.unclaimed: dict[int, tuple] = {}  # index -> (wire before any lie, its ctx, size, splits), until claimed
        self.next = self.offset = self.held = 0
        self.arrived = self.busy = 0.0  # the last bucket's work done; seconds of bucket work
        self.error: Exception | None = None
        self.failed = ""  # the wait that failed
        self.cancelled = self.waiting = False
        self.lock = threading.Lock()

    def advance(self) -> None:
        """Wait for and work on every started bucket from the next one in index order."""
        transport = self.exchange.transport
        while self.error is None and self.next in self.entries:
            if self.next in self.unclaimed:  # the sender's word on what it sent, while that travels
                wire, ctx, size, splits = self.unclaimed.pop(self.next)
                try:
                    self.exchange._claim(self, self.exchange.compression.decompress(wire, ctx), size, splits)
                except Exception as exc:  # noqa: BLE001 - finish() raises it as it is
                    self.error = exc
                    return
            with self.lock:
                if self.cancelled:
                    return
                self.waiting = True
            try:
                wire = transport.wait(self.entries[self.next][0])
            except Exception as exc:  # noqa: BLE001 - finish() raises it, naming its step (raise_failure)
                self.error, self.failed = exc, f"bucket {self.next}"
                return
            with self.lock:
                self.waiting = False
                if self.cancelled:
                    return
                began = time.perf_counter()
                try:
                    self.exchange._arrive(self, self.next, wire)
                except Exception as exc:  # noqa: BLE001 - finish() raises it as it is
                    self.error = exc
                    return
                self.next += 1
            self.arrived = time.perf_counter()
            self.busy += self.arrived - began

    def raise_error(self, step: int) -> None:
        if self.error is not None:
            if self.failed:
                raise_failure(self.exchange.transport, self.error, step, self.failed)
            raise self.error

    def settle(self, device: torch.device) -> None:
        """Every bucket has started: the step's dtypes from all of them, its device from :meth:`finish`."""
        self.result, self.compute = _step_dtypes([dtype for _, _, dtype, _, _ in self.entries.values()])
        self.device = device

    def drain(self, step: int) -> None:
        """Wait out the early allgathers whose shards go unused (every rank started them)."""
        for handle, *_ in self.early:
            wait(self.exchange.transport, handle, step, "aggregate")
        self.early.clear()

    def abandon(self) -> bool:
        """Drop the step: nothing is touched after; the collectives not yet waited for are the
        transport's to forget. True when the worker is stuck in a wait (then a new one takes over)."""
        with self.lock:
            self.cancelled = True
            stuck = self.waiting
            left = [entry[0] for index, entry in self.entries.items() if index >= self.next]
        for handle in left + [handle for handle, *_ in self.early]:
            self.exchange.transport.abandon(handle)
        self.early.clear()
        return stuck


def _step_dtypes(dtypes: list[torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
    """The aggregate's dtype (the buckets' promoted) and the one it is computed in (fp16/bf16 in fp32)."""
    result = functools.reduce(torch.promote_types, dtypes, dtypes[0]) if dtypes else torch.float32
    return result, torch.float32 if result in HALF else result


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """``sum_k x_k^2`` in fp64 without an fp64 copy of ``x``: the products of fp32 or narrower values are exact
    there, summed in fp64, in pieces of :data:`CLAIM_PIECE` values; NaN or Inf anywhere makes it non-finite."""
    return sum(torch.linalg.vector_norm(piece, dtype=torch.float64).square() for piece in x.split(CLAIM_PIECE))


def _early(aggregator: Aggregator, replicas: int) -> bool:
    """Whether each bucket's shard of the aggregate can be computed, and its allgather started, as
    soon as the bucket's alltoall arrives: a rule whose every column depends on that column alone
    (no Gram: the mean, median, trimmed mean), with no state (bucketing's generator would draw
    again when a step falls back) and nothing to observe, one holder per shard."""
    return (replicas == 1 and not aggregator.uses_gram and not aggregator.state_dict()
            and type(aggregator).observe is Aggregator.observe)


class _PartialGram:
    """Step 2 for each held chunk, one bucket's piece at a time as the alltoalls arrive (in bucket
    order, so the sums are the same whenever they run): the partial Gram ``K_t`` of the pieces with
    the rule's anchors, and which rows are finite."""

    def __init__(self, aggregator: Aggregator, p: int, held: int, n: int, compute: torch.dtype,
                 device: torch.device):
        self.aggregator, self.p, self.compute = aggregator, p, compute
        self.anchors = aggregator.anchors(n, compute, device) if aggregator.uses_gram else None
        self.m = p + (0 if self.anchors is None else self.anchors.shape[0])
        # A row is finite iff its squared norm is: the Gram sums exact fp64 products of fp32 (or
        # narrower) values, which cannot overflow, so its diagonal saves the finite_rows passes.
        self.diagonal_flags = aggregator.uses_gram and compute != torch.float64
        self.finite = [torch.ones(p, dtype=torch.bool, device=device) for _ in range(held)]
        self.K = [torch.zeros(self.m, self.m, dtype=torch.float64, device=device) for _ in range(held)]

    def add(self, t: int, piece: torch.Tensor, cols: slice) -> None:
        block = piece.to(self.compute)
        if self.aggregator.robust and not self.diagonal_flags:
            self.finite[t] &= finite_rows(block)
        if self.aggregator.uses_gram:
            self.K[t] += anchored_gram(block, None if self.anchors is None else self.anchors[:, cols], exact=True)

    def result(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held chunk ``t``'s row flags and partial Gram, on the host."""
        finite, K = self.finite[t], self.K[t]
        if self.aggregator.robust and self.diagonal_flags:
            finite = finite & K.diagonal()[: self.p].isfinite()
        return finite.cpu(), K.cpu()


def replicated(replicas: int):
    """An ``exchange=`` factory for :func:`fa_hvd.DistributedOptimizer`: the sharded exchange with each
    shard computed by ``replicas`` ranks and compared."""
    return functools.partial(ShardedExchange, replicas=replicas)


def gather_bounds(total: int, pieces: int) -> list[int]:
    """The column bounds of the aggregate's allgather pieces (:meth:`ShardedExchange._gather`) for
    ``total`` columns of shards per rank: up to ``pieces``, none narrower than :data:`MIN_GATHER_PIECE`
    unless there is only one."""
    count = max(1, min(pieces, total // MIN_GATHER_PIECE))
    return [total * k // count for k in range(count + 1)]


def _copy_columns(dst: torch.Tensor, pieces: list[torch.Tensor], bounds: list[int], start: int, row: int) -> None:
    """``dst`` (``rows x w``) <- rows ``row, row + 1, ...`` of columns ``[start, start + w)`` of the
    gathered shards, whose piece ``k`` holds columns ``[bounds[k], bounds[k + 1])``."""
    rows, width = dst.shape
    for k, piece in enumerate(pieces):
        lo, hi = max(start, bounds[k]), min(start + width, bounds[k + 1])
        if lo < hi:
            dst[:, lo - start : hi - start] = piece[row : row + rows, lo - bounds[k] : hi - bounds[k]]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _signed(digest: bytes) -> int:
    return int.from_bytes(digest, "little", signed=True)


def _sum_in_order(partials: torch.Tensor) -> torch.Tensor:
    """``sum_s partials[s]`` in shard order: the same bits on every rank, whatever a reduction would do."""
    K = torch.zeros_like(partials[0])
    for partial in partials:
        K += partial
    return K
