"""Normalized mean: ``agg(G) = median_i ||g_i|| * (1/p) sum_i g_i / ||g_i||``.

Every gradient gets the same weight whatever its norm, and the result is
rescaled to the median norm (mean of the two middle norms for even ``p``), so
its norm never exceeds that median. A zero row contributes zero. No
precondition beyond ``p >= 1``; ``f`` is accepted for a uniform interface.

In Gram space: ``c_i = median_j ||g_j|| / (p ||g_i||)`` with ``||g_i||^2 = K_ii``.
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .median import sorted_median


class NMean(Aggregator):
    name = "nmean"
    gram_space = True

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        norms = K.diagonal().clamp_min(0).sqrt()
        inverse = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
        return sorted_median(norms.sort().values) * inverse / K.shape[0]
