"""Coordinate-wise median: ``agg(G)_j = median_i G_ij``.

For even ``p`` the median of a coordinate is the mean of its two middle values
(``torch.median`` would return the lower one); this keeps the rule symmetric.
Robust for ``p >= 2f + 1``: a majority of honest values brackets the median.

The middle values come from a sorting network pruned to them (:mod:`.selection`):
compiled, one pass over ``G``, on the CPU; by cache-sized column blocks otherwise.
Extra memory O(block), never O(p n).

Column-separable: the aggregate of a block of columns is the rule applied to
those columns alone (:meth:`by_columns`), which the sharded exchange relies on.
"""

from __future__ import annotations

import functools

import torch

from .base import Aggregator
from .selection import Reduction, coordinatewise


def sorted_median(S: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 of ``S``, already sorted along dim 0 (mean of the middles for even length)."""
    q = S.shape[0]
    return (S[(q - 1) // 2] + S[q // 2]) / 2


class MiddleValues(Reduction):
    """The median of ``q`` sorted values: the middle one, or the mean of the two middle ones."""

    def __init__(self, q: int):
        self.positions = (q // 2,) if q % 2 else (q // 2 - 1, q // 2)

    def torch(self, values, out):
        if len(values) == 1:
            out.copy_(values[0])
        else:
            torch.add(values[0], values[1], out=out).div_(2)

    def c(self, values, ctype):
        return [f"result = {values[0]};" if len(values) == 1 else f"result = ({values[0]} + {values[1]}) / 2;"]


@functools.lru_cache(maxsize=None)
def middle_values(q: int) -> MiddleValues:
    return MiddleValues(q)


def median(G: torch.Tensor, checked: bool = False) -> torch.Tensor | None:
    """Coordinate-wise median of ``G`` (``(p, n)``), as :func:`sorted_median` of each sorted column
    (``checked``: see :func:`.selection.coordinatewise`)."""
    return coordinatewise(G, middle_values(G.shape[0]), checked=checked)


class Median(Aggregator):
    name = "median"
    columnwise = True
    uses_gram = False

    requires = (2, 1)  # p >= 2f + 1

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return median(G)

    def aggregate_if_finite(self, G: torch.Tensor, f: int) -> torch.Tensor | None:
        return median(G, checked=True)

    def by_columns(self, p: int, K, f: int):
        return lambda block, cols: median(block)
