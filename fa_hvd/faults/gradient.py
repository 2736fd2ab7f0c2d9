"""Gradient attacks: what a Byzantine rank sends in place of its flat gradient ``g``.

Every attack is ``attack(g, honest, generator, params) -> tensor`` (same shape,
dtype and device as ``g``): ``honest`` is the :class:`HonestView` of this step
for the omniscient attacks (ALIE, IPM, mimic, min-max, min-sum, tailored) and
``None`` for the others,
``generator`` a seeded ``torch.Generator`` on ``g``'s device, ``params`` the
spec's resolved parameters. ``mu`` and ``sigma`` below are the coordinate-wise
mean and standard deviation of the honest gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class HonestView:
    """The gradients of the ranks that are honest at this step: ``rows[k]`` is rank ``ranks[k]``'s."""

    rows: torch.Tensor
    ranks: tuple[int, ...]

    def row(self, rank: int) -> torch.Tensor:
        return self.rows[self.ranks.index(rank)]


def gaussian(g, honest, generator, params):
    """Replace g by noise: N(0, sigma^2) per coordinate."""
    return torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device) * params["sigma"]


def uniform(g, honest, generator, params):
    """Replace g by noise: U[0, 1) per coordinate (the paper's "random" attack)."""
    return torch.rand(g.shape, generator=generator, dtype=g.dtype, device=g.device)


def signflip(g, honest, generator, params):
    """-g."""
    return -g


def reverse(g, honest, generator, params):
    """Scaled reverse: -scale * g."""
    return g * -params["scale"]


def zero(g, honest, generator, params):
    """0."""
    return torch.zeros_like(g)


def nan(g, honest, generator, params):
    """NaN in every coordinate."""
    return torch.full_like(g, float("nan"))


def inf(g, honest, generator, params):
    """sign * Inf in every coordinate."""
    return torch.full_like(g, params["sign"] * float("inf"))


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitflip(g, honest, generator, params):
    """Each element is hit with probability ``rate``; a hit element gets one
    uniformly chosen bit of its binary representation flipped (XOR on an int view)."""
    int_dtype = _INT_OF_SIZE[g.element_size()]
    hit = torch.rand(g.shape, generator=generator, device=g.device) < params["rate"]
    bit = torch.randint(g.element_size() * 8, g.shape, generator=generator, device=g.device, dtype=int_dtype)
    mask = torch.where(hit, torch.ones_like(bit) << bit, torch.zeros_like(bit))
    return (g.contiguous().view(int_dtype) ^ mask).view(g.dtype)


def alie(g, honest, generator, params):
    """A little is enough: mu + sign * z * sigma (sigma with Bessel's correction when
    there are at least two honest rows; ``sign`` +1 or -1, so that both sides of the
    mean are reachable with the z derived from n and f); with ``spread`` > 0 each faulty
    rank adds its own ``spread * sigma * xi`` (xi ~ N(0, I) from this rank's generator), so
    that the copies no longer coincide: the adaptive form against a rule that counts
    coinciding rows (at ``spread`` 1 they differ from each other as honest rows do)."""
    rows = honest.rows
    sigma = rows.std(dim=0, correction=1 if rows.shape[0] > 1 else 0)
    row = rows.mean(dim=0) + (params["sign"] * params["z"]) * sigma
    spread = params.get("spread", 0.0)
    if spread:
        row = row + spread * sigma * torch.randn(row.shape, generator=generator, dtype=row.dtype, device=row.device)
    return row


def ipm(g, honest, generator, params):
    """Inner-product manipulation: -eps * mu."""
    return honest.rows.mean(dim=0) * -params["eps"]


def mimic(g, honest, generator, params):
    """Send a copy of honest rank ``target``'s gradient."""
    return honest.row(params["target"]).clone()


def perturbation(rows: torch.Tensor, direction: str) -> torch.Tensor:
    """Shejwalkar and Houmansadr's perturbation ``d`` of the honest mean, unit norm:
    ``"std"`` -sigma, ``"unit"`` -mu, ``"sign"`` -sign(mu) (each divided by its norm; 0 stays 0)."""
    mu = rows.mean(dim=0)
    if direction == "std":
        d = -rows.std(dim=0, correction=1 if rows.shape[0] > 1 else 0)
    elif direction == "unit":
        d = -mu
    else:
        d = -torch.sign(mu)
    norm = d.norm()
    return d / norm if norm > 0 else d


