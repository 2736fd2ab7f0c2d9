"""Gradient exchanges: how every rank's gradient becomes the aggregate.

:class:`~fa_hvd.exchange.allgather.AllgatherExchange` (``exchange="allgather"``, the
default) gathers every rank's gradient and lets every rank apply the rule: it trusts
no rank's arithmetic. :class:`~fa_hvd.exchange.sharded.ShardedExchange`
(``exchange="sharded"``) aggregates one shard of the coordinates per rank from a
fixed-order sum of partial Gram matrices: the traffic of a ring allreduce and O(n)
memory, checking what each rank reports about its shard as far as the arithmetic
allows (or comparing copies with ``replicas > 1``, :func:`replicated`).
:mod:`~fa_hvd.exchange.cost` models the traffic and memory of every exchange;
:mod:`~fa_hvd.exchange.base` holds what they share.
"""

from __future__ import annotations

from typing import Callable

from .allgather import AllgatherExchange
from .base import GradientExchange, agree_on_compiled_kernels, rule_name, wait
from .sharded import ShardedExchange, ShardMismatch, replicated

EXCHANGES: dict[str, Callable[..., GradientExchange]] = {"allgather": AllgatherExchange, "sharded": ShardedExchange}

__all__ = ["EXCHANGES", "AllgatherExchange", "GradientExchange", "ShardedExchange", "ShardMismatch", "replicated",
           "agree_on_compiled_kernels", "rule_name", "wait"]
