"""Normalized mean: ``agg(G) = median_i ||g_i|| * (1/p) sum_i g_i / ||g_i||``.

Every gradient gets the same weight whatever its norm, and the result is
rescaled to the median norm (mean of the two middle norms for even ``p``), so
its norm never exceeds that median. A zero row contributes zero. No
precondition beyond ``p >= 1``; ``f`` is accepted for a uniform interface.
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .median import sorted_median


class NMean(Aggregator):
    name = "nmean"

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        norms = torch.linalg.vector_norm(G, dim=1)
        inverse = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
        return sorted_median(norms.sort().values) * (inverse @ G) / G.shape[0]
