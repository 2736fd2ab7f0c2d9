"""Mean: ``agg(G) = (1/p) sum_i g_i``.

The baseline every robust rule is compared with. It is not robust: one
Byzantine worker can move it anywhere, and a non-finite row makes it non-finite.
Horovod's allreduce with ``op=hvd.Average`` computes the same thing.
"""

from __future__ import annotations

import torch

from .base import Aggregator


class Mean(Aggregator):
    name = "mean"
    robust = False
    gram_space = True
    uses_gram = False  # by columns: the mean of each block, no K (the sharded exchange skips it)

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return G.mean(dim=0)  # c = 1/p without forming K

    def by_columns(self, p: int, K, f: int):
        return lambda block, cols: block.mean(dim=0)

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        p = K.shape[0]
        return torch.full((p,), 1.0 / p, dtype=torch.float64, device=K.device)
