"""Coordinate-wise median: ``agg(G)_j = median_i G_ij``.

For even ``p`` the median of a coordinate is the mean of its two middle values
(``torch.median`` would return the lower one); this keeps the rule symmetric.
Robust for ``p >= 2f + 1``: a majority of honest values brackets the median.

Coordinates are sorted one block of columns at a time (:func:`coordinatewise`),
so the extra memory is O(``CHUNK_BUDGET``) elements, never O(p n) on top of G.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Aggregator
from .geometry import column_chunks

CHUNK_BUDGET = 1 << 22
"""Elements sorted at once by the coordinate-wise rules (median, trimmed mean, Bulyan)."""


def sorted_median(S: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 of ``S``, already sorted along dim 0 (mean of the middles for even length)."""
    q = S.shape[0]
    return (S[(q - 1) // 2] + S[q // 2]) / 2


def coordinatewise(G: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``out[cols] = reduce(sort(G[:, cols], dim=0))`` over column blocks, into one ``(n,)`` output."""
    p, n = G.shape
    out = torch.empty(n, dtype=G.dtype, device=G.device)
    for cols in column_chunks(n, p, CHUNK_BUDGET):
        out[cols] = reduce(G[:, cols].sort(dim=0).values)
    return out


class Median(Aggregator):
    name = "median"

    requires = (2, 1)  # p >= 2f + 1

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return coordinatewise(G, sorted_median)
