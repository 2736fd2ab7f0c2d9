"""The centred Gram block product (:mod:`.geometry`) compiled to C: one read of each row, no buffer.

At small ``p`` the product is bound by memory, and torch spends more than a pass on it: the
centred rows are written to a buffer and read back by a BLAS product of ``p + 1`` rows, which
runs far below the machine's rate at such shapes. Here one loop over the block's columns reads
every row once, forms ``x_i = fl(g_i - r)`` (``r`` = row ``m``) in registers and adds every
product of ``[x_0 .. x_{p-1}, r]`` to fp32 accumulators, one per lane of :data:`LANES` columns
(vectorised by the compiler; they stay in registers up to ``p`` of about 4, in L1 beyond):
each lane's sum has at most ``w / LANES`` products (within :mod:`.geometry`'s ``b``), and the
lane sums are added in fp64; ``r . r`` is summed from exact fp64 products in fp64. The
arithmetic is :mod:`.geometry`'s model (``-ffp-contract=off``: no fused multiply-adds), so its
error bound holds, with ``LANES`` more fp64 additions per block (counted in ``N``). Straight-line
C per ``p``, compiled and loaded as :mod:`.native`'s sorting networks are (same cache, same
``FA_HVD_NATIVE=0`` switch, the torch path when no compiler works). Used for fp32 rows with unit
column stride on the CPU, ``p <= MAX_ROWS``; one thread (the bits do not depend on the thread count).
Its results and the torch path's agree within the bound, not bit for bit: every rank of a run must
take the same path, which the ranks agree on at start-up (:func:`.native.agree`: the torch path
everywhere if any rank cannot compile).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native

LANES = 16
"""Columns one vector of accumulators spans (an AVX-512 register of fp32)."""
MAX_ROWS = 16
"""Largest ``p`` compiled (above it the BLAS product of :mod:`.geometry` is faster)."""


def supports(G: torch.Tensor) -> bool:
    """Whether the compiled product takes ``G``: fp32 on the CPU, unit column stride, ``p <= MAX_ROWS``."""
    return G.dtype == torch.float32 and G.shape[0] <= MAX_ROWS and native.supports(G)


def pairs(p: int) -> list[tuple[int, int]]:
    """The packed lower triangle of ``[X; r] [X; r]^T``: ``(i, j)``, ``j <= i``, row ``p`` is ``r``."""
    return [(i, j) for i in range(p + 1) for j in range(i + 1)]


def gram_source(p: int) -> str:
    """C code of :func:`block_products` for ``p`` rows."""
    packed = pairs(p)
    x = [f"x{i}" for i in range(p)] + ["xr"]
    load = ["const float xr = r[j];", *[f"const float x{i} = g{i}[j] - xr;" for i in range(p)]]
    lines = [
        "#include <stdint.h>",
        "void gram(const float *const *rows, int64_t m, int64_t start, int64_t w, double *restrict out) {",
        *[f"  const float *restrict g{i} = rows[{i}] + start;" for i in range(p)],
        "  const float *restrict r = rows[m] + start;",
        *[f"  float a{k}[{LANES}] = {{0}};" for k in range(len(packed))],
        f"  double q[{LANES}] = {{0}};",
        f"  const int64_t full = w - w % {LANES};",
        f"  for (int64_t j0 = 0; j0 < full; j0 += {LANES}) {{",
        f"    for (int l = 0; l < {LANES}; ++l) {{",
        "      const int64_t j = j0 + l;",
        *[f"      {line}" for line in load],
        *[f"      a{k}[l] += {x[i]} * {x[j]};" for k, (i, j) in enumerate(packed)],
        "      q[l] += (double)xr * (double)xr;",
        "    }",
        "  }",
        "  for (int64_t j = full; j < w; ++j) {",
        *[f"    {line}" for line in load],
        *[f"    a{k}[0] += {x[i]} * {x[j]};" for k, (i, j) in enumerate(packed)],
        "    q[0] += (double)xr * (double)xr;",
        "  }",
        *[f"  {{ double s = 0; for (int l = 0; l < {LANES}; ++l) s += (double)a{k}[l]; out[{k}] = s; }}"
          for k in range(len(packed))],
        f"  {{ double s = 0; for (int l = 0; l < {LANES}; ++l) s += q[l]; out[{len(packed)}] = s; }}",
        "}",
        "",
    ]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _gram(p: int):
    return native.function(gram_source(p), "gram")


@functools.lru_cache(maxsize=None)
def unpack(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that spread the packed lower triangle over a full ``(p + 1, p + 1)`` matrix."""
    index = torch.empty(p + 1, p + 1, dtype=torch.long)
    for k, (i, j) in enumerate(pairs(p)):
        index[i, j] = index[j, i] = k
    return index.flatten(), torch.tensor(len(pairs(p)))


def row_pointers(G: torch.Tensor):
    """The ``ctypes`` array of ``G``'s row addresses (``G`` must outlive its use)."""
    return (ctypes.c_void_p * G.shape[0])(*[G[i].data_ptr() for i in range(G.shape[0])])


def block_products(rows, p: int, m: int, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([X; r] [X; r]^T`` as fp64 ``(p + 1, p + 1)``, ``r . r`` in fp64) over columns
    ``[start, start + width)`` of the rows at ``rows`` (:func:`row_pointers`), ``r`` = row ``m``."""
    index, rr = unpack(p)
    out = torch.empty(len(pairs(p)) + 1, dtype=torch.float64)
    _gram(p)(rows, ctypes.c_int64(m), ctypes.c_int64(start), ctypes.c_int64(width), ctypes.c_void_p(out.data_ptr()))
    return out[index].reshape(p + 1, p + 1), out[rr]
