"""Pairwise geometry shared by the distance-based rules.

One Gram matrix ``K = G G^T`` (a single pass over ``G``) gives every squared
distance ``||g_i - g_j||^2 = K_ii + K_jj - 2 K_ij`` and every norm, so Krum,
Multi-Krum, Bulyan, MDA, NNM and FA never form a ``(p, p, n)`` tensor. The small
``(p, p)`` results are fp64.

The product (:func:`gram`, ``G`` in fp32, fp16 or bf16; fp64 ``G`` is one fp64
product). Distances cancel catastrophically in an fp32 product when the rows share
a large common part, so the rows are centred first, and only the centred part goes
through fp32:

* a reference row ``r = g_m`` (:func:`reference_row`: the row with the smallest
  median squared distance to the rows, on the first :data:`SAMPLE_COLUMNS` columns in
  fp64); with ``x_i = fl(g_i - r)`` (so ``x_m = 0``),
  ``K_ij = x_i . x_j + x_i . r + x_j . r + r . r`` up to the rounding of ``x``;
* one pass over ``G`` in column blocks (cache-sized on the CPU, :data:`CPU_BLOCK`): the block's
  rows minus ``r`` into one reused fp32 buffer ``Y = [X; r]`` (``p + 1`` rows), then one fp32
  product ``Y Y^T`` (the floor's arithmetic; from :data:`SYMMETRIC_ROWS` rows on syrk-style,
  3/4 of it: :func:`_square`; for fp32 on the CPU, where a C compiler works, the compiled
  product of :mod:`.native_gram` instead, which forms ``x`` in registers up to 16 rows and takes
  the lower triangle in register tiles up to 128, at or below the floor's time), which holds
  every ``x_i . x_j`` and ``s_i = x_i . r``, each
  entry an fp32 sum of at most ``b`` products (a CPU block's width; :data:`FP32_TERMS` on an
  accelerator, whose wide blocks go through one batched product of pieces), added to an
  fp64 accumulator; and ``r . r`` in fp64 (exact products of fp32 values: one row, ``1 / p``
  of the pass). ``G`` is read once and never converted to fp64;
* rows whose fp32 block product could have overflowed (a diagonal entry above
  :data:`WILD` or not finite: huge rows, bit flips, NaN/Inf) are redone in fp64
  (:func:`cross_gram`: exact products, fp64 sums; a product of two fp32 numbers fits
  fp64's 53 bits, a row of norm 1e38 * sqrt(n) squares to 1e76 < 1.8e308). This is
  the only compensated product, and it runs only for such rows: a non-finite row
  keeps a non-finite diagonal, a finite one a finite diagonal. Their entries err by at
  most ``gamma64_{2n+2} ||g_i|| ||g_j||`` (today's fp64 bound), and a distance to such a
  row by ``E_ii + E_jj + 2 E_ij`` from the entries' bounds ``E``.

The bound (proved with the standard model ``fl(a op b) = (a op b)(1 + d)``,
``|d| <= u``, and ``gamma_k = k u / (1 - k u)``; ``u32 = 2^-24``, ``u64 = 2^-53``).
Any summation order satisfies it, so it holds whatever the BLAS, its blocking and
its thread count. For rows that are not redone, with ``N`` the number of fp32 sums (blocks, their
pieces, the compiled product's lanes) added in fp64 per entry:

    |K^_ij - K_ij| <= gamma32_{b+2} (1 + gamma64_N) (||x_i|| ||x_j|| + (||x_i|| + ||x_j||) ||r||)
                      + 3 n 2^-126 + gamma64_{n+3N+8} (||x_i|| + ||r||) (||x_j|| + ||r||)      (B_ij)

(an fp32 sum of ``b`` products errs by ``gamma32_b sum |a_k b_k|`` in any order;
rounding ``g - r`` to ``x`` (``g_i = r + x_i + e_i``, ``|e_i| <= gamma32_1 |x_i|``) adds the
terms of ``e``, at most ``(2 u32 + u32^2)`` times the same products (none when ``g`` and ``r``
are within a factor 2, Sterbenz); an fp32 product that underflows (or is flushed to
zero) loses less than 2^-126; Cauchy-Schwarz over the blocks; the fp64 sums of the
blocks, ``r . r`` and the last additions give the last term). Every term scales with the
spread of the rows around ``r`` except the last, which is fp64's. In a squared distance
``K_ii + K_jj - 2 K_ij`` the computed ``s_i``, ``s_j`` and ``r . r`` cancel exactly (they enter
as ``d_i + d_j``), so only the fp32 ``x_i . x_j``, the last fp64 additions and
:func:`sq_distances`' own roundings remain (:func:`distance_error_bound`):

    |D^_ij - D_ij| <= F_ii + F_jj + 2 F_ij + gamma64_3 (||g_i|| + ||g_j||)^2,
    F_ij = (gamma32_{b+2} (1 + gamma64_N) + gamma64_{2N+4}) ||x_i|| ||x_j|| + 2 n 2^-126
           + 2 gamma64_6 (||x_i|| + ||r||) (||x_j|| + ||r||)

and the fp32 part is ``~ gamma32_b (||x_i|| + ||x_j||)^2``. Rows sharing a mean ``mu``
with spread ``sigma`` have ``||x|| ~ sqrt(2 n) sigma``: the distances keep their
relative accuracy ``~ b u32`` whatever ``mu / sigma`` (an uncentred fp32 product errs by
``~ n mu^2 u32``, which swamps them once ``sigma / mu < 1e-3``). :func:`gram_error_bound`
evaluates ``B``; the tests check it on near-duplicate rows, rows sharing a large mean,
1e38 rows and bit flips. The reference is a row of ``G``: a row that is central on
the sample and far elsewhere can loosen ``B`` (never break it), and a huge or
non-finite reference makes every row a redone one (today's fp64 cost, same result).
"""

