"""Which samples each rank trains on, and in what order: seeded, resumable, shared.

The trainer (one process per rank) and the evaluation's simulation (p virtual
workers in one process) both draw batches from here, so the same seed gives the
same data order in both.

* :func:`partition` splits the training set's indices into ``world`` shards:
  IID (a seeded permutation cut into equal parts, the tail dropped) or non-IID
  (per class, Dirichlet(``alpha``) proportions over the ranks, as in Hsu et al.
  2019: small ``alpha`` gives each rank few classes).
* :class:`ShardStream` is one rank's endless stream of indices from its shard:
  pass ``k`` over the shard follows a permutation seeded by ``(seed, rank, k)``
  and the next pass starts where the last one ended, so a rank never runs dry
  (non-IID shards differ in size). Its whole state is one integer, the number
  of samples consumed, which is what a checkpoint saves.
* :func:`steps_per_epoch`: every rank takes the same number of steps per epoch,
  ``len(train) // (world * batch)``, whatever its shard's size: collectives
  must match across ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from fa_hvd.faults.seeding import derive_seed

PARTITION_TRIES = 1000
"""Dirichlet draws tried before giving up on a partition with no shard below ``min_size``."""


def partition(labels: torch.Tensor, world: int, seed: int, alpha: float | None = None,
              min_size: int = 1) -> list[torch.Tensor]:
    """Indices of each rank's shard of a training set with ``labels`` (``(N,)`` int).

    ``alpha=None``: IID, equal shards of ``N // world``. ``alpha > 0``: per class,
    the class's samples (in seeded order) are cut by Dirichlet(``alpha``, ...,
    ``alpha``) proportions; draws are repeated (seeded) until every shard holds at
    least ``min_size`` samples. Raises ``ValueError`` when that cannot be had.
    """
    labels = torch.as_tensor(labels)
    n = labels.numel()
    if world < 1:
        raise ValueError(f"partition: world must be >= 1, got {world}")
    if n // world < max(min_size, 1):
        raise ValueError(f"partition: {n} samples are too few for {world} ranks of at least "
                         f"{max(min_size, 1)} sample(s) each")
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x5A4D))
    order = torch.randperm(n, generator=generator)
    if alpha is None:
        per = n // world
        return [order[r * per:(r + 1) * per].clone() for r in range(world)]
    if not alpha > 0:
        raise ValueError(f"partition: alpha must be > 0, got {alpha}")
    shuffled = labels[order].numpy()
    by_class = [order[torch.from_numpy(np.flatnonzero(shuffled == c))] for c in np.unique(shuffled)]
    rng = np.random.default_rng(derive_seed(seed, 0xD1C1))
    for _ in range(PARTITION_TRIES):
        pieces = [[] for _ in range(world)]
        for members in by_class:
            cuts = (np.cumsum(rng.dirichlet(np.full(world, float(alpha)))) * len(members)).astype(np.int64)[:-1]
            for r, part in enumerate(np.split(np.arange(len(members)), cuts)):
                pieces[r].append(members[torch.from_numpy(part)])
        shards = [torch.cat(p) for p in pieces]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(f"partition: no Dirichlet(alpha={alpha}) split of {n} samples over {world} ranks gave "
                     f"every rank {min_size} sample(s) in {PARTITION_TRIES} draws; raise alpha")


def steps_per_epoch(train_size: int, world: int, batch_size: int) -> int:
    """Optimizer steps per epoch, the same on every rank (at least 1)."""
    return max(1, train_size // (world * batch_size))


class ShardStream:
    """One rank's endless, seeded stream of sample indices from its shard."""

    def __init__(self, indices: torch.Tensor, seed: int, rank: int, shuffle: bool = True):
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        if self.indices.numel() == 0:
            raise ValueError(f"ShardStream: rank {rank} has an empty shard")
        self.seed, self.rank, self.shuffle = seed, rank, shuffle
        self.position = 0
        self._pass: tuple[int, torch.Tensor] | None = None

    def _order(self, k: int) -> torch.Tensor:
        if self._pass is None or self._pass[0] != k:
            if self.shuffle:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, k))
                order = self.indices[torch.randperm(self.indices.numel(), generator=generator)]
            else:
                order = self.indices
            self._pass = (k, order)
        return self._pass[1]

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` indices (crossing into the next pass when this one ends)."""
        size = self.indices.numel()
        out = []
        while count > 0:
            k, offset = divmod(self.position, size)
            piece = self._order(k)[offset:offset + count]
            out.append(piece)
            count -= piece.numel()
            self.position += piece.numel()
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"position": self.position, "shard_size": self.indices.numel()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("shard_size") != self.indices.numel():
            raise ValueError(f"ShardStream: rank {self.rank}'s shard has {self.indices.numel()} samples, the "
                             f"saved state is for {state.get('shard_size')}: a different data set, seed or world")
        self.position = int(state["position"])
