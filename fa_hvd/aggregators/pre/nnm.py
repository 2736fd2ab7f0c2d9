"""Nearest-neighbour mixing (Allouah et al., AISTATS 2023).

Row ``i`` is replaced by the mean of its ``p - f`` nearest rows by squared
distance, itself included (ties by lowest index). Computed as one ``(p, p)``
mixing matrix times ``G``, from one Gram matrix. ``p' = p``; needs ``p > f``.
"""

from __future__ import annotations

import torch

from ..base import PreAggregator
from ..geometry import sq_distances


class NNM(PreAggregator):
    name = "nnm"

    def check(self, p: int, f: int) -> None:
        if p <= f:
            raise ValueError(f"{self.name}: needs p > f (p - f nearest neighbours), got p={p}, f={f}")

    def transform(self, G: torch.Tensor, f: int) -> torch.Tensor:
        p = G.shape[0]
        q = p - f
        nearest = torch.sort(sq_distances(G), dim=1, stable=True).indices[:, :q]
        mixing = torch.zeros(p, p, dtype=G.dtype, device=G.device)
        mixing.scatter_(1, nearest, 1.0 / q)
        return mixing @ G
