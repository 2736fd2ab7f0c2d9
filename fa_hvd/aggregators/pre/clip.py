"""Static norm clipping: ``g_i <- g_i min(1, tau / ||g_i||)``, ``tau > 0``; ``p' = p``."""

from __future__ import annotations

import numbers

import torch

from ..base import PreAggregator


def clip_rows(G: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Scale every row of ``G`` with norm above ``tau`` down to norm ``tau``."""
    norms = torch.linalg.vector_norm(G, dim=1)
    scale = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
    return G * scale[:, None]


class Clip(PreAggregator):
    name = "clip"

    def __init__(self, f: int = 0, tau: float = 1.0):
        super().__init__(f)
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
            raise ValueError(f"{self.name}: tau must be a positive number, got {tau!r}")
        self.tau = float(tau)

    def transform(self, G: torch.Tensor, f: int) -> torch.Tensor:
        return clip_rows(G, self.tau)

    def __repr__(self) -> str:
        return f"Clip(f={self.f}, tau={self.tau})"
