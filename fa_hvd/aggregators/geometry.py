"""Pairwise geometry shared by the distance-based rules.

One Gram matrix ``K = G G^T`` (a single ``(p, n) x (n, p)`` product) gives every
squared distance ``||g_i - g_j||^2 = K_ii + K_jj - 2 K_ij`` and every norm, so
Krum, Multi-Krum, Bulyan, MDA, NNM and FA never form a ``(p, p, n)`` tensor.
The small ``(p, p)`` results are returned in fp64.
"""

from __future__ import annotations

import torch


def gram(G: torch.Tensor) -> torch.Tensor:
    """``K = G G^T`` as fp64 ``(p, p)``, symmetrised."""
    K = (G @ G.T).double()
    return (K + K.T) / 2


def sq_distances(G: torch.Tensor | None = None, K: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``(p, p)`` in fp64, from ``G`` or its Gram ``K``."""
    if K is None:
        K = gram(G)
    diag = K.diagonal()
    D = (diag[:, None] + diag[None, :] - 2 * K).clamp_min_(0)
    D.fill_diagonal_(0)
    return D


def combine(G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c^T G``: the ``(n,)`` combination of ``G``'s rows with coefficients ``c`` (``(p,)``), in ``G``'s dtype."""
    return c.to(device=G.device, dtype=G.dtype) @ G


def column_chunks(n: int, p: int, budget: int = 1 << 22):
    """Slices of columns such that each chunk holds about ``budget`` elements.

    Coordinate-wise rules (median, trimmed mean) sort one chunk at a time, so the
    extra memory is O(budget) rather than O(p n).
    """
    step = max(1, budget // max(p, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))
