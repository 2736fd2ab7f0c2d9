"""Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018).

1. Selection: pick ``theta = p - 2f`` gradients one at a time by Krum, each time
   rescoring only the rows not yet picked (``q - f - 2`` neighbours among the
   ``q`` remaining, at least 1; see :func:`.krum.krum_scores`). Ties go to the
   lowest index. All scores index one shared squared-distance matrix, from the
   Gram matrix ``K``.
2. Aggregation: per coordinate, average the ``beta = theta - 2f`` selected values
   closest to the coordinate-wise median of the selection (median as in
   :mod:`.median`, ties in closeness by sorted position).

Phase 2 at memory speed: in a sorted column the distances to the median fall,
then rise, so the farthest remaining value is always at one end. The ``2f``
values left out are removed from the ends, one at a time, the farther end first
(ties: the upper end, which has the higher sorted position); the ``beta`` values
left are a window of the sorted column, summed directly (no running sums, which
would cancel against huge values) and divided by ``beta``. The sorted values come
from a sorting network over cache-sized column blocks (:mod:`.selection`).

By column blocks (:meth:`by_columns`): the selection needs only ``K``, the second
phase only the selected rows of the block. Precondition ``p >= 4f + 3``.
"""

from __future__ import annotations

import torch

from .base import Aggregator, ColumnRule
from .geometry import gram, sq_distances
from .krum import krum_order
from .selection import coordinatewise


def bulyan_selection(K: torch.Tensor, f: int) -> list[int]:
    """Phase 1: the ``p - 2f`` rows picked one by one by Krum, from the Gram matrix ``K``."""
    p = K.shape[0]
    D = sq_distances(K=K).cpu()
    remaining = list(range(p))
    selected = []
    for _ in range(p - 2 * f):
        idx = torch.tensor(remaining)
        best = int(krum_order(D[idx][:, idx], f)[0])
        selected.append(remaining.pop(best))
    return selected


def closest_to_median(G: torch.Tensor, rows: list[int], f: int) -> torch.Tensor:
    """Phase 2: per column, the mean of the ``len(rows) - 2f`` values of ``G[rows]`` closest to their median."""
    theta = len(rows)
    beta = theta - 2 * f

    def reduce(s: list[torch.Tensor], out: torch.Tensor) -> None:
        S = torch.stack(s)
        low = torch.zeros((1, S.shape[1]), dtype=torch.long, device=S.device)
        if f:
            distance = (S - (S[(theta - 1) // 2] + S[theta // 2]) / 2).abs_()
            high = torch.full_like(low, theta - 1)
            for _ in range(2 * f):
                left = distance.gather(0, low) > distance.gather(0, high)
                low += left
                high -= left.logical_not_().long()
        out.copy_(S.gather(0, low)[0])
        for offset in range(1, beta):
            out.add_(S.gather(0, low + offset)[0])
        out.div_(beta)

    return coordinatewise(G, range(theta), reduce, rows=rows)


class Bulyan(Aggregator):
    name = "bulyan"
    columnwise = True

    requires = (4, 3)  # p >= 4f + 3

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return closest_to_median(G, bulyan_selection(gram(G), f), f)

    def by_columns(self, p: int, K: torch.Tensor, f: int) -> ColumnRule:
        rows = bulyan_selection(K, f)
        return lambda block, cols: closest_to_median(block, rows, f)
