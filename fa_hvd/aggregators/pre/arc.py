"""Adaptive robust clipping (Allouah et al., 2024).

With ``k = floor(2 (f / p) (p - f))``, every row is clipped to the ``(k+1)``-th
largest row norm, so the ``k`` largest rows are cut down to it and the others
are unchanged (``k = 0``: nothing changes). ``p' = p``; a diagonal mixing matrix
from the norms ``sqrt(K_ii)``.
"""

from __future__ import annotations

import torch

from ..base import PreAggregator
from .clip import clip_mixing


class ARC(PreAggregator):
    name = "arc"

    def mixing(self, p: int, K: torch.Tensor | None, f: int) -> torch.Tensor:
        k = min(max(2 * f * (p - f) // p, 0), p - 1)
        if k == 0:
            return torch.eye(p, dtype=torch.float64, device=K.device)
        tau = K.diagonal().clamp_min(0).sqrt().sort(descending=True).values[k]
        return clip_mixing(K, tau)
