"""Flag Aggregator (FA): Almasi, Mishra, Vamanan, Ravi, ICLR 2024 (arXiv 2302.05865).

FA normalises the gradients, ``h_i = g_i / ||g_i||``, fits an ``r``-dimensional
subspace ``Y`` (``n x r``, orthonormal) to them by iteratively reweighted least
squares (IRLS) on the flag-median objective

    E(Y) = sum_i sqrt(max(0, 1 - ||Y^T h_i||^2)),

One IRLS step from ``Y`` uses the weights ``w_i = (|1 - ||Y^T h_i||^2| + eps)^(-1/4)``
and, when ``lambda_ > 0``, pair weights
``v_ij = (|1 - ||Y^T (h_i - h_j)||^2| + eps)^(-1/4) lambda_ / (p (p-1))`` for every
ordered pair ``i != j``; the next ``Y`` is the top-``r`` left singular vectors of
``[w_i h_i ..., v_ij (h_i - h_j) ...]``. Those weights make the step a
majorise-minimise step of the full objective

    E_lambda(Y) = E(Y) + (lambda_ / (p (p-1)))^2 sum_{i != j} sqrt(|1 - ||Y^T (h_i - h_j)||^2|).

Gram space. Every ``Y`` after the first step lies in ``span(h_1..h_p)``. With
``K = H^T H = V D V^T`` and ``R = D^(1/2) V^T`` (so ``H = Q R`` for an orthonormal
``Q`` never formed), the stacked matrix is ``H C`` and its left singular vectors are
``Q`` times the eigenvectors of ``R (C C^T) R^T``, where ``C C^T = diag(w^2) + L``
and ``L`` is the graph Laplacian with edge weights ``2 v_ij^2``. Everything is
``p x p``: the only passes over ``n`` are ``K = G G^T`` and the output ``G c``
(plus ``U^T G`` for the reference mode's random start).

``r``: by default ``ceil(p / 2)`` (the paper's choice: 8 for p = 11..15, 4 for p = 7),
at most ``p - f - 1`` so that the subspace is fitted to, never filled by, the honest
rows, and at least 1; ``p`` is the number of finite rows. With ``r >= p`` the
subspace holds every gradient and FA loses what the fit tells it: reference mode
returns ``sum_i h_i / r`` and default mode's votes keep only their sign (steps 1, 3 and 4
still apply). A given ``r``
that does this warns once.

Modes:

* ``mode="reference"`` reproduces the released code: the start ``Y0`` is the Q of
  ``QR(U - 0.5)`` with ``U`` uniform ``n x r`` drawn by ``torch.rand`` on the CPU in
  float32 right after ``torch.manual_seed(1)`` (only ``Y0^T H = R0^(-T) (U - 0.5)^T H``
  is needed, with ``R0`` the Cholesky factor of ``(U - 0.5)^T (U - 0.5)``);
  ``iterations`` (T) defaults to 1; the loop runs while fewer than T steps were
  taken, the last decrease of E (the data term only, as released) is > 1e-10 and
  E > 1e-10; if the last step did not decrease E the previous ``Y`` is kept; the
  output is ``sum_i Y Y^T h_i / r``. Quirks kept on purpose: the output is in
  normalised units (``||out|| <= p / r``; the gradient norm is lost), and with T = 1
  from a random start the weights are all about 1, so FA is the top-``r``
  projection of the normalised gradients. The torch global RNG is reseeded by the
  release; this implementation uses its own generator and leaves the global RNG
  untouched.
* ``mode="default"`` (the better FA, chosen on the empirical (f, kappa)-robustness of
  ``fa-hvd-bench robustness`` in every shape from p/f = 4/1 to 64/21): a weighted mean of
  the rows *in gradient units*, ``c^T G``, every weight a continuous function of ``K``:

  1. *Soft nearest-neighbour mixing* (NNM, Allouah et al. AISTATS 2023, with a margin).
     Row ``i`` becomes the weighted mean of the rows nearest to it: ``M_ij`` is
     proportional to ``ramp((t_i - D_ij) / m_i)`` with ``D`` the squared distances,
     ``t_i`` the ``(p - f)``-th smallest of row ``i`` (itself included), ``m_i =
     MARGIN t_i + floor`` and ``ramp(x) = clamp(1 + x, 0, 1)``: the ``p - f``
     nearest rows count fully, a row just beyond them partly, a row farther than
     ``(1 + MARGIN) t_i`` not at all. Mixed rows ``M G``, Gram ``K' = M K M^T``.
     ``neighbours="p-2f"`` (a candidate, not the default) mixes the ``max(2, p - 2f)``
     nearest instead: the rows that every consistent honest set shares, so ``f`` copies placed
     just beyond a tight honest group stay out of its mixed rows (``fa-hvd-bench robustness``,
     label ``flag-mix2f``); the core and the gate of step 4 keep ``t_i`` at ``p - f``.
  2. *The flag median, fitted to the honest majority.* IRLS (the paper's step, above)
     on the mixed rows' unit vectors, from the flag mean (the top-``r`` eigenvectors of
     their cosine matrix), where every row's data weight is multiplied by its *vote*
     ``v_i = ramp((a_i - a_(f+1)) / AGREEMENT_MARGIN)``: ``a_i = sign(<P_i, d>) ||P_i||^2``
     is how well the fit holds row ``i`` on the consensus side (``P_i = Y^T h_i``, ``d =
     sum_i v_i P_i``; a subspace alone cannot tell ``h`` from ``-h``), ``a_(f+1)`` the
     ``(f + 1)``-th smallest agreement: the ``f`` rows that agree least lose their vote as
     they fall more than the margin below the others. Exactly ``iterations`` (20) steps: a stop test
     would be one more decision that rounding could flip.
  3. *Selection in gradient units.* Each mixed row's score is its summed squared distance
     to its ``p - f - 1`` nearest mixed rows (Multi-Krum's score, continuous in ``K``);
     ``s_i = ramp((S_(p-f) - S_i) / (MARGIN S_(p-f) + floor))`` keeps the ``p - f`` best
     fully and lets the weight of the next fade. The centre is the mean of the mixed rows
     weighted by ``v_i s_i``: ``z = c^T G`` with ``c = M^T (v * s) / sum(v * s)``.
  4. *Every row back, clipped around the centre* (centred clipping, Karimireddy et al. ICML
     2021, from this centre): ``CLIP_STEPS`` (3) times ``z <- z + (1/p) sum_i min(1, tau /
     ||x_i - z||) (x_i - z)`` with ``tau`` the ``(p - 2f)``-th smallest ``||x_i - z||``. Honest
     rows the selection left out count again (a selection of ``p - f`` rows is biased when
     honest rows differ, non-IID), and a row beyond ``tau`` moves ``z`` by at most
     ``tau / p``. ``p`` identical rows give that row; no rescaling is needed. Why ``p - 2f``:
     at most ``f`` of the distances are Byzantine, so ``tau`` is at most the ``(p - 2f)``-th
     honest distance and the ``f`` Byzantine rows cannot lift it to the farthest honest row's.
     With the ``(p - f)``-th they could: rows placed just inside the farthest honest distance
     counted whole, and on non-IID shards, where the honest mean is small beside the honest
     spread, IPM's ``-eps`` times the mean (eps 4 at p = 15, f = 3) then cancelled it and
     training stalled (the standing grid's Dirichlet(0.5) cells: 52.5 % against 94.3 %).
     *A separated group is never clipped.* Call the ``p - f`` rows of smallest radius ``t_i``
     (step 1) the core, ``diam`` the largest squared distance within it and ``sep`` the
     smallest from it to another row. When ``sep > diam`` (the honest rows agree more closely
     with each other than with any other row: then they are the core), ``tau`` is raised by
     ``gate * (max_i k_i ||x_i - z|| - tau)``, ``k_i = ramp((t_(p-f) - t_i) / (MARGIN t_(p-f) +
     floor))`` (1 on the core) and ``gate = clamp((sep - diam) / (SEPARATION_MARGIN diam +
     floor), 0, 1)``: at ``gate = 1`` no core row is clipped and an outside row counts at
     most as much as one, so a single step holds the outside rows' share of ``c`` to at most
     ``f / p``, whatever the centre. The gate is 0 wherever two rows tie for the core's last
     place (a tie needs ``sep <= diam``), so it is continuous in ``K``; between ``diam`` and
     ``(1 + SEPARATION_MARGIN) diam`` the raise is partial and the bound is not promised.
     *A row far beyond the core fades.* Clipped to ``tau``, a row still moves ``z`` by ``tau / p``
     however far it lies, and on non-IID shards, where the honest mean is small beside the honest
     spread, ``f`` such pulls outweigh it (p = 7 / f = 2, Dirichlet(0.5), rows at -100 times the
     attackers' own gradients: 80.3 % over 10 seeds, ``configs/eval/p7-noniid.yaml``). So a row
     farther than ``FAR`` (3) times ``rho``, the farthest core row's distance from ``z``, is weighted by
     a further ``FAR rho / ||x_i - z||``: its pull, at most ``FAR rho tau / ||x_i - z||`` over ``p``,
     falls with its distance (there: 96.2 %), and the weight stays continuous in ``K``. The reference
     is the core's farthest row, not ``tau``: at ``3 tau`` honest rows of unusual shards faded too
     (ALIE mu - sigma at p = 15 non-IID fell from 92.3 to 68.1 %). The cost is in the lower bound's
     own geometry, where the ``f`` honest rows outside a tight core lie far beyond it and fade:
     kappa-hat 1.06-1.23x the bound -> 1.21-1.31x at 4/1, 5/1, 8/1 and 15/3.
  5. *A candidate, not the default: towards the geometric median where the Byzantine rows
     outnumber what every honest set shares* (``median_steps``, 0 by default; ``p <= 3f`` only).
     Two sets of ``p - f`` rows share ``p - 2f``. When ``f >= p - 2f``, ``f`` coinciding rows
     beside the shared rows form with them a group as tight as the honest one (the lower bound's
     own geometry): steps 1-3 cannot tell the two apart, and step 4's gate keeps the group they
     chose whole (kappa-hat 1.56-1.98x the bound at 26 of 28 such shapes measured, 1.23x at 7/3
     and 14/6). ``median_steps``
     smoothed Weiszfeld steps from step 4's output, ``z <- sum_i w_i x_i / sum_i w_i`` with ``w_i =
     1 / max(nu, ||x_i - z||)`` (``nu``: ``1e-6`` times the median row norm;
     :func:`.geomed.weiszfeld_weights`), move it towards the geometric median, in which every row
     pulls with a unit vector (breakdown point 1/2): with 3 steps, 1.00-1.40x the bound at those 28
     shapes, 3/1 to 63/21 (the converged median is worse where half the honest rows are tight and half
     spread: 6/2, 2.1x after 30 steps). As in step 4, a row outside the core weighs at most as much
     as the lightest core row, as far as the gate says (:func:`median_step`), which keeps ``f``
     coinciding rows just outside a close honest group at ``f / p`` of ``c`` (``1 / distance``
     alone gave them 0.73 at 25/12). Not the default because training says otherwise: the median
     is drawn to ``f`` coinciding rows inside the honest cloud, and under ALIE, min-max and min-sum
     at p/f = 5/2, 7/3 and 10/4 (30 seeds each) it lost 1.1 to 11.6 points, 5.2 on average
     (``docs/results/robustness.md``).

  Stability. Every choice is a ramp of width ``MARGIN`` or ``SEPARATION_MARGIN`` (relative)
  or ``AGREEMENT_MARGIN`` (absolute) around an order statistic, which is itself continuous in
  ``K``: a change of ``K`` by rounding (a sharded sum of partial Grams, another BLAS) moves
  the weights by about that rounding over the margin, never by a whole row (``floor``: ``1e-12`` times the
  largest ``K_ii``, far above fp64 rounding of ``K``). The flag fit's top-``r`` subspace
  is the one exception: where eigenvalues ``r`` and ``r + 1`` of the weighted scatter
  coincide it is not unique, and rounding can turn it and, through the votes, move the
  output by more than the rounding (the test covers the ramps, not this case). Step 5 applies
  by the shape alone, and its weights are continuous in ``K`` (``nu > 0``; the core it caps
  against changes only where the gate is 0).
  Precondition ``p >= 2f + 1`` (an honest majority: ``p - f`` neighbours and ``p - f``
  selected rows are then mostly honest); ``f`` larger is refused with a ``ValueError``
  naming ``p`` and ``f``, as every rule's :meth:`check`.

  Zero rows have no direction: their unit vector is 0 (no vote in the fit) but they keep
  their place in the distances.

Default mode is a Gram-space rule: the output is ``c^T G`` with ``c`` computed from
``K`` alone (:meth:`Flag.coefficients`). Reference mode is not: its random start needs
``U^T G``. Preconditions: ``r >= 1`` when given; default mode ``p >= 2f + 1``, reference
mode any ``p >= 1`` (the release has no notion of ``f``).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from .base import Aggregator, host_gram
from .geomed import weiszfeld_weights
from .geometry import gram, sq_distances
from .krum import krum_scores

REFERENCE_EPS = 1e-7
REFERENCE_STOP = 1e-10
DEFAULT_ITERATIONS = 20
MARGIN = 0.25
"""Default mode: relative width of the ramps of the neighbour and selection choices."""
CLIP_STEPS = 3
"""Default mode: steps of the mean clipped around the selected centre (step 4)."""
FAR = 3.0
"""Default mode: step 4 fades a row beyond ``FAR`` times the farthest core row's distance from the centre."""
SEPARATION_MARGIN = 0.02
"""Default mode: relative width of the gate that stops step 4 clipping a separated core (squared distances)."""
NEIGHBOURS = ("p-f", "p-2f")
"""Default mode: how many nearest rows step 1 mixes (``neighbours``; see the module docstring)."""
AGREEMENT_MARGIN = 0.1
"""Default mode: width of the vote's ramp, in agreement units (agreements lie in [-1, 1])."""
FLOOR = 1e-12
"""Default mode: a ramp's width is at least this times the largest ``K_ii`` (far above fp64 rounding)."""


