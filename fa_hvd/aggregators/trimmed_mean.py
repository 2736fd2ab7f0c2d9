"""Coordinate-wise trimmed mean.

Per coordinate ``j``, sort ``G_1j .. G_pj``, drop the ``f`` largest and the ``f``
smallest values and average the remaining ``p - 2f`` (summed in sorted order,
then divided). Precondition ``p >= 2f + 1`` (at least one value survives the
trimming). The kept values come from a sorting network pruned to them, one
cache-sized block of columns at a time (:mod:`.selection`). Column-separable
(:meth:`by_columns`).
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .selection import coordinatewise


def trimmed_mean(G: torch.Tensor, f: int) -> torch.Tensor:
    """Mean of the sorted values ``f .. p-f-1`` of every column of ``G``."""
    p = G.shape[0]

    def average(rows: list[torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(rows[0])
        for row in rows[1:]:
            out.add_(row)
        out.div_(len(rows))

    return coordinatewise(G, range(f, p - f), average)


class TrimmedMean(Aggregator):
    name = "trimmed_mean"
    columnwise = True
    uses_gram = False

    requires = (2, 1)  # p >= 2f + 1

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return trimmed_mean(G, f)

    def by_columns(self, p: int, K, f: int):
        return lambda block, cols: trimmed_mean(block, f)
