"""Flag Aggregator (FA): Almasi, Mishra, Vamanan, Ravi, ICLR 2024 (arXiv 2302.05865).

FA normalises the gradients, ``h_i = g_i / ||g_i||``, fits an ``r``-dimensional
subspace ``Y`` (``n x r``, orthonormal) to them by iteratively reweighted least
squares (IRLS) on the flag-median objective

    E(Y) = sum_i sqrt(max(0, 1 - ||Y^T h_i||^2)),

and aggregates the projections ``Y Y^T h_i``. One IRLS step from ``Y`` uses the
weights ``w_i = (|1 - ||Y^T h_i||^2| + eps)^(-1/4)`` and, when ``lambda_ > 0``,
pair weights ``v_ij = (|1 - ||Y^T (h_i - h_j)||^2| + eps)^(-1/4) lambda_ / (p (p-1))``
for every ordered pair ``i != j``; the next ``Y`` is the top-``r`` left singular
vectors of ``[w_i h_i ..., v_ij (h_i - h_j) ...]``.

Gram space. Every ``Y`` after the first step lies in ``span(h_1..h_p)``. With
``K = H^T H = V D V^T`` and ``R = D^(1/2) V^T`` (so ``H = Q R`` for an orthonormal
``Q`` never formed), the stacked matrix is ``H C`` and its left singular vectors are
``Q`` times the eigenvectors of ``R (C C^T) R^T``, where ``C C^T = diag(w^2) + L``
and ``L`` is the graph Laplacian with edge weights ``2 v_ij^2``. Everything is
``p x p``: the only passes over ``n`` are ``K = G G^T`` and the output ``G c``
(plus ``U^T G`` for the reference mode's random start).

Modes:

* ``mode="reference"`` reproduces the released code: the start ``Y0`` is the Q of
  ``QR(U - 0.5)`` with ``U`` uniform ``n x r`` drawn by ``torch.rand`` on the CPU in
  float32 right after ``torch.manual_seed(1)`` (only ``Y0^T H = R0^(-T) (U - 0.5)^T H``
  is needed, with ``R0`` the Cholesky factor of ``(U - 0.5)^T (U - 0.5)``);
  ``iterations`` (T) defaults to 1; the loop runs while fewer than T steps were
  taken, the last decrease of E is > 1e-10 and E > 1e-10; if the last step did not
  decrease E the previous ``Y`` is kept; the output is ``sum_i Y Y^T h_i / r``.
  Quirks kept on purpose: the output is in normalised units (``||out|| <= p / r``;
  the gradient norm is lost), and with T = 1 from a random start the weights are
  all about 1, so FA is the top-``r`` projection of the normalised gradients. The
  torch global RNG is reseeded by the release; this implementation uses its own
  generator and leaves the global RNG untouched.
* ``mode="default"`` (the better FA): a data-driven start (the top-``r``
  eigenvectors of ``K``, i.e. the flag mean), IRLS to convergence (``iterations``
  up to 100, stop when E decreases by less than ``1e-9 (1 + E)``), then a
  sign-aware step: a subspace cannot tell ``h`` from ``-h``, so workers whose
  projection points against the consensus ``d = sum_i Y Y^T h_i``
  (``<Y^T h_i, Y^T d> < 0``) are dropped, at most ``f`` of them, the most opposed
  first. The output has a principled scale: the mean of the kept projections
  times the median gradient norm (as in ``nmean``: the mean of the two middle
  norms for an even count), so ``p`` identical gradients ``g`` give ``g``.

Default mode is a Gram-space rule: the output is ``c^T G`` with ``c`` computed from
``K`` alone (:meth:`Flag.coefficients`). Reference mode is not: its random start needs
``U^T G``.

Zero gradients have no direction: their ``h_i`` is taken as 0 (they add nothing
to the subspace or the sum). Precondition: ``r >= 1``; any ``p >= 1``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .base import Aggregator, host_gram
from .geometry import combine, gram
from .median import sorted_median

REFERENCE_EPS = 1e-7
REFERENCE_STOP = 1e-10
DEFAULT_MAX_ITERATIONS = 100
DEFAULT_REL_TOL = 1e-9


class Flag(Aggregator):
    name = "flag"

    def __init__(
        self,
        f: int = 0,
        mode: str = "default",
        r: int = 8,
        lambda_: float = 0.0,
        iterations: int | None = None,
        eps: float = REFERENCE_EPS,
    ):
        super().__init__(f)
        if mode not in ("default", "reference"):
            raise ValueError(f"flag: mode must be 'default' or 'reference', got {mode!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"flag: r must be an integer >= 1, got {r!r}")
        if not isinstance(lambda_, (int, float)) or isinstance(lambda_, bool) or not lambda_ >= 0:
            raise ValueError(f"flag: lambda_ must be a number >= 0, got {lambda_!r}")
        if iterations is None:
            iterations = 1 if mode == "reference" else DEFAULT_MAX_ITERATIONS
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"flag: iterations must be an integer >= 1, got {iterations!r}")
        if not eps > 0:
            raise ValueError(f"flag: eps must be > 0, got {eps!r}")
        self.mode, self.r, self.lambda_, self.iterations, self.eps = mode, r, float(lambda_), iterations, eps
        self._start_cache: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"Flag(f={self.f}, mode={self.mode!r}, r={self.r}, lambda_={self.lambda_}, "
            f"iterations={self.iterations})"
        )

    # -- the p x p geometry --------------------------------------------------------
    @property
    def gram_space(self) -> bool:
        return self.mode == "default"

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        eps = torch.finfo(G.dtype).eps
        if self.mode == "default":
            return combine(G, self.coefficients(host_gram(G), f, eps))
        basis = _gram_basis(gram(G), eps)
        if basis is None:
            return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
        return self._reference(G, basis)

    def coefficients(self, K: torch.Tensor, f: int, eps: float = torch.finfo(torch.float32).eps) -> torch.Tensor:
        """Default mode's ``c`` (``agg(G) = c^T G``) from ``K``; ``eps``: the data's precision (fp32)."""
        if self.mode != "default":
            raise NotImplementedError("flag: reference mode's random start needs U^T G, not K alone")
        basis = _gram_basis(K, eps)
        if basis is None:
            return torch.zeros(K.shape[0], dtype=torch.float64, device=K.device)
        W, total = self._default(basis, K.diagonal().clamp_min(0).sqrt(), f)
        return basis.coefficients(W, total)

    def _irls_step(self, P: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """One IRLS step from projections ``P = Y^T H`` (``(r', p)``); returns W (``(k, r'')``)."""
        p = P.shape[1]
        proj2 = (P * P).sum(0)
        w = ((1 - proj2).abs() + self.eps) ** -0.25
        S = torch.diag(w * w)
        if self.lambda_ > 0 and p > 1:
            diff = P[:, :, None] - P[:, None, :]
            v = ((1 - (diff * diff).sum(0)).abs() + self.eps) ** -0.25 * (self.lambda_ / (p * (p - 1)))
            A = 2 * v * v
            A.fill_diagonal_(0)
            S = S + torch.diag(A.sum(1)) - A
        M = R @ S @ R.T
        evals, evecs = torch.linalg.eigh((M + M.T) / 2)
        r = min(self.r, R.shape[0])
        return evecs[:, -r:].flip(1)

    def _objective(self, P: torch.Tensor) -> float:
        return float((1 - (P * P).sum(0)).clamp_min(0).sqrt().sum())

    def _iterate(self, P: torch.Tensor, R: torch.Tensor, stop) -> tuple[torch.Tensor | None, torch.Tensor]:
        """IRLS from projections ``P``; returns ``(W, P)`` of the kept iterate (``W`` None = start)."""
        W, E = None, self._objective(P)
        prev = (W, P)
        decrease, steps = math.inf, 0
        while steps < self.iterations and not stop(decrease, E):
            W_new = self._irls_step(P, R)
            P_new = W_new.T @ R
            E_new = self._objective(P_new)
            decrease = E - E_new
            prev, (W, P, E) = (W, P), (W_new, P_new, E_new)
            steps += 1
        if steps and not decrease > 0:
            W, P = prev
        return W, P

    # -- reference mode ------------------------------------------------------------
    def _random_start(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``U - 0.5`` (``(n, r)``) and the Cholesky factor ``R0`` of its Gram, cached per shape."""
        key = (n, self.r, dtype, device)
        if self._start_cache is None or self._start_cache[0] != key:
            gen = torch.Generator(device="cpu").manual_seed(1)
            Uc = (torch.rand(n, self.r, generator=gen, dtype=torch.float32) - 0.5).to(dtype=dtype, device=device)
            R0 = torch.linalg.cholesky(gram(Uc.T)).T  # upper: Uc^T Uc = R0^T R0
            self._start_cache = (key, Uc, R0)
        return self._start_cache[1], self._start_cache[2]

    def _reference(self, G, basis: "_GramBasis") -> torch.Tensor:
        Uc, R0 = self._random_start(G.shape[1], G.dtype, G.device)
        if Uc.shape[1] > G.shape[1]:
            raise ValueError(f"flag: reference mode needs r <= n, got r={self.r}, n={G.shape[1]}")
        UtH = (Uc.T @ G.T).double() * basis.inv[None, :]
        P0 = torch.linalg.solve_triangular(R0.T, UtH, upper=False)  # Y0^T H
        W, P = self._iterate(
            P0, basis.R, stop=lambda decrease, E: not (decrease > REFERENCE_STOP and E > REFERENCE_STOP)
        )
        total = P.sum(1) / self.r  # Y^T H 1 / r
        if W is None:  # the random start survived: Y0 (Y0^T H 1) / r lies outside span(H)
            return Uc @ torch.linalg.solve_triangular(R0, total[:, None], upper=True)[:, 0].to(Uc.dtype)
        return combine(G, basis.coefficients(W, total))

    # -- default mode ----------------------------------------------------------------
    def _default(self, basis: "_GramBasis", norms, f) -> tuple[torch.Tensor, torch.Tensor]:
        """IRLS from the flag mean, the sign step and the scale: ``(W, Y^T-coordinates of the output)``."""
        R = basis.R
        k = R.shape[0]
        r = min(self.r, k)
        W0 = torch.eye(k, r, dtype=R.dtype, device=R.device)
        P0 = W0.T @ R
        W, P = self._iterate(
            P0, R, stop=lambda decrease, E: decrease <= DEFAULT_REL_TOL * (1 + E) or E <= REFERENCE_STOP
        )
        if W is None:
            W = W0
        # Sign-aware step: drop up to f workers opposed to the consensus direction.
        consensus = P.sum(1)
        alignment = consensus @ P
        kept = torch.ones_like(alignment, dtype=torch.bool)
        if f > 0:
            order = torch.argsort(alignment, stable=True)[:f]
            kept[order[alignment[order] < 0]] = False
        has_direction = norms > 0
        count = int((kept & has_direction).sum())
        scale = sorted_median(norms[has_direction].sort().values) if has_direction.any() else norms.new_zeros(())
        total = (P * kept).sum(1) * (scale / max(count, 1))
        return W, total


class _GramBasis(NamedTuple):
    """``H = Q R`` with ``Q = H V D^(-1/2)`` never formed: ``K_h = V D V^T`` (leading ``k`` eigenpairs)."""

    inv: torch.Tensor  # 1 / ||g_i|| (0 for zero rows)
    evals: torch.Tensor  # D, descending
    evecs: torch.Tensor  # V, (p, k)
    R: torch.Tensor  # D^(1/2) V^T, (k, p)

    def coefficients(self, W: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """``Y t = G^T c`` for ``Y = Q W``: ``Y t = H a`` with ``a = V D^(-1/2) W t``, so ``c = a / ||g||``."""
        return (self.evecs @ ((W @ total) / self.evals.sqrt())) * self.inv


def _gram_basis(K: torch.Tensor, eps: float) -> _GramBasis | None:
    """The basis of the normalised rows' span from ``K`` (None when every row is zero).

    Eigenvalues of the cosine matrix below ``10 p eps`` times the largest are dropped.
    """
    norms = K.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
    Kh = K * inv[:, None] * inv[None, :]
    evals, evecs = torch.linalg.eigh(Kh)
    keep = evals > 10 * Kh.shape[0] * eps * evals[-1].clamp_min(0)
    if not keep.any():
        return None
    # Descending eigenvalues: the leading coordinates carry the most energy.
    evals, evecs = evals[keep].flip(0), evecs[:, keep].flip(1)
    return _GramBasis(inv, evals, evecs, evals.sqrt()[:, None] * evecs.T)
