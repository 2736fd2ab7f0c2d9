"""Coordinate-wise trimmed mean.

Per coordinate ``j``, sort ``G_1j .. G_pj``, drop the ``f`` largest and the ``f``
smallest values and average the remaining ``p - 2f``. Precondition
``p >= 2f + 1`` (at least one value survives the trimming). Sorting is done one
block of columns at a time (see :func:`.median.coordinatewise`).
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .median import coordinatewise


class TrimmedMean(Aggregator):
    name = "trimmed_mean"

    requires = (2, 1)  # p >= 2f + 1

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        p = G.shape[0]
        return coordinatewise(G, lambda S: S[f : p - f].mean(dim=0))
