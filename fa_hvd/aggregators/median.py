"""Coordinate-wise median: ``agg(G)_j = median_i G_ij``.

For even ``p`` the median of a coordinate is the mean of its two middle values
(``torch.median`` would return the lower one); this keeps the rule symmetric.
Robust for ``p >= 2f + 1``: a majority of honest values brackets the median.

The middle values come from a sorting network pruned to them, run one cache-sized
block of columns at a time (:mod:`.selection`): a few passes over ``G``, extra
memory O(block), never O(p n).

Column-separable: the aggregate of a block of columns is the rule applied to
those columns alone (:meth:`by_columns`), which the sharded exchange relies on.
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .selection import coordinatewise


def sorted_median(S: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 of ``S``, already sorted along dim 0 (mean of the middles for even length)."""
    q = S.shape[0]
    return (S[(q - 1) // 2] + S[q // 2]) / 2


def median(G: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of ``G`` (``(p, n)``), as :func:`sorted_median` of each sorted column."""
    p = G.shape[0]
    if p % 2:
        return coordinatewise(G, [p // 2], lambda rows, out: out.copy_(rows[0]))
    return coordinatewise(G, [p // 2 - 1, p // 2], lambda rows, out: torch.add(*rows, out=out).div_(2))


class Median(Aggregator):
    name = "median"
    columnwise = True
    uses_gram = False

    requires = (2, 1)  # p >= 2f + 1

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return median(G)

    def by_columns(self, p: int, K, f: int):
        return lambda block, cols: median(block)
