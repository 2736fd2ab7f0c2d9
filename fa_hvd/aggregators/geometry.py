"""Pairwise geometry shared by the distance-based rules.

One Gram matrix ``K = G G^T`` (a single pass over ``G``) gives every squared
distance ``||g_i - g_j||^2 = K_ii + K_jj - 2 K_ij`` and every norm, so Krum,
Multi-Krum, Bulyan, MDA, NNM and FA never form a ``(p, p, n)`` tensor. The small
``(p, p)`` results are fp64.

Accuracy. ``K`` is accumulated in fp64 whatever ``G``'s dtype (see :func:`gram`):

* no overflow: a finite fp32 row can have a norm near 1e38 * sqrt(n) (one bit flip
  in an exponent makes one), whose square overflows fp32 (3.4e38) but not fp64
  (1.8e308): the rules see the huge row for what it is and reject it;
* no cancellation: for rows sharing a mean ``mu`` with spread ``sigma``, an fp32
  accumulation errs by about ``n mu^2 2^-24`` on every entry, which swamps the
  squared distances ``~ n sigma^2`` once ``sigma / mu`` falls below ~1e-3. A product
  of two fp32 (or fp16, bf16) numbers is exact in fp64 (48 <= 53 mantissa bits), so
  the fp64 sums err by about ``n mu^2 2^-53``: distances stay accurate to ~1e-16
  ``(mu / sigma)^2`` relative, checked against an fp64 computation in the tests.

The cost: ``G`` is converted one column block at a time (cache-sized on the CPU,
large on accelerators), about 1.5x an fp32 product on the CPU.
"""

from __future__ import annotations

import torch

CPU_BLOCK = 1 << 18  # elements of G per fp64 block: fits a CPU cache
ACCELERATOR_BLOCK = 1 << 24  # few, large products on a GPU


def cross_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A B^T`` as fp64 ``(a, b)``, accumulated in fp64 one block of columns at a time."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B.T
    budget = CPU_BLOCK if A.device.type == "cpu" else ACCELERATOR_BLOCK
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for cols in column_chunks(A.shape[1], max(A.shape[0], B.shape[0]), budget):
        out += A[:, cols].double() @ B[:, cols].double().T
    return out


def gram(G: torch.Tensor) -> torch.Tensor:
    """``K = G G^T`` as fp64 ``(p, p)``, accumulated in fp64 (exact products), symmetrised."""
    K = cross_gram(G, G)
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
