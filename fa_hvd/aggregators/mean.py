"""Mean: ``agg(G) = (1/p) sum_i g_i``.

The baseline every robust rule is compared with. It is not robust: one
Byzantine worker can move it anywhere, and a non-finite row makes it non-finite.
Horovod's allreduce with ``op=hvd.Average`` computes the same thing.

Computed column by column as ``((g_0 + g_1) + ... + g_{p-1}) / p`` (:meth:`Mean.columns`:
elementwise additions and one division, IEEE-rounded whatever the vector width), so any split
of the columns gives the same bits: the allgather exchange takes the mean of each bucket as
it arrives, without copying it into a ``(p, n)`` matrix, with the bits of the whole
matrix's mean. (torch's ``G.mean(0)`` sums a block's tail columns in another order at
larger ``p``, so its bits depend on where the blocks end.)
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .geometry import column_chunks

BLOCK = 1 << 18  # columns per block: the running sum (1 MB in fp32) stays in a CPU's L2 cache


class Mean(Aggregator):
    name = "mean"
    robust = False
    gram_space = True
    uses_gram = False  # by columns: the mean of each block, no K (the sharded exchange skips it)

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)  # c = 1/p without forming K
        self.columns(G, out)
        return out

    @staticmethod
    def columns(rows: torch.Tensor, out: torch.Tensor) -> None:
        """``out``: the mean of ``rows`` (``(p, w)``), ``((g_0 + g_1) + ... + g_{p-1}) / p`` per column,
        :data:`BLOCK` columns at a time."""
        for cols in column_chunks(rows.shape[1], 1, BLOCK):
            _sum_in_order(rows[:, cols], out[cols])

    def by_columns(self, p: int, K, f: int):
        return lambda block, cols: self.aggregate(block, f)

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        p = K.shape[0]
        return torch.full((p,), 1.0 / p, dtype=torch.float64, device=K.device)


def _sum_in_order(rows: torch.Tensor, out: torch.Tensor) -> None:
    """``out = ((rows[0] + rows[1]) + ...) / p``: one elementwise operation at a time."""
    p = rows.shape[0]
    if p == 1:
        out.copy_(rows[0])
        return
    torch.add(rows[0], rows[1], out=out)
    for i in range(2, p):
        out.add_(rows[i])
    out.div_(p)
