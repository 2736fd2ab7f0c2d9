"""Adaptive robust clipping (Allouah et al., 2024).

With ``k = floor(2 (f / p) (p - f))``, every row is clipped to the ``(k+1)``-th
largest row norm, so the ``k`` largest rows are cut down to it and the others
are unchanged (``k = 0``: nothing changes). ``p' = p``.
"""

from __future__ import annotations

import torch

from ..base import PreAggregator
from .clip import clip_rows


class ARC(PreAggregator):
    name = "arc"

    def transform(self, G: torch.Tensor, f: int) -> torch.Tensor:
        p = G.shape[0]
        k = min(max(2 * f * (p - f) // p, 0), p - 1)
        if k == 0:
            return G
        norms = torch.linalg.vector_norm(G, dim=1)
        tau = norms.sort(descending=True).values[k]
        return clip_rows(G, tau)
