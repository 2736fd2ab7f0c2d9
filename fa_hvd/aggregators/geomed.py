"""Geometric median by smoothed Weiszfeld (Pillutla, Kakade, Harchaoui: RFA).

Approximates ``argmin_z sum_i ||z - g_i||`` by iterating, from the mean,

    w_i = 1 / max(nu, ||z - g_i||),    z <- sum_i w_i g_i / sum_i w_i,

for at most ``iterations`` steps, stopping once ``||z_new - z|| <= tol ||z_new||``.
``nu > 0`` smooths the objective so a ``z`` sitting on a gradient is no pole.

``z`` always lies in the span of the rows, ``z = c^T G``, so the iteration only
updates the weights ``c`` (``p`` numbers): with the Gram matrix ``K = G G^T``,
``||z - g_i||^2 = c^T K c - 2 (K c)_i + K_ii``. One ``(p, n) x (n, p)`` product,
then O(p^2) per step; ``c^T G`` is formed once at the end. (The Gram form loses
accuracy when the spread of the rows is below ~1e-3 of their norm in fp32.)

Breakdown point 1/2: precondition ``p >= 2f + 1``.
"""

from __future__ import annotations

import numbers

import torch

from .base import Aggregator


def weiszfeld_weights(K: torch.Tensor, c: torch.Tensor, nu: float) -> torch.Tensor:
    """The weights ``w_i = 1 / max(nu, ||z - g_i||)`` of a smoothed Weiszfeld step from ``z = c^T G``, in Gram
    space (``K = G G^T``); the step goes to ``sum_i w_i g_i / sum_i w_i``."""
    Kc = K @ c
    dist = (c @ Kc - 2 * Kc + K.diagonal()).clamp_min(0).sqrt()
    return 1 / dist.clamp_min(nu)


class GeoMed(Aggregator):
    name = "geomed"
    gram_space = True

    def __init__(self, f: int = 0, iterations: int = 100, nu: float = 1e-6, tol: float = 1e-7):
        super().__init__(f)
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
            raise ValueError(f"{self.name}: iterations must be a positive integer, got {iterations!r}")
        if isinstance(nu, bool) or not isinstance(nu, numbers.Real) or not nu > 0:
            raise ValueError(f"{self.name}: nu must be a positive number, got {nu!r}")
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
            raise ValueError(f"{self.name}: tol must be a non-negative number, got {tol!r}")
        self.iterations, self.nu, self.tol = int(iterations), float(nu), float(tol)

    requires = (2, 1)  # p >= 2f + 1

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        p = K.shape[0]
        c = torch.full((p,), 1.0 / p, dtype=K.dtype, device=K.device)
        for _ in range(self.iterations):
            w = weiszfeld_weights(K, c, self.nu)
            new = w / w.sum()
            delta = new - c
            change_sq = (delta @ K @ delta).clamp_min(0)
            size_sq = (new @ K @ new).clamp_min(0)
            c = new
            if bool(change_sq <= self.tol**2 * size_sq):
                break
        return c

    def __repr__(self) -> str:
        return f"GeoMed(f={self.f}, iterations={self.iterations}, nu={self.nu}, tol={self.tol})"