def default_rank(p: int, f: int) -> int:
    """FA's default subspace dimension for ``p`` rows and ``f`` Byzantine: ``ceil(p / 2)``,
    at most ``p - f - 1``, at least 1."""
    return max(1, min(math.ceil(p / 2), p - f - 1))


class Flag(Aggregator):
    name = "flag"

    def __init__(
        self,
        f: int = 0,
        mode: str = "default",
        r: int | None = None,
        lambda_: float = 0.0,
        iterations: int | None = None,
        eps: float = REFERENCE_EPS,
        neighbours: str = "p-f",
        median_steps: int = 0,
    ):
        super().__init__(f)
        if mode not in ("default", "reference"):
            raise ValueError(f"flag: mode must be 'default' or 'reference', got {mode!r}")
        if neighbours not in NEIGHBOURS:
            raise ValueError(f"flag: neighbours must be one of {', '.join(map(repr, NEIGHBOURS))}, got {neighbours!r}")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"flag: r must be an integer >= 1 (or None: follows p), got {r!r}")
        if not isinstance(lambda_, (int, float)) or isinstance(lambda_, bool) or not lambda_ >= 0:
            raise ValueError(f"flag: lambda_ must be a number >= 0, got {lambda_!r}")
        if iterations is None:
            iterations = 1 if mode == "reference" else DEFAULT_ITERATIONS
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"flag: iterations must be an integer >= 1, got {iterations!r}")
        if not eps > 0:
            raise ValueError(f"flag: eps must be > 0, got {eps!r}")
        if isinstance(median_steps, bool) or not isinstance(median_steps, int) or median_steps < 0:
            raise ValueError(f"flag: median_steps must be an integer >= 0, got {median_steps!r}")
        self.mode, self.r, self.lambda_, self.iterations, self.eps = mode, r, float(lambda_), iterations, eps
        self.neighbours, self.median_steps = neighbours, median_steps
        self._start_cache: tuple | None = None
        self._warned = False

    def __repr__(self) -> str:
        r = "ceil(p/2)" if self.r is None else self.r
        return (f"Flag(f={self.f}, mode={self.mode!r}, r={r}, lambda_={self.lambda_}, "
                f"iterations={self.iterations}, neighbours={self.neighbours!r}, median_steps={self.median_steps})")

    def rank(self, p: int, f: int) -> int:
        """The subspace dimension used for ``p`` rows: ``r`` as given, else :func:`default_rank`."""
        return default_rank(p, f) if self.r is None else self.r

    def min_workers(self, f: int) -> int:
        """Default mode needs an honest majority, ``p >= 2f + 1``; reference mode any ``p >= 1``."""
        return 2 * f + 1 if self.mode == "default" else 1

    def precondition(self) -> str:
        return "p >= 2f + 1" if self.mode == "default" else "p >= 1"

    def check(self, p: int, f: int | None = None) -> None:
        super().check(p, f)
        if self.r is not None and self.r >= p > 1 and not self._warned:
            self._warned = True
            what = ("sum_i h_i / r, the normalised sum" if self.mode == "reference"
                    else "votes from the sign alone")
            warnings.warn(f"flag: r={self.r} >= p={p} rows: the subspace holds every gradient and FA computes "
                          f"{what}; choose r < p (leave r unset: it follows p, r={default_rank(p, self.f)} "
                          f"here)", stacklevel=2)

    # -- the p x p geometry --------------------------------------------------------
    @property
    def gram_space(self) -> bool:
        return self.mode == "default"

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        eps = torch.finfo(G.dtype).eps
        if self.mode == "default":
            return self._combine(G, host_gram(G), f)
        basis = _gram_basis(gram(G), eps)
        if basis is None:
            return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
        return self._reference(G, basis)

    def aggregate_if_finite(self, G: torch.Tensor, f: int) -> torch.Tensor | None:
        """Default mode reads the rows for the Gram first: its diagonal is finite exactly when every row
        is (:mod:`.geometry` redoes rows that overflow fp32 in fp64), so clean rows need no separate
        check; otherwise None, and the rows are checked and the non-finite ones dropped as usual."""
        if self.mode != "default":
            return None
        K = host_gram(G)
        if not bool(torch.isfinite(K.diagonal()).all()):
            return None
        self.check(G.shape[0], f)
        return self._combine(G, K, f)

    def _combine(self, G: torch.Tensor, K: torch.Tensor, f: int) -> torch.Tensor:
        self.gram = K
        return self.combine_rows(G, self.coefficients(K, f, torch.finfo(G.dtype).eps))

    def coefficients(self, K: torch.Tensor, f: int, eps: float = torch.finfo(torch.float32).eps) -> torch.Tensor:
        """Default mode's ``c`` (``agg(G) = c^T G``) from ``K``; ``eps``: the data's precision (fp32)."""
        if self.mode != "default":
            raise NotImplementedError("flag: reference mode's random start needs U^T G, not K alone")
        device = K.device
        K = K.to(device="cpu", dtype=torch.float64)  # p x p: dozens of tiny steps, cheapest on the CPU
        centre = self.centre(K, f, eps)
        if centre is None:
            return torch.zeros(K.shape[0], dtype=torch.float64, device=device)
        c = centre.c
        for _ in range(CLIP_STEPS):
            c = clipped_mean(K, c, f, centre.core, centre.gate)
        if self.median_steps and K.shape[0] <= 3 * f:
            nu = math.sqrt(FLOOR * float(K.diagonal().median().clamp_min(0))) or math.sqrt(FLOOR)
            for _ in range(self.median_steps):
                c = median_step(K, c, nu, centre.inside, centre.gate)
        return c.to(device)

    def centre(self, K: torch.Tensor, f: int, eps: float = torch.finfo(torch.float32).eps) -> "FlagCentre | None":
        """Default mode's steps 1-3 from the fp64 CPU Gram ``K``: the centre's coefficients and what
        step 4 clips around it with (None when every row is zero)."""
        p = K.shape[0]
        floor = FLOOR * float(K.diagonal().amax().clamp_min(0)) or FLOOR
        D = sq_distances(K=K)
        radius = neighbour_radius(D, p - f)
        M = soft_neighbours(D, radius if self.neighbours == "p-f" else neighbour_radius(D, max(2, p - 2 * f)), floor)
        mixed = M @ K @ M.T
        mixed = (mixed + mixed.T) / 2
        basis = _gram_basis(mixed, eps)
        if basis is None:
            return None
        votes = self.fit(basis, f).votes
        selected = soft_selection(sq_distances(K=mixed), f, floor)
        weights = votes * selected
        return FlagCentre(M.T @ (weights / weights.sum()), soft_smallest(radius, p - f, floor),
                          *separation_gate(D, radius, p - f, floor))

    # -- IRLS ------------------------------------------------------------------------
    def _irls_step(self, P: torch.Tensor, R: torch.Tensor, r: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One IRLS step from projections ``P = Y^T H`` (``(r', p)``) over ``rows`` (all when None);
        returns ``W`` (``(k, r)``, ``Y = Q W``)."""
        p = P.shape[1]
        mask = torch.ones(p, dtype=P.dtype, device=P.device) if rows is None else rows.to(P.dtype)
        w = ((1 - (P * P).sum(0)).abs() + self.eps) ** -0.25 * mask
        if self.lambda_ > 0 and p > 1:
            diff = P[:, :, None] - P[:, None, :]
            v = ((1 - (diff * diff).sum(0)).abs() + self.eps) ** -0.25 * (self.lambda_ / (p * (p - 1)))
            A = 2 * v * v * mask[:, None] * mask[None, :]
            A.fill_diagonal_(0)
            M = R @ (torch.diag(w * w + A.sum(1)) - A) @ R.T
        else:
            M = (R * (w * w)) @ R.T
        evals, evecs = torch.linalg.eigh((M + M.T) / 2)
        return evecs[:, -min(r, R.shape[0]):].flip(1)

    def _objective(self, P: torch.Tensor, rows: torch.Tensor | None = None, pairs: bool = False) -> float:
        """E over ``rows`` (all when None), plus the pair term of ``E_lambda`` when ``pairs``."""
        data = (1 - (P * P).sum(0)).clamp_min(0).sqrt()
        if rows is not None:
            P, data = P[:, rows], data[rows]
        E = float(data.sum())
        q = P.shape[1]
        if pairs and self.lambda_ > 0 and q > 1:
            diff = P[:, :, None] - P[:, None, :]
            pair = (1 - (diff * diff).sum(0)).abs().sqrt()
            p = data.numel() if rows is None else rows.numel()
            E += (self.lambda_ / (p * (p - 1))) ** 2 * float(pair.sum() - pair.diagonal().sum())
        return E

    def _iterate(self, P: torch.Tensor, R: torch.Tensor, r: int, stop) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Reference mode's IRLS from projections ``P``; returns ``(W, P)`` of the kept iterate (``W`` None = start)."""
        W, E = None, self._objective(P)
        prev = (W, P)
        decrease, steps = math.inf, 0
        while steps < self.iterations and not stop(decrease, E):
            W_new = self._irls_step(P, R, r)
            P_new = W_new.T @ R
            E_new = self._objective(P_new)
            decrease = E - E_new
            prev, (W, P, E) = (W, P), (W_new, P_new, E_new)
            steps += 1
        if steps and not decrease > 0:
            W, P = prev
        return W, P

    # -- reference mode ------------------------------------------------------------
    def _random_start(self, n: int, r: int, dtype: torch.dtype, device: torch.device):
        """``U - 0.5`` (``(n, r)``) and the Cholesky factor ``R0`` of its Gram, cached per shape."""
        key = (n, r, dtype, device)
        if self._start_cache is None or self._start_cache[0] != key:
            gen = torch.Generator(device="cpu").manual_seed(1)
            Uc = (torch.rand(n, r, generator=gen, dtype=torch.float32) - 0.5).to(dtype=dtype, device=device)
            R0 = torch.linalg.cholesky(gram(Uc.T)).T  # upper: Uc^T Uc = R0^T R0
            self._start_cache = (key, Uc, R0)
        return self._start_cache[1], self._start_cache[2]

    def _reference(self, G, basis: "_GramBasis") -> torch.Tensor:
        r = self.rank(G.shape[0], self.f)
        Uc, R0 = self._random_start(G.shape[1], r, G.dtype, G.device)
        if r > G.shape[1]:
            raise ValueError(f"flag: reference mode needs r <= n, got r={r}, n={G.shape[1]}")
        UtH = (Uc.T @ G.T).double() * basis.inv[None, :]
        P0 = torch.linalg.solve_triangular(R0.T, UtH, upper=False)  # Y0^T H
        W, P = self._iterate(
            P0, basis.R, r, stop=lambda decrease, E: not (decrease > REFERENCE_STOP and E > REFERENCE_STOP)
        )
        total = P.sum(1) / r  # Y^T H 1 / r
        if W is None:  # the random start survived: Y0 (Y0^T H 1) / r lies outside span(H)
            return Uc @ torch.linalg.solve_triangular(R0, total[:, None], upper=True)[:, 0].to(Uc.dtype)
        return self.combine_rows(G, basis.coefficients(W, total))

    # -- default mode ----------------------------------------------------------------
    def fit(self, basis: "_GramBasis", f: int) -> "FlagFit":
        """Step 2 of the default mode: the flag median of the unit rows, each weighted by its vote."""
        R = basis.R
        p, k = R.shape[1], R.shape[0]
        r = min(self.rank(p, f), k)
        W = torch.eye(k, r, dtype=R.dtype, device=R.device)
        P = W.T @ R
        votes = _votes(P, torch.ones(p, dtype=R.dtype), f)
        for _ in range(self.iterations):
            W = self._irls_step(P, R, r, votes)
            P = W.T @ R
            votes = _votes(P, votes, f)
        return FlagFit(W, votes, r)


class FlagFit(NamedTuple):
    """Default mode's fit: ``Y = Q W``, each row's vote in [0, 1], the dimension."""

    W: torch.Tensor
    votes: torch.Tensor
    r: int


class FlagCentre(NamedTuple):
    """Default mode after steps 1-3: the centre ``z = c^T G``, step 4's core weights ``k_i``, its gate, and
    step 5's core: 1 on the ``p - f`` rows of smallest radius, 0 elsewhere."""

    c: torch.Tensor
    core: torch.Tensor
    gate: float
    inside: torch.Tensor


def clipped_mean(K: torch.Tensor, c: torch.Tensor, f: int, core: torch.Tensor, gate: float) -> torch.Tensor:
    """Step 4: ``z + (1/p) sum_i s_i (x_i - z)`` for ``z = c^T G``, ``s_i = min(1, tau / d_i) min(1, FAR
    rho / d_i)``, ``d_i = ||x_i - z||``, ``tau`` the ``(p - 2f)``-th smallest ``d_i`` (``p >= 2f + 1``)
    raised by ``gate`` towards ``rho``, the farthest ``core`` row's ``d_i``; returns its coefficients, from ``K``."""
    p = K.shape[0]
    d = (K.diagonal() - 2 * (K @ c) + c @ K @ c).clamp_min(0).sqrt()
    tau = d.sort().values[p - 2 * f - 1]
    rho = (core * d).amax()
    if gate > 0:
        tau = tau + gate * (rho - tau)
    s = torch.where(d > tau, tau / d, torch.ones_like(d)) * torch.where(d > FAR * rho, FAR * rho / d, torch.ones_like(d))
    return c * (1 - s.sum() / p) + s / p


def median_step(K: torch.Tensor, c: torch.Tensor, nu: float, inside: torch.Tensor, gate: float) -> torch.Tensor:
    """Step 5: a smoothed Weiszfeld step from ``z = c^T G`` (:func:`.geomed.weiszfeld_weights`) in which a row
    outside the core (``inside``: 1 on it, 0 off it) weighs at most as much as the lightest core row, as far as
    the ``gate`` says; returns its coefficients, from ``K``."""
    w = weiszfeld_weights(K, c, nu)
    lightest = w[inside > 0].amin()
    w = w - gate * (1 - inside) * (w - lightest).clamp_min(0)
    return w / w.sum()


def ramp(x: torch.Tensor) -> torch.Tensor:
    """``clamp(1 + x, 0, 1)``: 1 for ``x >= 0``, 0 for ``x <= -1``, linear between."""
    return (1 + x).clamp(0, 1)


def neighbour_radius(D: torch.Tensor, q: int) -> torch.Tensor:
    """Each row's ``t_i``: the ``q``-th smallest of its squared distances ``D`` (itself included)."""
    return D.sort(dim=1).values[:, q - 1]


def soft_neighbours(D: torch.Tensor, t: torch.Tensor, floor: float) -> torch.Tensor:
    """Step 1: the ``(p, p)`` mixing matrix of soft NNM from squared distances ``D`` and the
    radii ``t`` (:func:`neighbour_radius`; rows sum to 1)."""
    near = ramp((t[:, None] - D) / (MARGIN * t[:, None] + floor))
    return near / near.sum(1, keepdim=True)


def soft_smallest(x: torch.Tensor, q: int, floor: float) -> torch.Tensor:
    """``ramp((x_(q) - x_i) / (MARGIN x_(q) + floor))``: 1 on the ``q`` smallest of ``x`` (>= 0),
    fading to 0 over ``MARGIN`` above the ``q``-th (step 3's selection, step 4's core)."""
    cut = x.sort().values[q - 1]
    return ramp((cut - x) / (MARGIN * cut + floor))


def separation_gate(D: torch.Tensor, t: torch.Tensor, q: int, floor: float) -> tuple[float, torch.Tensor]:
    """Step 4's gate: 1 when the ``q`` rows of smallest radius ``t`` are farther (squared
    distances ``D``) from every other row than ``1 + SEPARATION_MARGIN`` times their largest
    distance among themselves, 0 when not farther at all, linear between (``floor``: the
    smallest width); and those ``q`` rows (1 on them, 0 elsewhere: which rows they are changes
    only where the gate is 0, at a tie for the last place)."""
    order = t.sort().indices
    core, rest = order[:q], order[q:]
    inside = torch.zeros_like(t)
    inside[core] = 1
    if rest.numel() == 0:
        return 0.0, inside
    diam = float(D[core][:, core].amax())
    sep = float(D[core][:, rest].amin())
    return min(max((sep - diam) / (SEPARATION_MARGIN * diam + floor), 0.0), 1.0), inside


def _votes(P: torch.Tensor, previous: torch.Tensor, f: int) -> torch.Tensor:
    """Step 2's votes: ``ramp((a_i - a_(f+1)) / AGREEMENT_MARGIN)`` with the agreements ``a_i``
    of the projections ``P`` (``d``: the projections summed with the ``previous`` votes)."""
    if f == 0:
        return torch.ones_like(previous)
    alignment = (P @ previous) @ P
    agreement = torch.sign(alignment) * (P * P).sum(0)
    threshold = agreement.sort().values[f]
    return ramp((agreement - threshold) / AGREEMENT_MARGIN)


def soft_selection(D: torch.Tensor, f: int, floor: float) -> torch.Tensor:
    """Step 3: ``ramp((S_(p-f) - S_i) / (MARGIN S_(p-f) + floor))`` of the Multi-Krum scores
    ``S_i`` (summed squared distances to the ``p - f - 1`` nearest other rows)."""
    p = D.shape[0]
    if f == 0 or p - f - 1 < 1:
        return torch.ones(p, dtype=D.dtype, device=D.device)
    return soft_smallest(krum_scores(D, f - 1), p - f, floor)  # Krum's count: p - f - 1 nearest others


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
