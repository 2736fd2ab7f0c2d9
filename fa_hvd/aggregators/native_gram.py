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
``FA_HVD_NATIVE=0`` switch, the torch path when no compiler works).

Above :data:`MAX_ROWS` the products no longer fit in registers and the product is bound by
arithmetic (:func:`tiled_source`): the block is cut into sub-blocks of :data:`SUB_COLUMNS`
columns, whose centred rows ``[X; r]`` are written once to a buffer that stays in cache, and the
lower triangle of ``[X; r] [X; r]^T`` is taken in square tiles of rows, each tile's lane accumulators
in registers across the sub-block (``2 T`` loads per ``T^2`` products: register tiling, as a BLAS
kernel does, but over the triangle only). The tile fits this CPU's vector registers
(:func:`register_layout`): 5 x 5 tiles of 16-lane vectors with AVX-512; without, 3 x 3 tiles of
8-lane vectors, each 16-lane accumulator taken as two halves one after the other, the buffer holding
each half's columns contiguously (5 x 5 vectors of 16 lanes are 50 AVX2 registers where the CPU has
16: the spills made the kernel 4-6x slower than BLAS's product on an AVX2 EPYC; 2 x 2 tiles with both
halves at once were 15-27 % slower than these at p = 20 to 100). While the tiles run, the next
sub-block's rows are prefetched, a few cache lines per tile, so that the one read of ``G`` from
memory overlaps the products. Every entry is still an
fp32 sum per lane, column by column in order, then the lanes in fp64: the same arithmetic, bound and
bits as one lane loop would give, whatever the tiling and the halves.
Used for fp32 rows with unit column stride on the CPU, ``p <= MAX_TILED_ROWS``; one thread (the
bits do not depend on the thread count).
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
"""Largest ``p`` whose accumulators stay in registers (:func:`gram_source`); above, :func:`tiled_source`."""
MAX_TILED_ROWS = 128
"""Largest ``p`` compiled (above it the BLAS product of :mod:`.geometry`)."""
LAYOUTS = {64: 5, 32: 3}
"""Register tiles of :func:`tiled_source` by the bytes of the CPU's fp32 vector registers: rows per side of a
tile (AVX-512: 25 vectors of 16-lane accumulators and the rows in 32 registers; AVX2: 9 accumulators of one
8-lane half, 3 rows and a product in 16 registers)."""
SUB_COLUMNS = 1024
"""Columns of a sub-block (``(p + 1)`` centred rows of them stay in L2 while every tile reads them)."""
LINE = 16
"""fp32 values in a 64-byte cache line (what :func:`tiled_source` prefetches at a time)."""
GRAM_FLAGS = ("-fno-tree-slp-vectorize",)
"""Compiler flags of :func:`gram_source`'s kernel beyond :mod:`.native`'s. GCC 12's straight-line (SLP)
vectoriser takes time that grows steeply with the kernel's ``(p + 1)(p + 2) / 2`` accumulators: at ``-O3
-march=native`` on an AVX2 CPU (AMD EPYC, no AVX-512) 2 s at ``p = 8``, 16 s at 12 and 152 s at 15. The loop
vectoriser, which does the work, is untouched: the kernel compiles in 2 s at ``p = 15``, runs as fast and gives
the same bits. The sorting networks keep it (their small-``p`` kernels are slower without it)."""


def register_layout() -> tuple[int, int]:
    """``(vector bytes, rows per tile side)`` for this CPU (what ``-march=native`` compiles for): AVX-512's
    64-byte registers where the CPU has them, else 32 (AVX2)."""
    vector = 64 if "avx512f" in native.cpu_flags() else 32
    return vector, LAYOUTS[vector]


def supports(G: torch.Tensor) -> bool:
    """Whether the compiled product takes ``G``: fp32 on the CPU, unit column stride, ``p <= MAX_TILED_ROWS``."""
    return G.dtype == torch.float32 and G.shape[0] <= MAX_TILED_ROWS and native.supports(G)


@functools.lru_cache(maxsize=None)
def pairs(p: int) -> tuple[tuple[int, int], ...]:
    """The packed lower triangle of ``[X; r] [X; r]^T``: ``(i, j)``, ``j <= i``, row ``p`` is ``r`` (built once
    per ``p``: at p = 64 building it took as long as a tenth of a block's product)."""
    return tuple((i, j) for i in range(p + 1) for j in range(i + 1))


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


