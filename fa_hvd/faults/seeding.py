"""Deterministic random streams keyed by integers (seed, rank, step, ...).

Every random decision of the fault layer is a pure function of its keys, so a
run is reproducible and any rank can recompute another rank's draw (which is
how attackers agree on who is honest without communicating).
"""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys (NumPy's SeedSequence hash)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def uniform_draw(*keys: int) -> float:
    """One number in [0, 1), a pure function of ``keys``."""
    return float(np.random.default_rng(derive_seed(*keys)).random())
