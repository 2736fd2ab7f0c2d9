"""Sharded exchange: the robust aggregate at the traffic of one ring allreduce, O(n) memory per rank.

The gradient's ``n`` coordinates are cut into ``p`` contiguous shards of
``W = ceil(n / p)`` (the last ones shorter); rank ``j`` owns shard ``j``.

1. alltoall, one per bucket as it is submitted: rank ``j`` receives shard ``j`` of
   every rank's gradient, ``G_j`` (``p x W``, rows in rank order).
2. Rank ``j`` computes its partial Gram ``K_j = G_j G_j^T`` (fp64, with the rule's
   anchors appended, e.g. cclip's centre; :func:`~fa_hvd.aggregators.base.anchored_gram`)
   and the finiteness of each row of ``G_j``.
3. One allgather of the packed ``K_j`` and flags (``p (p + 1) / 2 + p`` values per
   rank); every rank sums the ``K_j`` in shard order in fp64, so ``K`` is bit for bit
   the same everywhere whatever the collective's own summation order would be.
4. Every rank applies the finite-row policy (:func:`~fa_hvd.aggregators.base.surviving_rows`:
   a row non-finite in any shard is dropped and counted against ``f``) and turns
   ``K`` into the rule's column form (:meth:`~fa_hvd.aggregators.base.Aggregator.by_columns`):
   coefficients ``c`` for Gram rules, Bulyan's selection, cclip's ``(a, c)``; the
   coordinate-wise rules need no ``K`` at all.
5. Rank ``j`` computes its shard of the aggregate, ``a_j = c^T G_j`` (or the
   coordinate-wise rule on ``G_j``), and an allgather of the ``a_j`` gives the
   aggregate on every rank (only one copy of each ``a_j`` exists, so every rank
   holds the same bits).

Traffic per rank: ``(p - 1) W`` values out and in for the alltoall, the same for
the allgather, plus ``p (p^2 + 3p) / 2`` fp64 values for the Gram: ``2 n (p - 1) / p``
values for the gradient, a ring allreduce's. Memory: ``n`` values received plus
``n`` gathered. Compute per rank: ``O(n p)`` for the Gram instead of ``O(n p^2)``.
With ``compression`` (Horovod's ``Compression.fp16``) both the alltoall and the
allgather of the aggregate travel compressed, as in Horovod's allreduce.

Trust: every rank's gradient may be anything (the rule sees it), but each rank is
trusted to compute its partial Gram and its shard of the aggregate honestly.
``replicas = k > 1`` buys that trust back at ``k`` times the traffic: shard ``s`` is
held by ranks ``s, s + 1, ..., s + k - 1`` (mod ``p``); they exchange the digest of
every chunk they received (BLAKE2b), their partial Grams and flags, and their
shards of the aggregate, and every rank compares the copies bit for bit. A
mismatch raises :class:`ShardMismatch` on every rank alike, naming the ranks.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..aggregators.base import Aggregator, Rows, anchored_gram, finite_rows, surviving_rows
from .base import Exchange, noted

HALF = (torch.float16, torch.bfloat16)


class ShardMismatch(RuntimeError):
    """Replicas of a shard disagree: a rank computed or reported its shard differently."""


class ShardedExchange(Exchange):
    kind = "sharded"

    def __init__(self, transport, aggregator, sizes, compression=None, name="fa_hvd", replicas: int = 1):
        super().__init__(transport, aggregator, sizes, compression, name)
        if not isinstance(aggregator, Aggregator) or not aggregator.columnwise:
            rule = getattr(aggregator, "name", repr(aggregator))
            raise ValueError(
                f"fa_hvd: exchange='sharded' needs a rule computable by column blocks (Gram rules, median, "
                f"trimmed_mean, bulyan, cclip and their compositions), got {rule!r}; use exchange='allgather'"
            )
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"fa_hvd: replicas must be a positive integer, got {replicas!r}")
        self.replicas = replicas
        self.n = sum(self.sizes)
        self.p = self.rank = None
        self._follow_world()
        offsets = [0]
        for size in self.sizes:
            offsets.append(offsets[-1] + size)
        self.offsets = offsets
        self._pending: list = []
        self._dtypes: list[torch.dtype] = []

    # -- layout -------------------------------------------------------------------------
    def _follow_world(self) -> None:
        """Shards from the transport's rank and size (read at each step's first bucket: elastic resets)."""
        p, rank = self.transport.size, self.transport.rank
        if (p, rank) == (self.p, self.rank):
            return
        if self.replicas > p:
            raise ValueError(f"fa_hvd: replicas={self.replicas} needs at least as many ranks, got {p}")
        self.p, self.rank = p, rank
        self.width = max(1, math.ceil(self.n / p))
        self.held = [(rank - t) % p for t in range(self.replicas)]  # shards this rank computes

    def shard(self, s: int) -> tuple[int, int]:
        """Coordinates ``[start, stop)`` of shard ``s``."""
        return min(s * self.width, self.n), min((s + 1) * self.width, self.n)

    def piece(self, index: int, s: int) -> tuple[int, int]:
        """Bucket ``index``'s part of shard ``s``, in the bucket's own coordinates."""
        lo, hi = self.offsets[index], self.offsets[index + 1]
        start, stop = self.shard(s)
        start, stop = max(start, lo), min(stop, hi)
        return (start - lo, stop - lo) if start < stop else (0, 0)

    def holders(self, s: int) -> list[int]:
        """Ranks that compute shard ``s``, the first one's copy is used."""
        return [(s + t) % self.p for t in range(self.replicas)]

    # -- 1. alltoall -------------------------------------------------------------------------
    def submit(self, index: int, flat: torch.Tensor) -> None:
        flat = self._check_submit(index, flat, len(self._pending))
        if index == 0:
            self._follow_world()
        self._dtypes.append(flat.dtype)
        self._device = flat.device
        parts, splits = [], []
        for rank in range(self.p):
            ranges = [self.piece(index, (rank - t) % self.p) for t in range(self.replicas)]
            parts += [flat[a:b] for a, b in ranges]
            splits.append(sum(b - a for a, b in ranges))
        send = flat if self.replicas == 1 else torch.cat(parts)  # k = 1: the shards in rank order
        wire, ctx = self.compression.compress(send)
        mine = [self.piece(index, s) for s in self.held]
        received = sum(b - a for a, b in mine)
        try:
            handle = self.transport.alltoall_async(wire, splits, name=f"{self.name}.a2a{index}",
                                                   received=[received] * self.p)
        except Exception as exc:
            raise noted(exc, f"alltoall of bucket {index}")
        self._pending.append((handle, ctx, send if self.replicas > 1 else None))

    # -- 2 .. 5 --------------------------------------------------------------------------------
    def result(self) -> torch.Tensor:
        if len(self._pending) != len(self.sizes):
            raise RuntimeError(f"fa_hvd exchange: {len(self._pending)} of {len(self.sizes)} buckets submitted")
        if not self.sizes:
            return torch.zeros(0)
        pending, self._pending = self._pending, []
        work, self._dtypes = _WorkDtypes(self._dtypes), []
        device = self._device
        held_bytes = sum(s.numel() * s.element_size() for _, _, s in pending if s is not None)
        pieces: list[list[tuple[slice, torch.Tensor]]] = [[] for _ in self.held]  # per held shard
        digests = [[hashlib.blake2b(digest_size=8) for _ in range(self.p)] for _ in self.held]
        for index, (handle, ctx, _) in enumerate(pending):
            try:
                wire = self.transport.wait(handle)
            except Exception as exc:
                raise noted(exc, f"alltoall of bucket {index}")
            chunks = wire.reshape(self.p, -1)  # row i: what rank i sent here
            values = self.compression.decompress(chunks, ctx)
            held_bytes += wire.numel() * wire.element_size()
            if values.data_ptr() != wire.data_ptr():
                held_bytes += values.numel() * values.element_size()
            column = 0
            for t, s in enumerate(self.held):
                a, b = self.piece(index, s)
                if b > a:
                    start = self.offsets[index] + a
                    piece = values[:, column : column + b - a]
                    if self.replicas > 1:  # replicas compare bits: the same memory layout on every holder
                        piece = piece.contiguous()
                        held_bytes += piece.numel() * piece.element_size()
                    pieces[t].append((slice(start, start + b - a), piece))
                    if self.replicas > 1:
                        for source in range(self.p):
                            chunk = chunks[source, column : column + b - a].contiguous().view(torch.uint8)
                            digests[t][source].update(chunk.cpu().numpy())
                column += b - a
        del pending
        K, finite = self._gram(pieces, digests, work, device)
        rows = surviving_rows(finite, self.aggregator.f) if self.aggregator.robust else Rows(None, self.aggregator.f)
        if rows.none_left:
            self.stats = {"peak_bytes": held_bytes}
            return torch.zeros(self.n, dtype=work.result, device=device)
        p_kept = self.p if rows.keep is None else rows.keep.numel()
        self.aggregator.check(p_kept, rows.f)
        if K is not None and rows.keep is not None:
            keep = torch.cat([rows.keep, torch.arange(self.p, K.shape[0])])  # anchors stay
            K = K[keep][:, keep]
        rule = self.aggregator.by_columns(p_kept, K, rows.f)
        out = torch.zeros(self.replicas, self.width, dtype=work.result, device=device)
        for t, shard in enumerate(pieces):
            base = self.shard(self.held[t])[0]
            for cols, piece in shard:
                block = piece if rows.keep is None else piece[rows.keep.to(piece.device)]
                local = slice(cols.start - base, cols.stop - base)
                out[t, local] = rule(block.to(work.compute), cols)
        held_bytes += out.numel() * out.element_size()
        aggregate, gathered_bytes = self._gather(out)
        self.stats = {"peak_bytes": held_bytes + gathered_bytes}
        self.aggregator.observe(aggregate)
        return aggregate

    def _gram(self, pieces, digests, work, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Steps 2 and 3: ``K`` (fp64, summed in shard order; None if the rule needs none) and the row flags.

        Both are built on the gradients' device and cross to the host once per shard; the
        rule's ``p x p`` work then runs on the CPU (no device synchronisation per iteration).
        """
        p, aggregator = self.p, self.aggregator
        anchors = aggregator.anchors(self.n, work.compute, device) if aggregator.uses_gram else None
        m = p + (0 if anchors is None else anchors.shape[0])
        upper = torch.triu_indices(m, m)
        packed = []
        for t, shard in enumerate(pieces):
            finite = torch.ones(p, dtype=torch.bool, device=device)
            K = torch.zeros(m, m, dtype=torch.float64, device=device)
            for cols, piece in shard:
                block = piece.to(work.compute)
                if aggregator.robust:
                    finite &= finite_rows(block)
                if aggregator.uses_gram:
                    K += anchored_gram(block, None if anchors is None else anchors[:, cols])
            finite, K = finite.cpu(), K.cpu()
            fields = [finite.long()]
            if self.replicas > 1:
                fields.append(torch.tensor([_signed(d.digest()) for d in digests[t]], dtype=torch.int64))
            if aggregator.uses_gram:
                fields.append(K[upper[0], upper[1]].view(torch.int64))
            packed.append(torch.cat(fields))
        mine = torch.cat(packed)
        try:
            everyone = self.transport.allgather(mine.reshape(1, -1), name=f"{self.name}.gram")
        except Exception as exc:
            raise noted(exc, "allgather of the partial Grams")
        length = mine.numel() // self.replicas
        finite = torch.ones(p, dtype=torch.bool)
        K = torch.zeros(m, m, dtype=torch.float64) if aggregator.uses_gram else None
        for s in range(p):  # fixed order: the same sum, bit for bit, on every rank
            copies = [everyone[h, t * length : (t + 1) * length] for t, h in enumerate(self.holders(s))]
            if self.replicas > 1:
                self._compare_partials(s, copies)
            finite &= copies[0][:p].bool()
            if K is not None:
                partial = torch.zeros(m, m, dtype=torch.float64)
                partial[upper[0], upper[1]] = copies[0][-upper.shape[1] :].view(torch.float64)
                K += partial + partial.triu(1).T
        return K, finite

    def _compare_partials(self, s: int, copies: list[torch.Tensor]) -> None:
        p, holders = self.p, self.holders(s)
        for source in range(p):
            seen = {int(c[p + source]) for c in copies}
            if len(seen) > 1:
                raise ShardMismatch(
                    f"fa_hvd: sharded exchange: ranks {holders} received different data from rank {source} "
                    f"for shard {s}: rank {source} sent different chunks to the replicas, or one of "
                    f"{holders} misreports what it received"
                )
        _require_agreement(copies, holders, f"the partial Gram and row flags of shard {s}")

    def _gather(self, out: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Step 5: allgather the shards of the aggregate; ``(aggregate, bytes held)``."""
        wire, ctx = self.compression.compress(out.reshape(1, -1))
        try:
            gathered = self.transport.allgather(wire, name=f"{self.name}.out")
        except Exception as exc:
            raise noted(exc, "allgather of the aggregate")
        values = self.compression.decompress(gathered, ctx).reshape(self.p, self.replicas, self.width)
        held = gathered.numel() * gathered.element_size()
        if values.data_ptr() != gathered.data_ptr():
            held += values.numel() * values.element_size()
        if self.replicas > 1:  # holder (s + t) % p's copy of shard s sits in its slot t
            for s in range(self.p):
                copies = [values[h, t] for t, h in enumerate(self.holders(s))]
                _require_agreement(copies, self.holders(s), f"shard {s} of the aggregate")
        return values[:, 0].reshape(-1)[: self.n], held



class _WorkDtypes:
    """The aggregate's dtype (what ``torch.cat`` of the buckets gives, as in allgather mode) and the rules'."""

    def __init__(self, dtypes: list[torch.dtype]):
        result = dtypes[0]
        for dtype in dtypes[1:]:
            result = torch.promote_types(result, dtype)
        self.result = result
        self.compute = torch.float32 if result in HALF else result  # fp16/bf16 computed in fp32


def _signed(digest: bytes) -> int:
    return int.from_bytes(digest, "little", signed=True)


def _require_agreement(copies: list[torch.Tensor], ranks: list[int], what: str) -> None:
    """Raise :class:`ShardMismatch` unless every copy has the same bits, naming the odd ranks out."""
    bits = [c.contiguous().view(torch.uint8) for c in copies]
    groups: list[list[int]] = []
    for i, b in enumerate(bits):
        for group in groups:
            if torch.equal(bits[group[0]], b):
                group.append(i)
                break
        else:
            groups.append([i])
    if len(groups) == 1:
        return
    groups.sort(key=len, reverse=True)
    if len(groups[0]) * 2 > len(copies):
        odd = sorted(ranks[i] for group in groups[1:] for i in group)
        blame = f"rank(s) {odd} disagree with the majority {sorted(ranks[i] for i in groups[0])}"
    else:
        blame = f"ranks {ranks} disagree with no majority"
    raise ShardMismatch(f"fa_hvd: sharded exchange: {what}: {blame}")
