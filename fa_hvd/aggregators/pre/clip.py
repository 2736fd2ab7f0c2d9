"""Static norm clipping: ``g_i <- g_i min(1, tau / ||g_i||)``, ``tau > 0``; ``p' = p``.

A diagonal mixing matrix, from the norms ``||g_i|| = sqrt(K_ii)``.
"""

from __future__ import annotations

import numbers

import torch

from ..base import PreAggregator


def clip_mixing(K: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """``diag(min(1, tau / ||g_i||))``: rows with norm above ``tau`` scaled down to norm ``tau``."""
    norms = K.diagonal().clamp_min(0).sqrt()
    return torch.diag(torch.where(norms > tau, tau / norms, torch.ones_like(norms)))


class Clip(PreAggregator):
    name = "clip"

    def __init__(self, f: int = 0, tau: float = 1.0):
        super().__init__(f)
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
            raise ValueError(f"{self.name}: tau must be a positive number, got {tau!r}")
        self.tau = float(tau)

    def mixing(self, p: int, K: torch.Tensor | None, f: int) -> torch.Tensor:
        return clip_mixing(K, self.tau)

    def __repr__(self) -> str:
        return f"Clip(f={self.f}, tau={self.tau})"
