"""Mean: ``agg(G) = (1/p) sum_i g_i``.

The baseline every robust rule is compared with. It is not robust: one
Byzantine worker can move it anywhere, and a non-finite row makes it non-finite.
Horovod's allreduce with ``op=hvd.Average`` computes the same thing.

Computed in fixed column blocks (:meth:`Mean.blocks`, cut from column 0), each block
``G[:, cols].mean(0)``: torch's column mean of a block can differ in the last bit from
the same columns of the whole matrix's mean (where its kernel treats a block's tail
differently, at larger ``p``), so fixing the blocks lets the allgather exchange take the
mean of each block as soon as its bucket arrives with the same bits as the mean of the
whole matrix.
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .geometry import column_chunks

BLOCK = 1 << 20  # elements of G per block (a few MB: few calls, each in cache)


class Mean(Aggregator):
    name = "mean"
    robust = False
    gram_space = True
    uses_gram = False  # by columns: the mean of each block, no K (the sharded exchange skips it)

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)  # c = 1/p without forming K
        for cols in self.blocks(*G.shape):
            self.block_mean(G, cols, out)
        return out

    @staticmethod
    def blocks(p: int, n: int) -> list[slice]:
        """The fixed column blocks of a ``(p, n)`` matrix."""
        return list(column_chunks(n, p, BLOCK))

    @staticmethod
    def block_mean(G: torch.Tensor, cols: slice, out: torch.Tensor) -> None:
        """``out[cols]``: the mean of ``G[:, cols]``'s rows."""
        torch.mean(G[:, cols], dim=0, out=out[cols])

    def by_columns(self, p: int, K, f: int):
        return lambda block, cols: block.mean(dim=0)

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        p = K.shape[0]
        return torch.full((p,), 1.0 / p, dtype=torch.float64, device=K.device)
