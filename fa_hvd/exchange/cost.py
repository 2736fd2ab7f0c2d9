"""The cost model of the exchanges: bytes per rank per step and the exchange's own memory.

For buckets of ``n_b`` gradient values (``n`` in all) of ``element_size`` bytes on
``p`` ranks (ring algorithms, as Gloo and NCCL run them; ``W = sum_b ceil(n_b / p)``,
about ``n / p``):

* Horovod's allreduce (ring: reduce-scatter, then allgather): ``2 (p - 1) n / p``
  values sent and received.
* allgather exchange (ring allgather): ``(p - 1) n`` values sent and received; the
  exchange holds the gathered buckets and their concatenation, ``2 p n`` values.
* sharded exchange: the alltoall, ``(p - 1) W`` values out and in (``k`` times that
  with ``replicas = k``), the allgather of the aggregate's shards, ``(p - 1) k W``,
  and the allgather of the packed partial Grams, ``(p - 1) k L`` eight-byte words
  with ``L = p + (p + a)(p + a + 1) / 2`` (row flags, the upper triangle; ``a`` the
  rule's anchors, 1 for cclip; ``k > 1`` adds ``p`` digests), plus, for a robust
  rule, the rank's ``2 p`` words of claims on its own row (:mod:`.evidence`). It holds what it
  received (``k p W``), its shards of the aggregate (``k W``), the gathered shards
  (``k p W``) and the aggregate in bucket order (``n``): about ``(2 k + 1) n``
  values; with ``k > 1`` also its send buffers (``k n``) and contiguous copies of
  the received chunks (``k p W``).

With ``digest`` (the in-step check, ``DistributedOptimizer(digest=True)``) both
exchanges add one allgather of one 8-byte word per rank, ``8 (p - 1)`` bytes, for
the aggregate's digest (:mod:`.digest`); the trainer's deferred digest adds none
here (three words in its control row).

These are models; :mod:`fa_hvd.comm.traffic` counts what really went over TCP.
"""

from __future__ import annotations

import math


def exchange_cost(kind: str, sizes: list[int] | int, p: int, element_size: int = 4, replicas: int = 1,
                  anchors: int = 0, robust: bool = True, digest: bool = False) -> dict:
    """``{"bytes_sent", "bytes_received", "memory_bytes"}`` per rank per step for ``kind``.

    ``kind``: ``"allreduce"`` (Horovod's), ``"allgather"`` or ``"sharded"``; ``sizes``: the
    buckets' lengths (or one length).
    """
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    n = sum(sizes)
    if kind == "allreduce":
        wire = 2 * (p - 1) * n * element_size / p
        return {"bytes_sent": wire, "bytes_received": wire, "memory_bytes": n * element_size}
    digest_bytes = 8 * (p - 1) if digest else 0
    if kind == "allgather":
        wire = (p - 1) * n * element_size + digest_bytes
        return {"bytes_sent": wire, "bytes_received": wire, "memory_bytes": 2 * p * n * element_size}
    if kind == "sharded":
        width = sum(math.ceil(size / p) for size in sizes)
        m = p + anchors
        words = p + m * (m + 1) // 2 + (p if replicas > 1 else 0)
        claims = 2 * p if robust else 0
        wire = 2 * (p - 1) * replicas * width * element_size + (p - 1) * (replicas * words + claims) * 8 + digest_bytes
        values = (2 * p + 1) * replicas * width + n
        if replicas > 1:
            values += replicas * n + replicas * p * width
        return {"bytes_sent": wire, "bytes_received": wire, "memory_bytes": values * element_size}
    raise ValueError(f"unknown exchange {kind!r}: allreduce, allgather or sharded")
