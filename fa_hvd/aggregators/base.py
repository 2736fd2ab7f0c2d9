"""The interface every aggregation rule implements.

An aggregator maps a ``(p, n)`` matrix ``G`` (one row per worker's gradient) to
an ``(n,)`` aggregate. Rules are pure tensor math: no communication, deterministic
for the same input, so every rank computes the same aggregate bit for bit.

Shared behaviour, implemented once here:

* ``G`` must be a 2-D floating tensor with at least one row and one column.
  fp16 and bf16 are computed in fp32; the result has ``G``'s dtype and device.
* Non-finite rows. A row holding NaN or +/-Inf comes from a faulty worker that
  has identified itself. A robust rule (``robust = True``) drops such rows before
  aggregating and counts them against ``f``: with ``k`` such rows it aggregates
  the remaining ``p - k`` rows with ``f' = max(f - k, 0)``. Every precondition
  of the form ``p >= a f + b`` that held for ``(p, f)`` still holds for
  ``(p - k, f')``. When every row is non-finite the aggregate is zero (the step
  changes nothing). ``mean`` is not robust and stays the plain mean.
* Preconditions on ``(p, f)`` are checked by :meth:`Aggregator.check`, which the
  optimizer calls before training, and again on every call.
* Gram space. Many rules return a combination of the rows, ``agg(G) = c^T G``, with
  ``c`` a function of the Gram matrix ``K = G G^T`` alone (Krum, Multi-Krum, MDA,
  geomed, nmean, FA's default mode, the mean). They set ``gram_space = True`` and
  implement :meth:`Aggregator.coefficients`; ``aggregate`` is then ``combine(G,
  coefficients(gram(G), f))``. Pre-aggregators that mix rows, ``G' = M G``, expose
  ``M`` through :meth:`PreAggregator.mixing`, so a composition stays in Gram space
  (``K' = M K M^T``). A sharded exchange, which never holds ``G`` whole, needs
  exactly this: ``K`` summed from partial Grams, then ``c``, then ``c^T G`` per shard.
* Column blocks. A rule with ``columnwise = True`` can be computed one block of
  columns at a time from global information that fits in ``p x p``:
  :meth:`Aggregator.by_columns` turns the Gram ``K`` (of the rows followed by the
  rule's :meth:`~Aggregator.anchors`, e.g. cclip's centre) into a function of column
  blocks. Gram rules (``c^T G[:, cols]``), the coordinate-wise rules (median, trimmed
  mean; ``uses_gram = False``: no ``K`` needed), Bulyan (selection from ``K``, then
  coordinate-wise) and cclip are. Stateful rules learn the step's whole aggregate
  through :meth:`Aggregator.observe`. The sharded exchange computes every rule this
  way; ``__call__`` is the same computation on one block, all of ``G``.
* Diagnostics. After each aggregation :attr:`Aggregator.diagnostics` says what the
  rule did with the ``p`` rows (:func:`describe`): the non-finite rows it dropped
  and, for rules that combine rows (``agg = c^T G``), each row's coefficient
  ``c_i`` and the rows it gave no weight, and with the Gram the weights came from
  (:attr:`Aggregator.gram`) each row's place against the aggregate (:func:`residuals`).
  The optimizer reports them in ``stats``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .geometry import combine, cross_gram, gram

ColumnRule = Callable[[torch.Tensor, slice], torch.Tensor]
"""``rule(G[:, cols], cols) -> agg(G)[cols]``: a rule applied to one block of columns."""


class Aggregator:
    """Base class: subclasses set ``name`` and implement :meth:`aggregate`."""

    name = "aggregator"
    robust = True
    requires = (0, 1)  # (a, b): the rule needs p >= a f + b workers
    gram_space = False  # True: the aggregate is coefficients(K, f)^T G
    uses_gram = True  # by_columns needs K (False: the coordinate-wise rules)

    def __init__(self, f: int = 0):
        self.f = check_f(f, self.name)
        self.weights: torch.Tensor | None = None  # the last aggregate's c, when it was c^T G
        self.gram: torch.Tensor | None = None  # the Gram of the rows that c was computed from, when known
        self.diagnostics: dict = {}  # the last aggregation, per row: describe()

    # -- preconditions ---------------------------------------------------------
    def min_workers(self, f: int) -> int:
        """Smallest number of workers the rule accepts for ``f`` Byzantine ones."""
        a, b = self.requires
        return a * f + b

    def check(self, p: int, f: int | None = None) -> None:
        """Raise ``ValueError`` unless the rule can aggregate ``p`` workers."""
        f = self.f if f is None else f
        need = self.min_workers(f)
        if p < need:
            raise ValueError(
                f"{self.name}: needs at least {need} workers for f={f} "
                f"({self.precondition()}), got p={p}"
            )

    def precondition(self) -> str:
        """The precondition in words, for error messages."""
        a, b = self.requires
        return f"p >= {a}f + {b}" if a else f"p >= {b}"

    # -- aggregation -------------------------------------------------------------
    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        """Aggregate finite rows ``G`` (``(p, n)``, fp32 or fp64) with ``f`` Byzantine."""
        if self.gram_space:
            K = self.gram = host_gram(G)
            return self.combine_rows(G, self.coefficients(K, f))
        raise NotImplementedError

    def combine_rows(self, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``c^T G``, keeping ``c`` as :attr:`weights` for :attr:`diagnostics`."""
        self.weights = c
        return combine(G, c)

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        """``c`` (``(p,)``, fp64) with ``agg(G) = c^T G``, from the fp64 Gram ``K`` of finite rows.

        Only rules with ``gram_space = True`` implement it.
        """
        raise NotImplementedError(f"{self.name}: not computed in Gram space")

    # -- by column blocks (the sharded exchange) -------------------------------------
    @property
    def columnwise(self) -> bool:
        """True when :meth:`by_columns` works: Gram rules, and rules that set it."""
        return self.gram_space

    @property
    def combines_columns(self) -> bool:
        """True when :meth:`by_columns` gives ``c^T G[:, cols]`` as defined here, which also takes an
        ``out=`` to write into (a Gram rule that does not override it)."""
        return self.gram_space and type(self).by_columns is Aggregator.by_columns

    def anchors(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Extra ``(m, n)`` rows whose inner products with ``G``'s rows :meth:`by_columns` needs (None: none)."""
        return None

    def by_columns(self, p: int, K: torch.Tensor | None, f: int) -> ColumnRule:
        """The rule on column blocks: ``by_columns(p, K, f)(G[:, cols], cols) == aggregate(G, f)[cols]``.

        ``K``: the fp64 Gram of the ``p`` (finite) rows of ``G`` followed by :meth:`anchors`
        (None when ``uses_gram`` is False). Gram rules give ``c^T G[:, cols]`` (into ``out`` when given).
        """
        if not self.gram_space:
            raise NotImplementedError(f"{self.name}: cannot be computed by column blocks")
        c = self.weights = self.coefficients(K, f)
        self.gram = K[:p, :p]
        return lambda block, cols, out=None: combine(block, c, out)

    def observe(self, aggregate: torch.Tensor) -> None:
        """Told each step's whole aggregate (stateful rules keep what they need of it)."""

    def aggregate_if_finite(self, G: torch.Tensor, f: int) -> torch.Tensor | None:
        """:meth:`aggregate` of ``G`` (``(p, n)``, rows not yet checked, ``p >= min_workers(f)``) when the
        pass that reads ``G`` also finds every row finite; None when it does not (or the rule cannot tell
        in that pass): :meth:`__call__` then checks the rows (:func:`finite_rows`), drops the non-finite
        ones and aggregates the rest. A robust rule that overrides it reads clean rows once."""
        return None

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        G = check_matrix(G, self.name)
        work = G if G.dtype in (torch.float32, torch.float64) else G.float()
        self.weights = self.gram = None
        rows, out = Rows(None, self.f), None
        if self.robust and work.shape[0] >= self.min_workers(self.f):
            out = self.aggregate_if_finite(work, self.f)
        if out is None:
            rows = surviving_rows(finite_rows(work), self.f) if self.robust else rows
            if rows.none_left:
                self.diagnostics = describe(G.shape[0], rows, None)
                return torch.zeros(work.shape[1], dtype=G.dtype, device=G.device)
            if rows.keep is not None:
                work = work[rows.keep]
            self.check(work.shape[0], rows.f)
            out = self.aggregate(work, rows.f)
        self.diagnostics = describe(G.shape[0], rows, self.weights, self.gram)
        self.observe(out)
        return out.to(G.dtype)

    # -- state (only stateful rules override) ---------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name}: has no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f})"


class PreAggregator:
    """A stage that maps ``(p, n)`` to ``(p', n)`` before a rule aggregates: ``G' = M G``.

    Subclasses implement :meth:`mixing`, the ``(p', p)`` matrix ``M``; ``out_workers(p)``
    gives ``p'``. ``uses_gram = False`` says ``mixing`` ignores ``K`` (it gets None).
    """

    name = "pre"
    uses_gram = True

    def __init__(self, f: int = 0):
        self.f = check_f(f, self.name)

    def out_workers(self, p: int) -> int:
        return p

    def check(self, p: int, f: int) -> None:
        """Raise ``ValueError`` unless the stage can take ``p`` workers."""

    def mixing(self, p: int, K: torch.Tensor | None, f: int) -> torch.Tensor:
        """The ``(p', p)`` fp64 matrix ``M`` of ``G' = M G``, from the Gram ``K`` of the ``p`` rows."""
        raise NotImplementedError

    def transform(self, G: torch.Tensor, f: int) -> torch.Tensor:
        """``M G`` in ``G``'s dtype."""
        M = self.mixing(G.shape[0], host_gram(G) if self.uses_gram else None, f)
        return M.to(device=G.device, dtype=G.dtype) @ G

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name}: has no state, got keys {sorted(state)}")