from __future__ import annotations

import torch

from . import native_gram

CPU_BLOCK = 1 << 20  # elements of G per block (4 MB of fp32: the torch path's buffer stays in L3)
ACCELERATOR_BLOCK = 1 << 24  # few, large products on a GPU
FP32_TERMS = {"cpu": None, "accelerator": 1 << 12}
"""Most products one fp32 sum adds (``b`` in the bound): a CPU block's width (None); 4096 on an
accelerator, whose blocks are wide (one batched product over 4096-column pieces)."""
SYMMETRIC_ROWS = 32
"""From this many rows on (a CPU block's product), the product uses its symmetry (:func:`_square`)."""
SAMPLE_COLUMNS = 512  # columns of G (from the first) on which the reference row is chosen
WILD = 2.0**100  # a block's fp32 diagonal above this: the row is redone in fp64 (fp32 max 2^128)
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoffs
TINY32 = 2.0**-126  # an fp32 product below it may underflow (or be flushed to zero)


def cross_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A B^T`` as fp64 ``(a, b)``: exact products, fp64 sums, one block of columns at a time."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for cols in column_chunks(A.shape[1], max(A.shape[0], B.shape[0]), _budget(A)):
        out += A[:, cols].double() @ B[:, cols].double().T
    return out


def gram(G: torch.Tensor) -> torch.Tensor:
    """``K = G G^T`` as fp64 ``(p, p)``, symmetric, within :func:`gram_error_bound` (module docstring)."""
    if G.dtype == torch.float64:
        K = G @ G.T
        return (K + K.T) / 2
    product = CentredGram(G)
    product.advance(G.shape[1])
    return product.result()


