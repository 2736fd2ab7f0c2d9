"""Minimum-diameter averaging (El Mhamdi, Guerraoui, Rouault 2018; Rousseeuw's MVE idea).

Among all subsets ``S`` of ``p - f`` rows, take the one with the smallest
diameter ``max_{i, j in S} ||g_i - g_j||`` and return its mean. The search is an
exact enumeration of the ``C(p, f)`` subsets in lexicographic order; the first
minimal subset wins. Enumeration is refused above ``MAX_SUBSETS`` subsets.
Precondition ``p >= 2f + 1``. Distances come from one Gram matrix; a Gram-space
rule (``c = 1/(p - f)`` on the chosen subset).
"""

from __future__ import annotations

import itertools
import math

import torch

from .base import Aggregator
from .geometry import sq_distances

MAX_SUBSETS = 1_000_000
"""Largest ``C(p, f)`` that MDA enumerates."""

_BATCH_BUDGET = 1 << 22  # elements of the (batch, q, q) distance blocks


class MDA(Aggregator):
    name = "mda"
    gram_space = True

    requires = (2, 1)  # p >= 2f + 1

    def check(self, p: int, f: int | None = None) -> None:
        super().check(p, f)
        f = self.f if f is None else f
        count = math.comb(p, f)
        if count > MAX_SUBSETS:
            raise ValueError(
                f"{self.name}: C(p, f) = C({p}, {f}) = {count} subsets exceeds the "
                f"exact-enumeration limit MAX_SUBSETS = {MAX_SUBSETS}"
            )

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        p = K.shape[0]
        q = p - f
        c = torch.zeros(p, dtype=torch.float64, device=K.device)
        if f == 0:
            return c.fill_(1.0 / p)
        D = sq_distances(K=K).cpu()
        subsets = itertools.combinations(range(p), q)
        batch = max(1, _BATCH_BUDGET // (q * q))
        best, best_diameter = None, math.inf
        while chunk := list(itertools.islice(subsets, batch)):
            idx = torch.tensor(chunk)
            diameters = D[idx[:, :, None], idx[:, None, :]].flatten(1).amax(dim=1)
            i = int(diameters.argmin())
            if float(diameters[i]) < best_diameter:
                best, best_diameter = chunk[i], float(diameters[i])
        c[torch.tensor(best, device=K.device)] = 1.0 / q
        return c
