"""Gradient attacks: what a Byzantine rank sends in place of its flat gradient ``g``.

Every attack is ``attack(g, honest, generator, params) -> tensor`` (same shape,
dtype and device as ``g``): ``honest`` is the :class:`HonestView` of this step
for the omniscient attacks (ALIE, IPM, mimic) and ``None`` for the others,
``generator`` a seeded ``torch.Generator`` on ``g``'s device, ``params`` the
spec's resolved parameters. ``mu`` and ``sigma`` below are the coordinate-wise
mean and standard deviation of the honest gradients.
"""

from __future__ import annotations

import dataclasses
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
    mean are reachable with the z derived from n and f)."""
    rows = honest.rows
    sigma = rows.std(dim=0, correction=1 if rows.shape[0] > 1 else 0)
    return rows.mean(dim=0) + (params["sign"] * params["z"]) * sigma


def ipm(g, honest, generator, params):
    """Inner-product manipulation: -eps * mu."""
    return honest.rows.mean(dim=0) * -params["eps"]


def mimic(g, honest, generator, params):
    """Send a copy of honest rank ``target``'s gradient."""
    return honest.row(params["target"]).clone()


ATTACKS: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (gaussian, uniform, signflip, reverse, zero, nan, inf, bitflip, alie, ipm, mimic)
}
