"""Gradient exchanges beside the optimizer's allgather: how every rank's gradient becomes the aggregate.

:class:`~fa_hvd.exchange.sharded.ShardedExchange` (``exchange="sharded"``) aggregates
one shard of the coordinates per rank from a fixed-order sum of partial Gram
matrices: the traffic of a ring allreduce and O(n) memory, trusting each rank's
arithmetic on its shard (or checking it with ``replicas > 1``, :func:`replicated`).
:mod:`~fa_hvd.exchange.cost` models the traffic and memory of every exchange.
"""

from __future__ import annotations

from .sharded import ShardedExchange, ShardMismatch, replicated

__all__ = ["ShardedExchange", "ShardMismatch", "replicated"]
