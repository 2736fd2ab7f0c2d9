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

    def mixing(self, p: int, K: torch.Tensor | None, f: int) -> torch.Tensor:
        q = p - f
        nearest = torch.sort(sq_distances(K=K), dim=1, stable=True).indices[:, :q]
        M = torch.zeros(p, p, dtype=torch.float64, device=K.device)
        return M.scatter_(1, nearest, 1.0 / q)