class CentredGram:
    """:func:`gram`'s product of an fp32 (or narrower) ``G``, taken as ``G``'s columns become available.

    ``advance(filled)``: columns ``[0, filled)`` of ``G`` hold their final values; the column
    blocks (always the same blocks, cut from column 0) that lie within them are added, and the
    reference row is chosen once the first :data:`SAMPLE_COLUMNS` are there. :meth:`result`,
    once every column is, gives :func:`gram`'s ``K``, bit for bit, whatever the steps
    ``filled`` took: each block's arithmetic is the same, in the same order. (An exchange
    fills ``G`` bucket by bucket and overlaps the product with the buckets still travelling.)
    """

    def __init__(self, G: torch.Tensor):
        p, n = G.shape
        self.G, self.n = G, n
        self.blocks = list(column_chunks(n, p + 1, _budget(G)))
        self.done = 0  # blocks added
        self.m: torch.Tensor | None = None
        compiled = native_gram.supports(G) and _terms(G) is None  # pieces of FP32_TERMS: the torch path
        self.rows = native_gram.row_pointers(G) if compiled else None
        width = self.blocks[0].stop if self.blocks and self.rows is None else 0
        self.buffer = torch.empty(p + 1, width, dtype=torch.float32, device=G.device)  # [X; r], reused
        self.sums = torch.zeros(p + 1, p + 1, dtype=torch.float64, device=G.device)  # [X; r] [X; r]^T
        self.rr = torch.zeros((), dtype=torch.float64, device=G.device)  # r . r, exact products
        self.redo = torch.zeros(p, dtype=torch.bool, device=G.device)

    def advance(self, filled: int) -> None:
        if self.m is None:
            if filled < min(SAMPLE_COLUMNS, self.n):
                return
            self.m = reference_row(self.G)
        while self.done < len(self.blocks) and self.blocks[self.done].stop <= filled:
            P, rr = self._block(self.blocks[self.done])
            wild = ~(P.diagonal() <= WILD)  # a sum of non-negative pieces bounds each piece
            self.redo |= wild[:-1] | wild[-1]
            self.sums += P
            self.rr += rr
            self.done += 1

    def _block(self, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's ``[X; r] [X; r]^T`` (fp64 from fp32 sums) and ``r . r`` (fp64)."""
        p, width = self.G.shape[0], cols.stop - cols.start
        if self.rows is not None:
            return native_gram.block_products(self.rows, p, int(self.m), cols.start, width)
        block = self.G[:, cols].float()
        Y = self.buffer[:, :width]  # rows: x_i = fl(g_i - r), then r
        r = block.index_select(0, self.m)
        torch.sub(block, r, out=Y[:p])
        Y[p:].copy_(r)
        r64 = r.double()
        return _products(Y, _terms(self.G)), (r64 @ r64.T).squeeze()

    def centred_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32-product Gram and the ``(p,)`` mask of the rows :meth:`result` redoes in fp64."""
        if self.done < len(self.blocks):
            raise ValueError(f"CentredGram: {self.done} of {len(self.blocks)} column blocks added; advance to n first")
        s = self.sums[:-1, -1]  # x_i . r
        K = self.sums[:-1, :-1] + s[:, None] + s[None, :] + self.rr
        return (K + K.T) / 2, self.redo

    def result(self) -> torch.Tensor:
        K, redone = self.centred_result()
        if bool(redone.any()):  # the one host synchronisation
            rows = redone.nonzero().flatten()
            exact = cross_gram(self.G[rows], self.G)
            K[rows] = exact
            K[:, rows] = exact.T
        return K


def _products(X: torch.Tensor, terms: int | None) -> torch.Tensor:
    """``X X^T`` in fp64 from fp32 sums of at most ``terms`` products (None: all ``X``'s columns in one)."""
    p, w = X.shape
    if terms is None or w <= terms:
        return _square(X).double()
    q = w // terms
    pieces = X[:, : q * terms].reshape(p, q, terms).transpose(0, 1)
    P = torch.bmm(pieces, pieces.transpose(1, 2))
    if w > q * terms:
        tail = X[:, q * terms :]
        P = torch.cat([P, (tail @ tail.T)[None]])
    return P.double().sum(dim=0)


def _square(X: torch.Tensor) -> torch.Tensor:
    """``X X^T`` in fp32 (one fp32 sum per entry). From :data:`SYMMETRIC_ROWS` rows on, syrk-style:
    the top half's square, the bottom half's square and one cross product, 3/4 of the full
    product's arithmetic (the other cross block is its transpose)."""
    p = X.shape[0]
    if p < SYMMETRIC_ROWS:
        return X @ X.T
    h = p // 2
    top, bottom = X[:h], X[h:]
    cross = bottom @ top.T
    return torch.cat([torch.cat([top @ top.T, cross.T], 1), torch.cat([cross, bottom @ bottom.T], 1)])


def reference_row(G: torch.Tensor) -> torch.Tensor:
    """The index (a 1-element tensor on ``G``'s device) of the row whose median squared distance
    to the rows, on the first :data:`SAMPLE_COLUMNS` columns in fp64, is smallest (first such row;
    non-finite distances count as infinite). With an honest majority it lies within twice the
    honest rows' diameter of each of them (on the sample)."""
    S = G[:, :SAMPLE_COLUMNS].double()
    D = sq_distances(K=S @ S.T).nan_to_num_(nan=float("inf"))
    return D.median(dim=1).values.argmin().reshape(1)


def gram_error_bound(G: torch.Tensor) -> torch.Tensor:
    """``B`` (``(p, p)`` fp64): the bound on ``|gram(G) - G G^T|`` (module docstring), evaluated in fp64."""
    return _bounds(G)[0]


def distance_error_bound(G: torch.Tensor) -> torch.Tensor:
    """``(p, p)`` fp64: the bound on ``|sq_distances(G) - D|`` (module docstring), evaluated in fp64."""
    return _bounds(G)[1]


def _bounds(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram's and the distances' bounds. Rows that :func:`gram` redoes in fp64, and fp64 ``G``:
    ``gamma64_{2n+2} ||g_i|| ||g_j||`` (exact products, at most ``n`` additions in a block and one
    per block), and a distance involving such a row: ``E_ii + E_jj + 2 E_ij`` from the entries' bounds."""
    p, n = G.shape
    norms = G.double().norm(dim=1)
    exact = _gamma(2 * n + 2, U64) * norms[:, None] * norms[None, :]
    if G.dtype == torch.float64:
        B, Bd = exact, _spread(exact)
    else:
        widths = [cols.stop - cols.start for cols in column_chunks(n, p + 1, _budget(G))]
        terms = _terms(G)
        b = max(widths) if terms is None else min(max(widths), terms)
        lanes = native_gram.LANES * len(widths)  # the compiled product's lane sums
        blocks = len(widths) + sum(-(-w // b) for w in widths) + lanes  # fp64 additions of fp32 sums, at most
        m = reference_row(G)
        x = (G.float() - G.float().index_select(0, m)).double().norm(dim=1)
        xx, r = x[:, None] * x[None, :], norms[m]
        xr = (x[:, None] + r) * (x[None, :] + r)  # (||x_i|| + ||r||)(||x_j|| + ||r||)
        fp32 = _gamma(b + 2, U32) * (1 + _gamma(blocks, U64))
        B = fp32 * (xx + (x[:, None] + x[None, :]) * r) + 3 * n * TINY32 + _gamma(n + 3 * blocks + 8, U64) * xr
        Bd = _spread(fp32 * xx + 2 * n * TINY32 + _gamma(2 * blocks + 4, U64) * xx + 2 * _gamma(6, U64) * xr)
        product = CentredGram(G)
        product.advance(n)
        redone = product.centred_result()[1]
        B[redone], B[:, redone] = exact[redone], exact[:, redone]
        Bd = torch.where(redone[:, None] | redone[None, :], _spread(B), Bd)
    return B, Bd + _gamma(3, U64) * (norms[:, None] + norms[None, :]) ** 2  # + sq_distances' roundings


def _spread(E: torch.Tensor) -> torch.Tensor:
    """``E_ii + E_jj + 2 E_ij``: a bound on the error of ``K_ii + K_jj - 2 K_ij`` from entrywise bounds ``E``."""
    d = E.diagonal()
    return d[:, None] + d[None, :] + 2 * E


def _gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u)


def _terms(G: torch.Tensor) -> int | None:
    return FP32_TERMS["cpu" if G.device.type == "cpu" else "accelerator"]


def _budget(G: torch.Tensor) -> int:
    return CPU_BLOCK if G.device.type == "cpu" else ACCELERATOR_BLOCK


def sq_distances(G: torch.Tensor | None = None, K: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``(p, p)`` in fp64, from ``G`` or its Gram ``K``."""
    if K is None:
        K = gram(G)
    diag = K.diagonal()
    D = (diag[:, None] + diag[None, :] - 2 * K).clamp_min_(0)
    D.fill_diagonal_(0)
    return D


def combine(G: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c^T G``: the ``(n,)`` combination of ``G``'s rows with coefficients ``c`` (``(p,)``), in ``G``'s dtype;
    into ``out`` (``(n,)``, ``G``'s dtype and device) when given, with the same bits. A reused ``out``
    is what makes it fast: a fresh ``(n,)`` tensor's pages are touched anew, 18 ms for 11M fp32 on a
    2-core CPU where the product itself takes 5 (p = 2), so the exchanges pass theirs
    (:class:`~fa_hvd.exchange.base.Outputs`)."""
    c = c.to(device=G.device, dtype=G.dtype)
    if out is None:
        return c @ G
    torch.mm(c.unsqueeze(0), G, out=out.unsqueeze(0))
    return out


def column_chunks(n: int, p: int, budget: int = 1 << 22):
    """Slices of columns such that each chunk holds about ``budget`` elements.

    Coordinate-wise rules (median, trimmed mean) sort one chunk at a time, so the
    extra memory is O(budget) rather than O(p n).
    """
    step = max(1, budget // max(p, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))
