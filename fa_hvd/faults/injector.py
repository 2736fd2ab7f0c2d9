"""``FaultInjector``: applies this rank's faults, step by step, to what it sends.

Plug :meth:`FaultInjector.gradient_transform` into
``fa_hvd.DistributedOptimizer(..., gradient_transform=...)``; wrap the training
set with :func:`fa_hvd.faults.poison_for_rank` for the data faults.

Whether spec ``i`` fires on rank ``r`` at step ``t`` is decided by a draw seeded
with ``(seed, r, t, i)``: reproducible, independent across ranks and steps, and
computable by every rank, so the colluders of an omniscient attack agree on who
is honest without talking. ``seed`` must be the same on every rank.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

from .gradient import ATTACKS, HonestView
from .roles import RoleLies
from .seeding import derive_seed, uniform_draw
from .spec import OMNISCIENT_KINDS, FaultSpec


def crash(rank: int, step: int, exit_code: int) -> None:
    """End this process at once: no cleanup, no goodbye to the other ranks."""
    print(f"fa_hvd fault: rank {rank} crashes at step {step}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(exit_code)


def hang(rank: int, step: int) -> None:
    """Stop answering: say so once, then sleep forever."""
    print(f"fa_hvd fault: rank {rank} hangs at step {step}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


class FaultInjector:
    """This rank's view of the fault specs.

    ``counts`` maps a kind to the number of steps it was injected on this rank.
    An omniscient attack (:data:`~.spec.OMNISCIENT_KINDS`) anywhere in ``specs`` makes every rank
    gather its honest buckets through ``transport`` at the steps where such an
    attack is scheduled: one extra allgather per bucket per step.
    """

    def __init__(self, specs: list[FaultSpec], rank: int, world_size: int, seed: int = 0,
                 transport=None, log: logging.Logger = logging.getLogger("fa_hvd.faults")):
        if not 0 <= rank < world_size:
            raise ValueError(f"FaultInjector: rank {rank} is outside the world of {world_size} ranks")
        self.specs = list(specs)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.counts: dict[str, int] = {}
        self._log = log
        self._logged: set[str] = set()
        self._recorded: dict[str, int] = {}  # kind -> the last step it was counted
        self._gradient = [(i, s) for i, s in enumerate(self.specs) if s.category == "gradient"]
        self._process = [(i, s) for i, s in enumerate(self.specs) if s.category == "process"]
        self._omniscient = [s for s in self.specs if s.omniscient]
        self._transport = transport
        self.roles = RoleLies(self)  # lies in other roles (fa_hvd.faults.roles), told where they are asked
        self._honest_cache: tuple[int, list[int]] | None = None
        if self._omniscient:
            self._check_transport()
            kinds = sorted({s.kind for s in self._omniscient})
            log.info("fa_hvd faults: omniscient attack(s) %s need the honest gradients: every rank makes one "
                     "extra allgather per bucket per step while they are scheduled", ", ".join(kinds))

    def _check_transport(self) -> None:
        t = self._transport
        if t is None:
            raise ValueError(f"FaultInjector: omniscient attacks ({', '.join(OMNISCIENT_KINDS)}) need a transport")
        if (t.rank, t.size) != (self.rank, self.world_size):
            raise ValueError(f"FaultInjector: transport is rank {t.rank} of {t.size}, "
                             f"the injector rank {self.rank} of {self.world_size}")

    @property
    def uses_collectives(self) -> bool:
        """True when :meth:`gradient_transform` runs collectives itself (an omniscient
        attack's honest view): the optimizer then starts buckets in index order, the same
        on every rank, so those collectives line up."""
        return bool(self._omniscient)

    # -- scheduling ------------------------------------------------------------------
    def fires(self, index: int, rank: int, step: int) -> bool:
        """Whether spec ``index`` acts on ``rank`` at ``step`` (the same answer on every rank)."""
        spec = self.specs[index]
        if rank not in spec.ranks or not spec.in_window(step):
            return False
        return spec.probability >= 1 or uniform_draw(self.seed, rank, step, index) < spec.probability

    def honest_ranks(self, step: int) -> list[int]:
        """The ranks on which no gradient fault fires at ``step``."""
        if self._honest_cache is None or self._honest_cache[0] != step:
            ranks = [r for r in range(self.world_size) if not any(self.fires(i, r, step) for i, _ in self._gradient)]
            self._honest_cache = (step, ranks)
        return self._honest_cache[1]

    # -- the optimizer hook ----------------------------------------------------------
    def gradient_transform(self, flat: torch.Tensor, bucket_index: int, step: int) -> torch.Tensor:
        """What this rank sends for bucket ``bucket_index`` at ``step``.

        Process faults act at bucket 0 (once per step); gradient faults that fire
        are applied to every bucket of the step, in spec order.
        """
        if bucket_index == 0:
            self._process_faults(step)
        self.roles.step = step
        honest = self._honest_view(flat, bucket_index, step) if self._gathers(step) else None
        for i, spec in self._gradient:
            if self.fires(i, self.rank, step):
                generator = torch.Generator(device=flat.device)
                generator.manual_seed(derive_seed(self.seed, self.rank, step, i, bucket_index))
                flat = ATTACKS[spec.kind](flat, honest, generator, spec.params)
                if bucket_index == 0:
                    self.record(spec, step)
        return flat

    def _gathers(self, step: int) -> bool:
        """Depends on the schedule only (never on a draw), so every rank agrees."""
        return any(s.in_window(step) for s in self._omniscient)

    def _honest_view(self, flat: torch.Tensor, bucket_index: int, step: int) -> HonestView:
        rows = self._transport.allgather(flat.reshape(1, -1), name=f"fa_hvd.faults.honest{bucket_index}")
        ranks = self.honest_ranks(step)
        return HonestView(rows[ranks], tuple(ranks))

    def _process_faults(self, step: int) -> None:
        for i, spec in self._process:
            if not self.fires(i, self.rank, step):
                continue
            self.record(spec, step)
            if spec.kind == "slow":
                time.sleep(spec.params["delay"])
            elif spec.kind == "hang":
                hang(self.rank, step)
            else:
                crash(self.rank, step, spec.params["exit_code"])

    def record(self, spec: FaultSpec, step: int) -> None:
        """Count ``spec`` once per step it acts on (and log its first time)."""
        if self._recorded.get(spec.kind) == step:
            return
        self._recorded[spec.kind] = step
        self.counts[spec.kind] = self.counts.get(spec.kind, 0) + 1
        if spec.kind not in self._logged:
            self._logged.add(spec.kind)
            self._log.warning("rank %d: injecting %s (first at step %d)", self.rank, spec.describe(), step)
