"""Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018).

1. Selection: pick ``theta = p - 2f`` gradients one at a time by Krum, each time
   rescoring only the rows not yet picked (``q - f - 2`` neighbours among the
   ``q`` remaining, at least 1; see :func:`.krum.krum_scores`). Ties go to the
   lowest index. All scores index one shared squared-distance matrix, from the
   Gram matrix ``K``.
2. Aggregation: per coordinate, average the ``beta = theta - 2f`` selected values
   closest to the coordinate-wise median of the selection (median as in
   :mod:`.median`, ties in closeness by sorted position).

Phase 2 at memory speed. In a sorted column ``s`` the distances ``d`` to the median
fall, then rise, so the farthest value left is always at one end: removing the
``2f`` values left out one at a time, the farther end first (ties: the upper end),
leaves the ``beta`` closest as a window ``[i, i + beta)`` of ``s``. That removal is a
merge of the two ends' distance sequences, ``A_t = d_t`` and ``B_u = d_(theta-1-u)``,
each made non-increasing by a running minimum (past the bottom of the V the
removal never goes but on ties of equal values); the window start ``i`` is the
number of ``A`` among the first ``2f`` merged, ``sum_{j=1..2f} [A_(j-1) > B_(2f-j)]``.
Everything is elementwise on rows of a column block: the sorting network's outputs
(:mod:`.selection`), then the window's values added in sorted order and divided
by ``beta`` (no running sums, which would cancel against huge values).

By column blocks (:meth:`by_columns`): the selection needs only ``K``, the second
phase only the selected rows of the block. Precondition ``p >= 4f + 3``.
"""

from __future__ import annotations

import functools

import torch

from .base import Aggregator, ColumnRule, host_gram
from .geometry import sq_distances
from .krum import krum_order
from .selection import Reduction, coordinatewise


def bulyan_selection(K: torch.Tensor, f: int) -> list[int]:
    """Phase 1: the ``p - 2f`` rows picked one by one by Krum, from the Gram matrix ``K``."""
    p = K.shape[0]
    D = sq_distances(K=K).cpu()
    remaining = list(range(p))
    selected = []
    for _ in range(p - 2 * f):
        idx = torch.tensor(remaining)
        best = int(krum_order(D[idx][:, idx], f)[0])
        selected.append(remaining.pop(best))
    return selected


class ClosestToMedian(Reduction):
    """Per column of ``theta`` sorted values ``s``: the mean of the ``beta = theta - 2f`` closest to the median.

    Both forms: ``middle = (s[(theta-1)//2] + s[theta//2]) / 2``; the running minima
    ``A'_t`` of ``|s_t - middle|`` from the left and ``B'_u`` of ``|s_(theta-1-u) - middle|``
    from the right (``t, u < 2f``); the window start ``i = sum_{j=1..2f} [A'_(j-1) > B'_(2f-j)]``;
    ``s_i + ... + s_(i+beta-1)`` added in order, divided by ``beta``.
    """

    def __init__(self, theta: int, f: int):
        self.theta, self.f, self.beta = theta, f, theta - 2 * f
        self.positions = tuple(range(theta))

    def torch(self, s, out):
        theta, f, beta = self.theta, self.f, self.beta
        start = torch.zeros_like(out, dtype=torch.long)
        if f:
            middle = (s[(theta - 1) // 2] + s[theta // 2]) / 2
            left, right = [(s[0] - middle).abs_()], [(s[-1] - middle).abs_()]
            for t in range(1, 2 * f):
                left.append(torch.minimum(left[-1], (s[t] - middle).abs_()))
                right.append(torch.minimum(right[-1], (s[theta - 1 - t] - middle).abs_()))
            for j in range(1, 2 * f + 1):
                start += left[j - 1] > right[2 * f - j]
        window = torch.stack(s).gather(0, start[None] + torch.arange(beta, device=out.device)[:, None])
        out.copy_(window[0])
        for row in window[1:]:
            out.add_(row)
        out.div_(beta)

    def c(self, s, ctype):
        theta, f, beta = self.theta, self.f, self.beta
        fabs = "fabsf" if ctype == "float" else "fabs"
        lines = []
        if f:
            lines.append(f"{ctype} middle = ({s[(theta - 1) // 2]} + {s[theta // 2]}) / 2, d;")
            lines.append(f"{ctype} L0 = {fabs}({s[0]} - middle), R0 = {fabs}({s[-1]} - middle);")
            for t in range(1, 2 * f):
                lines.append(f"d = {fabs}({s[t]} - middle); {ctype} L{t} = d < L{t - 1} ? d : L{t - 1};")
                lines.append(f"d = {fabs}({s[theta - 1 - t]} - middle); {ctype} R{t} = d < R{t - 1} ? d : R{t - 1};")
            lines.append("int start = " + " + ".join(f"(L{j - 1} > R{2 * f - j})" for j in range(1, 2 * f + 1)) + ";")
        for i in range(2 * f + 1):
            window = f"{ctype} W{i} = {s[i]};" + "".join(f" W{i} += {v};" for v in s[i + 1 : i + beta])
            lines.append(window)
            lines.append("result = W0;" if i == 0 else f"result = start == {i} ? W{i} : result;")
        lines.append(f"result /= ({ctype}){beta};")
        return lines


@functools.lru_cache(maxsize=None)
def _reduction(theta: int, f: int) -> ClosestToMedian:
    return ClosestToMedian(theta, f)


def closest_to_median(G: torch.Tensor, rows: list[int], f: int) -> torch.Tensor:
    """Phase 2: per column, the mean of the ``len(rows) - 2f`` values of ``G[rows]`` closest to their median."""
    return coordinatewise(G, _reduction(len(rows), f), rows=rows)


class Bulyan(Aggregator):
    name = "bulyan"
    columnwise = True

    requires = (4, 3)  # p >= 4f + 3

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return closest_to_median(G, bulyan_selection(host_gram(G), f), f)

    def by_columns(self, p: int, K: torch.Tensor, f: int) -> ColumnRule:
        rows = bulyan_selection(K, f)
        return lambda block, cols: closest_to_median(block, rows, f)
