"""Coordinate-wise trimmed mean.

Per coordinate ``j``, sort ``G_1j .. G_pj``, drop the ``f`` largest and the ``f``
smallest values and average the remaining ``p - 2f`` (added in sorted order, then
divided). Precondition ``p >= 2f + 1`` (at least one value survives the
trimming). The kept values come from a sorting network pruned to them
(:mod:`.selection`: compiled on the CPU, by column blocks otherwise).
Column-separable (:meth:`by_columns`).
"""

from __future__ import annotations

import functools

import torch

from .base import Aggregator
from .selection import Reduction, coordinatewise


class TrimmedAverage(Reduction):
    """The mean of sorted positions ``f .. q-f-1`` of ``q`` values, added in order, then divided."""

    def __init__(self, q: int, f: int):
        self.positions = tuple(range(f, q - f))

    def torch(self, values, out):
        out.copy_(values[0])
        for row in values[1:]:
            out.add_(row)
        out.div_(len(values))

    def c(self, values, ctype):
        return [f"result = {values[0]};", *[f"result += {v};" for v in values[1:]],
                f"result /= ({ctype}){len(values)};"]


@functools.lru_cache(maxsize=None)
def _reduction(q: int, f: int) -> TrimmedAverage:
    return TrimmedAverage(q, f)


def trimmed_mean(G: torch.Tensor, f: int, checked: bool = False) -> torch.Tensor | None:
    """Mean of the sorted values ``f .. p-f-1`` of every column of ``G`` (``checked``: see
    :func:`.selection.coordinatewise`)."""
    return coordinatewise(G, _reduction(G.shape[0], f), checked=checked)


class TrimmedMean(Aggregator):
    name = "trimmed_mean"
    columnwise = True
    uses_gram = False

    requires = (2, 1)  # p >= 2f + 1

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return trimmed_mean(G, f)

    def aggregate_if_finite(self, G: torch.Tensor, f: int) -> torch.Tensor | None:
        return trimmed_mean(G, f, checked=True)

    def by_columns(self, p: int, K, f: int):
        return lambda block, cols: trimmed_mean(block, f)
