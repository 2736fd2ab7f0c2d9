"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

Score of worker ``i``: the sum of the *squared* distances from ``g_i`` to its
``p - f - 2`` nearest other gradients, as in the original paper. (Some libraries
use ``p - f - 1`` neighbours or plain distances; the selections can differ.)

* Krum returns the gradient with the smallest score.
* Multi-Krum averages the ``m`` gradients with the smallest scores (default
  ``m = p - f``; ``m`` is capped at the number of rows, which shrinks when
  non-finite rows are dropped). With ``m = p`` it is the mean.

Ties are broken by the lowest index (stable sort of the scores). Precondition
``p >= 2f + 3``. Distances come from one Gram matrix (:mod:`.geometry`); both rules
are Gram-space rules (``c`` is one-hot for Krum, ``1/m`` on the chosen rows for
Multi-Krum).
"""

from __future__ import annotations

import numbers

import torch

from .base import Aggregator
from .geometry import sq_distances


def krum_scores(D: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores from squared distances ``D`` ``(q, q)``.

    Each score sums the ``q - f - 2`` smallest off-diagonal entries of its row;
    the count is floored at 1 (and capped at ``q - 1``) so Bulyan can score the
    shrinking candidate sets.
    """
    q = D.shape[0]
    k = min(max(q - f - 2, 1), q - 1)
    if k == 0:
        return torch.zeros(q, dtype=D.dtype, device=D.device)
    others = D.clone().fill_diagonal_(float("inf"))
    return others.sort(dim=1).values[:, :k].sum(dim=1)


def krum_order(D: torch.Tensor, f: int) -> torch.Tensor:
    """Row indices by increasing Krum score, ties by lowest index."""
    return torch.sort(krum_scores(D, f), stable=True).indices


class Krum(Aggregator):
    name = "krum"
    gram_space = True

    requires = (2, 3)  # p >= 2f + 3

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        c = torch.zeros(K.shape[0], dtype=torch.float64, device=K.device)
        c[krum_order(sq_distances(K=K), f)[0]] = 1.0
        return c


class MultiKrum(Krum):
    name = "multikrum"

    def __init__(self, f: int = 0, m: int | None = None):
        super().__init__(f)
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1):
            raise ValueError(f"{self.name}: m must be None or a positive integer, got {m!r}")
        self.m = None if m is None else int(m)

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        p = K.shape[0]
        m = min(p - f if self.m is None else self.m, p)
        c = torch.zeros(p, dtype=torch.float64, device=K.device)
        c[krum_order(sq_distances(K=K), f)[:m]] = 1.0 / m
        return c

    def __repr__(self) -> str:
        return f"MultiKrum(f={self.f}, m={self.m})"
