"""Gradient exchanges: how every rank's gradient becomes the robust aggregate on every rank.

``make_exchange("allgather", ...)`` gathers every gradient on every rank (trusts no
rank; ``(p - 1) n`` values received and ``p n`` held per rank);
``make_exchange("sharded", ...)`` aggregates one shard of the coordinates per rank
from a fixed-order sum of partial Gram matrices (the traffic of a ring allreduce,
O(n) memory; trusts each rank's arithmetic on its shard, or checks it with
``replicas > 1``). Both take the optimizer's buckets one at a time
(:class:`~fa_hvd.exchange.base.Exchange`).
"""

from __future__ import annotations

from .allgather import AllgatherExchange
from .base import Exchange
from .sharded import ShardedExchange, ShardMismatch

EXCHANGES = ("allgather", "sharded")


def make_exchange(kind: str, transport, aggregator, sizes: list[int], compression=None, name: str = "fa_hvd",
                  replicas: int = 1) -> Exchange:
    """The exchange ``kind`` (:data:`EXCHANGES`) for buckets of ``sizes`` elements."""
    if kind == "allgather":
        if replicas != 1:
            raise ValueError("fa_hvd: replicas applies to exchange='sharded' only")
        return AllgatherExchange(transport, aggregator, sizes, compression, name)
    if kind == "sharded":
        return ShardedExchange(transport, aggregator, sizes, compression, name, replicas)
    raise ValueError(f"fa_hvd: exchange must be one of {', '.join(EXCHANGES)}, got {kind!r}")


__all__ = ["Exchange", "AllgatherExchange", "ShardedExchange", "ShardMismatch", "make_exchange", "EXCHANGES"]