def _largest_root(a: float, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The largest ``x`` with ``a x^2 + b x + c = 0`` (``a > 0``, ``c <= 0``: the roots are real)."""
    return (-b + (b * b - 4 * a * c).clamp_min(0).sqrt()) / (2 * a)


def minmax(g, honest, generator, params):
    """Min-max (Shejwalkar and Houmansadr, NDSS 2021): ``mu + gamma d`` with the largest
    ``gamma`` for which the row's largest distance to an honest row stays within the largest
    distance between two honest rows (``d``: :func:`perturbation` ``params["direction"]``).
    ``gamma`` is solved exactly (each distance is a quadratic in it); the paper halves its way there."""
    rows = honest.rows.double()
    mu, d = rows.mean(dim=0), perturbation(rows, params["direction"]).double()
    bound = torch.cdist(rows, rows).amax() ** 2
    gap = mu[None, :] - rows
    gamma = _largest_root(float(d @ d) or 1.0, 2 * gap @ d, (gap * gap).sum(1) - bound).amin()
    return (mu + gamma * d).to(g.dtype)


def minsum(g, honest, generator, params):
    """Min-sum (Shejwalkar and Houmansadr, NDSS 2021): ``mu + gamma d`` with the largest
    ``gamma`` for which the row's summed squared distance to the honest rows stays within the
    largest such sum of an honest row (``d`` as in :func:`minmax`; ``gamma`` solved exactly)."""
    rows = honest.rows.double()
    mu, d = rows.mean(dim=0), perturbation(rows, params["direction"]).double()
    bound = (torch.cdist(rows, rows) ** 2).sum(1).amax()
    gap = mu[None, :] - rows
    q = rows.shape[0]
    gamma = _largest_root(q * float(d @ d) or 1.0, 2 * (gap @ d).sum(), (gap * gap).sum() - bound)
    return (mu + gamma * d).to(g.dtype)


TAILORED_SCALES = tuple(2.0 ** k for k in range(-4, 11))
"""The scales ``s`` of the tailored search's grid, in units of the honest spread."""


def tailored(g, honest, generator, params):
    """A black-box search, tailored to the configured rule, for the Byzantine rows' common vector.

    The ``count`` Byzantine rows all send ``mu + s sigma_S u``: ``sigma_S`` is the honest
    spread (the root mean squared distance of the honest rows to ``mu``), ``u`` a unit
    direction among ``-mu``, ``-sigma``, ``-sign(mu)``, the honest rows' two leading principal
    directions (both signs), each honest row's deviation from ``mu`` (capped at 8) and
    ``directions`` random ones, and ``s`` one of :data:`TAILORED_SCALES` (1/16 to 1024). The
    search evaluates ``rule`` (an aggregator name for :func:`fa_hvd.aggregators.get`, with
    ``f``) on the honest rows and the Byzantine copies, keeps the vector farthest from ``mu``,
    then refines its scale by a golden-section search on ``log s`` between the grid's
    neighbours. About (8 + directions) x 15 + 12 evaluations of the rule per call.
    """
    from fa_hvd.aggregators import get

    rows = honest.rows.double()
    rule = get(params["rule"], f=params["f"])
    return tailored_search(rule, rows, params["count"], params["directions"], generator).to(g.dtype)


def tailored_search(rule, rows: torch.Tensor, count: int, directions: int, generator) -> torch.Tensor:
    """The search of :func:`tailored` for the aggregator ``rule`` (a callable ``(p, n) -> (n,)``)
    against the honest ``rows``: the vector that ``count`` Byzantine copies send."""
    mu = rows.mean(dim=0)
    centred = rows - mu
    spread = float(centred.pow(2).sum(1).mean().sqrt()) or float(mu.norm()) or 1.0
    candidates = [perturbation(rows, kind) for kind in ("unit", "std", "sign")]
    _, _, Vh = torch.linalg.svd(centred, full_matrices=False)
    candidates += [s * Vh[k] for k in range(min(2, Vh.shape[0])) for s in (1, -1)]
    candidates += [c / c.norm() for c in centred[:8] if c.norm() > 0]
    noise = torch.randn(directions, rows.shape[1], generator=generator, device=rows.device, dtype=torch.float32)
    candidates += [v.double() / v.norm() for v in noise]

    def error(u: torch.Tensor, s: float) -> float:
        bad = (mu + s * spread * u).expand(count, -1)
        return float((rule(torch.cat([rows, bad])) - mu).norm())

    best = (-1.0, candidates[0], TAILORED_SCALES[0])
    for u in candidates:
        if not u.norm() > 0:
            continue
        for s in TAILORED_SCALES:
            e = error(u, s)
            if e > best[0]:
                best = (e, u, s)
    _, u, s = best
    low, high = math.log(s / 2), math.log(s * 2)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(6):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if error(u, math.exp(a)) >= error(u, math.exp(b)):
            high = b
        else:
            low = a
    s_refined = math.exp((low + high) / 2)
    if error(u, s_refined) > best[0]:
        s = s_refined
    return mu + s * spread * u


ATTACKS: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (gaussian, uniform, signflip, reverse, zero, nan, inf, bitflip, alie, ipm, mimic,
               minmax, minsum, tailored)
}
