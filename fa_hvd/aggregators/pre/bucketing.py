"""Bucketing (Karimireddy, He, Jaggi, ICLR 2022).

Each call shuffles the rows with a seeded CPU ``torch.Generator``, splits the
shuffled order into ``ceil(p / s)`` buckets of ``s`` consecutive rows (the last
may be smaller) and returns the bucket means, ``p' = ceil(p / s)``.

State: the generator advances on every call, so ranks that make the same calls
draw the same permutations. :meth:`state_dict` returns
``{"generator": generator.get_state()}`` and :meth:`load_state_dict` restores it,
so a checkpoint resumes the same sequence of permutations.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..base import PreAggregator


class Bucketing(PreAggregator):
    name = "bucketing"
    uses_gram = False

    def __init__(self, f: int = 0, s: int = 2, seed: int = 0):
        super().__init__(f)
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"{self.name}: s must be an integer >= 1, got {s!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"{self.name}: seed must be a non-negative integer, got {seed!r}")
        self.s, self.seed = int(s), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def out_workers(self, p: int) -> int:
        return math.ceil(p / self.s)

    def mixing(self, p: int, K: torch.Tensor | None, f: int) -> torch.Tensor:
        order = torch.randperm(p, generator=self.generator)
        bucket = torch.empty(p, dtype=torch.long)
        bucket[order] = torch.arange(p) // self.s
        sizes = torch.bincount(bucket).to(torch.float64)
        M = torch.zeros(self.out_workers(p), p, dtype=torch.float64)
        M[bucket, torch.arange(p)] = 1 / sizes[bucket]
        return M

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"generator"}
        if unknown:
            raise ValueError(f"{self.name}: unknown state keys {sorted(unknown)}")
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"Bucketing(f={self.f}, s={self.s}, seed={self.seed})"