def tiled_source(p: int, layout: tuple[int, int] | None = None) -> str:
    """C code of :func:`block_products` for ``MAX_ROWS < p``: register tiles over cached sub-blocks.

    ``layout``: ``(vector bytes, rows per tile side)``, by default :func:`register_layout`'s; each
    :data:`LANES`-lane accumulator is held as ``4 LANES / vector bytes`` vectors, taken one after the
    other (the same sums, the same bits). The rows ``[X; r]`` are padded with zero rows to a multiple of
    the tile (their entries are computed and never read). A column of the tail (``w mod LANES``) goes to lane 0, as in
    :func:`gram_source`. Should the buffers not be allocated, every entry is NaN, which makes
    :mod:`.geometry` redo every row in fp64.
    """
    vector, tile = layout or register_layout()
    parts, part = 4 * LANES // vector, vector // 4  # vectors per accumulator, lanes per vector
    rows = -(-(p + 1) // tile) * tile
    tiles = [(a, b) for a in range(rows // tile) for b in range(a + 1)]
    cells = [(u, v) for u in range(tile) for v in range(tile)]
    width, accumulators = SUB_COLUMNS, len(tiles) * tile * tile * LANES
    span = width // parts  # a row's columns of one part, contiguous in the buffer
    row_lines = width // LINE  # cache lines of one row of a sub-block
    next_lines = (p + 1) * row_lines  # the next sub-block's, prefetched a few per tile and part
    per = -(-next_lines // (len(tiles) * parts))

    def table(name: str, values) -> str:
        return f"static const int32_t {name}[{len(values)}] = {{{', '.join(map(str, values))}}};"

    at = [(tiles.index((i // tile, j // tile)) * tile * tile + (i % tile) * tile + j % tile) * LANES
          for i, j in pairs(p)]
    lines = [
        "#include <stdint.h>",
        "#include <stdlib.h>",
        "#include <string.h>",
        "#include <math.h>",
        f"typedef float lanes __attribute__((vector_size({vector})));",
        table("ta", [a for a, _ in tiles]),
        table("tb", [b for _, b in tiles]),
        table("at", at),
        table("pi", [i for i, _ in pairs(p)]),
        table("pj", [j for _, j in pairs(p)]),
        "void gram(const float *const *rows, int64_t m, int64_t start, int64_t w, double *restrict out) {",
        f"  float *restrict x = aligned_alloc(64, sizeof(float) * {rows * width});",
        f"  float *restrict acc = aligned_alloc(64, sizeof(float) * {accumulators});",
        "  if (!x || !acc) {",
        f"    for (int k = 0; k <= {len(at)}; ++k) out[k] = NAN;",
        "    free(x); free(acc); return;",
        "  }",
        f"  memset(x, 0, sizeof(float) * {rows * width});",
        f"  memset(acc, 0, sizeof(float) * {accumulators});",
        f"  double q[{LANES}] = {{0}};",
        "  const float *restrict r = rows[m] + start;",
        f"  const int64_t full = w - w % {LANES};",
        f"  for (int64_t s0 = 0; s0 < full; s0 += {width}) {{",
        f"    const int64_t sw = full - s0 < {width} ? full - s0 : {width}, steps = sw / {LANES};",
        f"    for (int i = 0; i <= {p}; ++i) {{",
        f"      const float *restrict g = (i < {p} ? rows[i] : rows[m]) + start + s0;",
        f"      float *restrict xi = x + i * {width};",
        "      for (int64_t k = 0; k < steps; ++k)",
        f"        for (int h = 0; h < {parts}; ++h) {{",
        f"          lanes v, rv; memcpy(&v, g + k * {LANES} + h * {part}, sizeof(lanes));",
        f"          memcpy(&rv, r + s0 + k * {LANES} + h * {part}, sizeof(lanes));",
        f"          if (i < {p}) v -= rv;",
        f"          memcpy(xi + h * {span} + k * {part}, &v, sizeof(lanes));",
        "        }",
        "    }",
        "    for (int64_t j = 0; j < sw; ++j) {",
        f"      const float xr = r[s0 + j]; q[j % {LANES}] += (double)xr * (double)xr;",
        "    }",
        f"    for (int t = 0; t < {len(tiles)}; ++t)",
        f"      for (int h = 0; h < {parts}; ++h) {{",
        f"        const float *restrict A = x + ta[t] * {tile * width} + h * {span};",
        f"        const float *restrict B = x + tb[t] * {tile * width} + h * {span};",
        f"        float *restrict c = acc + t * {tile * tile * LANES} + h * {part};",
        f"        const int64_t first = (t * {parts} + h) * {per};",
        f"        for (int64_t k = first; k < first + {per} && k < {next_lines}; ++k) {{",
        f"          const int64_t row = k / {row_lines}, col = s0 + {width} + k % {row_lines} * {LINE};",
        f"          if (col < full) __builtin_prefetch((row < {p} ? rows[row] : rows[m]) + start + col, 0, 1);",
        "        }",
        f"        lanes {', '.join(f'c{u}{v}' for u, v in cells)};",
        *[f"        memcpy(&c{u}{v}, c + {(u * tile + v) * LANES}, sizeof(lanes));" for u, v in cells],
        "        for (int64_t k = 0; k < steps; ++k) {",
        *[f"          lanes a{u}; memcpy(&a{u}, A + {u * width} + k * {part}, sizeof(lanes));" for u in range(tile)],
        *[f"          {{ lanes b; memcpy(&b, B + {v * width} + k * {part}, sizeof(lanes)); "
          + " ".join(f"c{u}{v} += a{u} * b;" for u in range(tile)) + " }" for v in range(tile)],
        "        }",
        *[f"        memcpy(c + {(u * tile + v) * LANES}, &c{u}{v}, sizeof(lanes));" for u, v in cells],
        "      }",
        "  }",
        "  for (int64_t j = full; j < w; ++j) {",
        "    const float xr = r[j];",
        f"    float v[{rows}] = {{0}};",
        f"    for (int i = 0; i < {p}; ++i) v[i] = rows[i][start + j] - xr;",
        f"    v[{p}] = xr;",
        f"    for (int k = 0; k < {len(at)}; ++k) acc[at[k]] += v[pi[k]] * v[pj[k]];",
        "    q[0] += (double)xr * (double)xr;",
        "  }",
        f"  for (int k = 0; k < {len(at)}; ++k) {{",
        f"    double s = 0; for (int l = 0; l < {LANES}; ++l) s += (double)acc[at[k] + l]; out[k] = s;",
        "  }",
        f"  {{ double s = 0; for (int l = 0; l < {LANES}; ++l) s += q[l]; out[{len(at)}] = s; }}",
        "  free(x); free(acc);",
        "}",
        "",
    ]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _gram(p: int):
    if p <= MAX_ROWS:
        return native.function(gram_source(p), "gram", GRAM_FLAGS)
    return native.function(tiled_source(p), "gram")


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
