"""Centered clipping (Karimireddy, He, Jaggi, ICML 2021).

Starting from a centre ``v``, repeat ``iterations`` times

    v <- v + (1/p) sum_i clip(g_i - v, tau),    clip(x, tau) = x min(1, tau / ||x||).

Each step moves ``v`` by at most ``tau``, and ``f`` Byzantine rows move it by at
most ``f tau / p``. Precondition ``p >= 2f + 1``.

Computed in Gram space: ``v = a v0 + G^T c`` with ``v0`` the starting centre, so
every ``||g_i - v||`` comes from the Gram of the rows ``[G; v0]`` (``K``, ``G v0``
and ``||v0||^2``, accumulated in fp64, so a huge finite row neither overflows nor
hides the others: see :mod:`~fa_hvd.aggregators.geometry`); the iterations update
``(a, c)`` only. The centre is the
rule's anchor (:meth:`anchors`): by column blocks (:meth:`by_columns`) a block of
the output is ``a v0[cols] + c^T G[:, cols]``, so the sharded exchange needs only
each shard's share of the ``p + 1`` inner products with ``v0``, summed with its
partial Gram, and reads only its own columns of the centre.

State: the centre is the previous step's aggregate (zeros on the first call),
kept in ``self.center`` (set by :meth:`observe`). :meth:`state_dict` returns
``{"center": tensor or None}`` (a CPU copy) and :meth:`load_state_dict` restores it;
the optimizer stores it in its own ``state_dict``, so a checkpoint resumes with
the same centre, in either exchange. The centre is moved to ``G``'s device and
dtype on use; a change of the gradient length ``n`` between calls is an error.
"""

from __future__ import annotations

import numbers

import torch

from .base import Aggregator, ColumnRule, anchored_gram
from .geometry import combine


class CClip(Aggregator):
    name = "cclip"
    columnwise = True

    def __init__(self, f: int = 0, tau: float = 1.0, iterations: int = 3):
        super().__init__(f)
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
            raise ValueError(f"{self.name}: tau must be a positive number, got {tau!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
            raise ValueError(f"{self.name}: iterations must be a positive integer, got {iterations!r}")
        self.tau, self.iterations = float(tau), int(iterations)
        self.center: torch.Tensor | None = None

    requires = (2, 1)  # p >= 2f + 1

    def anchors(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The centre ``v0`` as a ``(1, n)`` row (zeros before the first step)."""
        if self.center is None:
            return torch.zeros(1, n, dtype=dtype, device=device)
        if self.center.numel() != n:
            raise ValueError(f"{self.name}: gradient length changed from {self.center.numel()} to {n}")
        return self.center.to(device=device, dtype=dtype)[None]

    def aggregate(self, G: torch.Tensor, f: int) -> torch.Tensor:
        v0 = self.anchors(G.shape[1], G.dtype, G.device)
        K = anchored_gram(G, v0).cpu()  # the p x p iterations on the host: no device sync per step
        return self.by_columns(G.shape[0], K, f)(G, slice(0, G.shape[1]))

    def by_columns(self, p: int, K: torch.Tensor, f: int) -> ColumnRule:
        """``(a, c)`` from the Gram of ``[G; v0]`` (``(p + 1, p + 1)``); blocks ``a v0[cols] + c^T G[:, cols]``."""
        Gv0, v0_sq, K = K[:p, p], float(K[p, p]), K[:p, :p]
        a, c = 1.0, torch.zeros(p, dtype=torch.float64, device=K.device)
        for _ in range(self.iterations):
            # ||g_i - v||^2 = K_ii - 2 (a G v0 + K c)_i + a^2 ||v0||^2 + 2 a c.G v0 + c^T K c
            Kc = K @ c
            v_sq = a * a * v0_sq + 2 * a * float(c @ Gv0) + float(c @ Kc)
            dist = (K.diagonal() - 2 * (a * Gv0 + Kc) + v_sq).clamp_min(0).sqrt()
            w = (self.tau / dist).clamp(max=1) / p  # dist == 0 gives inf -> 1
            a, c = a * (1 - float(w.sum())), c * (1 - w.sum()) + w
        center = self.center

        def block_rule(block: torch.Tensor, cols: slice) -> torch.Tensor:
            out = combine(block, c)
            if center is not None:
                out += a * center[cols].to(device=block.device, dtype=block.dtype)
            return out

        return block_rule

    def observe(self, aggregate: torch.Tensor) -> None:
        self.center = aggregate.detach().clone()

    def state_dict(self) -> dict:
        return {"center": None if self.center is None else self.center.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"center"}
        if unknown:
            raise ValueError(f"{self.name}: unknown state keys {sorted(unknown)}")
        center = state.get("center")
        if center is not None and (not isinstance(center, torch.Tensor) or center.dim() != 1):
            raise ValueError(f"{self.name}: center must be None or a 1-D tensor, got {center!r}")
        self.center = None if center is None else center.detach().clone()

    def __repr__(self) -> str:
        return f"CClip(f={self.f}, tau={self.tau}, iterations={self.iterations})"