class Composed(Aggregator):
    """Pre-aggregation stages followed by a rule: ``rule(pre_k(...pre_1(G)))``."""

    def __init__(self, stages: list[PreAggregator], rule: Aggregator):
        self.stages = list(stages)
        self.rule = rule
        self.name = "+".join([s.name for s in self.stages] + [rule.name])
        self.robust = True
        self.gram_space = rule.gram_space
        self.uses_gram = rule.uses_gram or any(stage.uses_gram for stage in self.stages)
        super().__init__(rule.f)

    @property
    def columnwise(self) -> bool:
        return self.rule.columnwise

    def check(self, p: int, f: int | None = None) -> None:
        f = self.f if f is None else f
        for stage in self.stages:
            stage.check(p, f)
            p = stage.out_workers(p)
        self.rule.check(p, f)

    def mixing(self, p: int, K: torch.Tensor | None, f: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stages' product ``M = M_k ... M_1`` and the Gram ``M K M^T`` of the mixed rows."""
        M = torch.eye(p, dtype=torch.float64, device=None if K is None else K.device)
        for stage in self.stages:
            step = stage.mixing(M.shape[0], K, f).to(M.device)
            M = step @ M
            K = None if K is None else step @ K @ step.T
        return M, K

    def coefficients(self, K: torch.Tensor, f: int) -> torch.Tensor:
        M, mixed = self.mixing(K.shape[0], K, f)
        return M.T @ self.rule.coefficients(mixed, f)

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        if self.gram_space:
            return self.combine_rows(G, self.coefficients(host_gram(G), f))
        if not self.rule.columnwise:
            K = host_gram(G) if any(stage.uses_gram for stage in self.stages) else None
            M, _ = self.mixing(G.shape[0], K, f)
            return self.rule.aggregate(M.to(device=G.device, dtype=G.dtype) @ G, f)
        anchors = self.anchors(G.shape[1], G.dtype, G.device)
        K = anchored_gram(G, anchors).cpu() if self.uses_gram else None  # p x p work on the host
        return self.by_columns(G.shape[0], K, f)(G, slice(0, G.shape[1]))

    def anchors(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return self.rule.anchors(n, dtype, device)

    def by_columns(self, p: int, K: torch.Tensor | None, f: int) -> ColumnRule:
        """Mix, then the rule: ``M K M^T`` (anchors unmixed) gives the rule's blocks of ``M G``."""
        if self.gram_space:
            return super().by_columns(p, K, f)
        M, mixed = self.mixing(p, None if K is None else K[:p, :p], f)
        if K is not None and K.shape[0] > p:  # anchors: cross terms M X, anchor Gram unchanged
            cross = M @ K[:p, p:]
            mixed = torch.cat([torch.cat([mixed, cross], 1), torch.cat([cross.T, K[p:, p:]], 1)])
        inner = self.rule.by_columns(M.shape[0], mixed if self.rule.uses_gram else None, f)
        return lambda block, cols: inner(M.to(device=block.device, dtype=block.dtype) @ block, cols)

    def observe(self, aggregate: torch.Tensor) -> None:
        self.rule.observe(aggregate)

    def state_dict(self) -> dict:
        state = {s.name: s.state_dict() for s in self.stages}
        state[self.rule.name] = self.rule.state_dict()
        return {k: v for k, v in state.items() if v}

    def load_state_dict(self, state: dict) -> None:
        parts = {s.name: s for s in self.stages}
        parts[self.rule.name] = self.rule
        unknown = set(state) - set(parts)
        if unknown:
            raise ValueError(f"{self.name}: no stage named {sorted(unknown)} in state")
        for name, part in parts.items():
            part.load_state_dict(state.get(name, {}))

    def __repr__(self) -> str:
        return f"Composed({self.stages!r}, {self.rule!r})"


def check_f(f, name: str) -> int:
    """``f`` must be a non-negative integer."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"{name}: f must be a non-negative integer, got {f!r}")
    return f


class Rows(NamedTuple):
    """The rows a rule aggregates and the ``f`` left for them."""

    keep: torch.Tensor | None  # indices of the rows kept; None: every row
    f: int

    @property
    def none_left(self) -> bool:
        return self.keep is not None and self.keep.numel() == 0


def surviving_rows(finite: torch.Tensor, f: int) -> Rows:
    """A robust rule's rows: the finite ones, with ``f`` reduced by the number dropped (at least 0).

    ``finite`` is the ``(p,)`` mask of rows without NaN or Inf. Both the allgather
    and the sharded exchange apply this policy (:meth:`Aggregator.__call__`).
    """
    bad = int((~finite).sum())
    if not bad:
        return Rows(None, f)
    return Rows(finite.nonzero().flatten(), max(f - bad, 0))


def describe(p: int, rows: Rows, weights: torch.Tensor | None, K: torch.Tensor | None = None) -> dict:
    """What a rule did with ``p`` rows, by row index (rank).

    ``nonfinite``: the rows dropped for NaN or Inf. ``weights`` (only when the
    aggregate was ``c^T G`` over the kept rows): each row's ``c_i``, 0 for a
    dropped row (the mean gives ``1/p`` each; FA ``w_i m / ||g_i||``). ``dropped``:
    the non-finite rows and, with weights, every row of weight 0 (Krum's losers,
    the rows FA left out). With the kept rows' Gram ``K`` as well, ``alignment`` and
    ``distance`` (:func:`residuals`; None for a dropped row or a step where they are
    undefined).
    """
    kept = list(range(p)) if rows.keep is None else rows.keep.tolist()
    nonfinite = sorted(set(range(p)) - set(kept))
    if weights is None or weights.numel() != len(kept):
        return {"nonfinite": nonfinite, "dropped": nonfinite}
    full = [0.0] * p
    for row, weight in zip(kept, weights.tolist()):
        full[row] = weight
    out = {"nonfinite": nonfinite, "weights": full, "dropped": [i for i in range(p) if full[i] == 0.0]}
    if K is not None and tuple(K.shape) == (len(kept), len(kept)):
        for key, values in zip(("alignment", "distance"), residuals(K, weights)):
            spread = [None] * p
            for row, value in zip(kept, values or ()):
                spread[row] = value
            out[key] = spread
    return out


def residuals(K: torch.Tensor, c: torch.Tensor) -> tuple[list[float] | None, list[float] | None]:
    """Where each row ``x_i`` sits against the aggregate ``a = c^T G``, from the rows' Gram ``K`` alone.

    ``alignment_i``: the cosine of ``x_i`` with the aggregate of the *others*, ``a - c_i x_i``:
    ``((Kc)_i - c_i K_ii) / sqrt(K_ii (c^T K c - 2 c_i (Kc)_i + c_i^2 K_ii))``. Leaving the row out
    keeps its own share (large where batch noise dominates the rows) from making it agree with
    itself. Positive for an honest row (the others share its expected gradient); about minus an
    honest row's for a sign flip; about -1 for IPM's ``-eps mean``. Bounded, so that a window's
    mean is not ruled by the steps where ``a`` is small.
    ``distance_i = ||x_i - a||^2 / median_j ||x_j - a||^2 = (K_ii - 2 (Kc)_i + c^T K c) / median``:
    about 1 for rows of similar noise, far below 1 for a row placed at the centre (ALIE, IPM),
    which no row with its own batch noise is.
    Each is None where undefined (``a = 0``, a zero median; a zero row, or no other row with weight).
    O(p^2) on the host.
    """
    K = K.to(device="cpu", dtype=torch.float64)
    c = c.to(device="cpu", dtype=torch.float64)
    Kc, diag = K @ c, K.diagonal().clamp_min(0)
    q = float(c @ Kc)
    if not math.isfinite(q) or q <= 0:
        return None, None
    others = (q - 2 * c * Kc + c * c * diag).clamp_min(0)
    norms = (diag * others).sqrt()
    alignment = [float(v / n) if n > 0 else None for v, n in zip(Kc - c * diag, norms)]
    spread = (diag - 2 * Kc + q).clamp_min(0)
    median = float(spread.median())
    distance = (spread / median).tolist() if median > 0 and math.isfinite(median) else None
    return alignment, distance


def host_gram(G: torch.Tensor) -> torch.Tensor:
    """:func:`.geometry.gram` on the host: the rules' ``p x p`` work runs on the CPU, where it is
    cheapest (one transfer of ``K`` instead of a device synchronisation per iteration)."""
    return gram(G).cpu()


def anchored_gram(G: torch.Tensor, anchors: torch.Tensor | None, exact: bool = False) -> torch.Tensor:
    """fp64 Gram of ``G``'s rows followed by ``anchors``': :func:`.geometry.gram` (within its bound),
    or with ``exact`` every entry a sum of exact fp64 products (:func:`.geometry.cross_gram`), as the
    sharded exchange's partial Grams must be: their diagonals are checked against each sender's own
    fp64 squared norms and the whole against positive semidefiniteness (:mod:`fa_hvd.exchange.evidence`)."""
    square = (lambda X: cross_gram(X, X)) if exact else gram
    K = square(G)
    if anchors is None:
        return K
    anchors = anchors.to(G.dtype)
    cross = cross_gram(G, anchors)
    return torch.cat([torch.cat([K, cross], 1), torch.cat([cross.T, square(anchors)], 1)])


def finite_rows(G: torch.Tensor) -> torch.Tensor:
    """``(p,)`` bool: rows without NaN or +/-Inf.

    On the CPU one pass: a row whose sum is finite holds no NaN or +/-Inf (they propagate through
    any sum in any order), and only the rows whose sum is not (non-finite ones, or finite ones
    whose sum overflowed) are checked value by value. Elsewhere, and for those rows, two
    reductions, max and min (NaN propagates through both), without a host synchronisation.
    """
    if G.device.type != "cpu":
        return _extremes_finite(G)
    finite = G.sum(dim=1).isfinite()
    if not bool(finite.all()):
        suspects = (~finite).nonzero().flatten()
        finite[suspects] = _extremes_finite(G[suspects])
    return finite


def _extremes_finite(G: torch.Tensor) -> torch.Tensor:
    return G.amax(dim=1).isfinite() & G.amin(dim=1).isfinite()


def check_matrix(G: torch.Tensor, name: str) -> torch.Tensor:
    """Validate that ``G`` is a non-empty ``(p, n)`` floating tensor."""
    if not isinstance(G, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape (p, n), got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (p, n) tensor, got shape {tuple(G.shape)}")
    if G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (p, n) tensor, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {G.dtype}")
    return G
