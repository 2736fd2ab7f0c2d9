"""Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018).

1. Selection: pick ``theta = p - 2f`` gradients one at a time by Krum, each time
   rescoring only the rows not yet picked (``q - f - 2`` neighbours among the
   ``q`` remaining, at least 1; see :func:`.krum.krum_scores`). Ties go to the
   lowest index. All scores index one shared squared-distance matrix.
2. Aggregation: per coordinate, average the ``beta = theta - 2f`` selected values
   closest to the coordinate-wise median of the selection (median as in
   :mod:`.median`, ties in closeness by sorted position).

Precondition ``p >= 4f + 3``.
"""

from __future__ import annotations

import torch

from .base import Aggregator
from .geometry import sq_distances
from .krum import krum_order
from .median import coordinatewise, sorted_median


class Bulyan(Aggregator):
    name = "bulyan"

    requires = (4, 3)  # p >= 4f + 3

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        p = G.shape[0]
        theta, beta = p - 2 * f, p - 4 * f
        D = sq_distances(G).cpu()
        remaining = list(range(p))
        selected = []
        for _ in range(theta):
            idx = torch.tensor(remaining)
            best = int(krum_order(D[idx][:, idx], f)[0])
            selected.append(remaining.pop(best))
        S = G[torch.tensor(selected, device=G.device)]

        def closest_to_median(col: torch.Tensor) -> torch.Tensor:
            near = (col - sorted_median(col)).abs().argsort(dim=0, stable=True)[:beta]
            return col.gather(0, near).mean(dim=0)

        return coordinatewise(S, closest_to_median)
