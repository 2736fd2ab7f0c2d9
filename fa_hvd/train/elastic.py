"""Elastic mode (``elastic.enabled``): Horovod's ``hvd.elastic.run`` around the training loop.

Launch with ``launch/elastic.sh`` or ``python -m fa_hvd.horovodrun -np N --min-np M --max-np K
--host-discovery-script S fa-hvd-train ...`` (Gloo; :mod:`fa_hvd.horovodrun` is horovodrun not held
up by a cut-off rank 0). :class:`ElasticState` is the Horovod state object:

* ``commit()`` every ``elastic.commit_every_steps`` steps keeps an in-memory
  copy of the shared state (model, optimizer with the aggregator's state,
  schedule, scaler, step, spent faults) and checks for host changes;
* after a failure (``HorovodInternalError``: a rank died) the survivors
  ``restore()`` that copy; Horovod re-forms the world;
* ``sync()`` (at the start and after every change) broadcasts rank 0's state to
  every rank, new ones included, and each rank joins the new world: shards are
  re-partitioned for the new size, every stream restarts at ``step x batch``,
  generators are re-seeded from the step, faults on ranks outside the world are
  dropped and a crash or hang that already happened is not repeated.

The aggregator's ``f`` stays what the config says; when the world falls below
what the rule needs, the run stops with a message saying so (exit status 1).
``robust.evict`` (:mod:`fa_hvd.train.eviction`) lists a distrusted rank's host in the
exclusion file that the host discovery reads, commits at once and trains on: Horovod
drops the host at a later commit (a reset without a sync, so :func:`run_elastic`'s
loop syncs) and the others continue from that commit.
A world change is an event in the log (``metrics.jsonl`` and rank 0's output); a world
of another size starts the trust ledger's per-rank figures (:mod:`fa_hvd.train.trust`) again,
as its ranks are numbered anew, and keeps the suspects named before.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING

import horovod.torch as hvd
import torch
from horovod.common.elastic import State

from fa_hvd import checkpoint
from fa_hvd.exchange import agree_on_compiled_kernels
from fa_hvd.train import control, resume

if TYPE_CHECKING:
    from fa_hvd.train.trainer import Trainer

EXIT_TOO_FEW = 1


class WorldTooSmall(RuntimeError):
    """The world shrank below what the aggregator needs."""


class ElasticState(State):
    """Horovod's state object for the trainer (see the module docstring)."""

    def __init__(self, trainer: Trainer, resume_args: tuple[str, bool]):
        self.trainer = trainer
        self.resume = resume_args  # (--resume, --resume-reshard), used by the world's first sync
        self.committed = None
        self.changed_world = False
        super().__init__(bcast_object=self._broadcast, get_rank=hvd.rank)

    @staticmethod
    def _broadcast(obj):  # Horovod's own host-update message from rank 0 (trusted: the README's threat model)
        return hvd.broadcast_object(obj, root_rank=0, name="fa_hvd.train.elastic.hosts")

    def save(self) -> None:
        self.committed = copy.deepcopy(self.trainer.shared_state())

    def restore(self) -> None:
        """After a failure: name who no longer answers (whichever collective this rank was in, Horovod's
        own host-update broadcast at a commit included), then go back to the last commit."""
        self.trainer.transport.report_failure()
        if self.committed is not None:
            self.trainer.load_shared(self.committed)

    def reset(self) -> None:
        self.changed_world = True

    def sync(self) -> None:
        trainer = self.trainer
        before = trainer.world
        trainer.transport.refresh()
        trainer.transport.start_roll_call()  # the roster of this world
        agree_on_compiled_kernels(trainer.transport, "fa_hvd.train.elastic.kernels")  # this world's ranks
        trainer.rank, trainer.world = trainer.transport.rank, trainer.transport.size
        first = torch.tensor([float(self.resume is not None)])  # rank 0's first sync is the world's
        trainer.transport.broadcast_(first, 0, "fa_hvd.train.elastic.first")
        notes = []
        if float(first[0]):  # every rank: the checkpoint to start from (fa_hvd.train.resume)
            how, reshard = self.resume
            chosen, notes = resume.choose(trainer.transport, trainer.run_dir, how, trainer.compatible(reshard),
                                          trainer.lock)
            if trainer.rank == 0:
                resume.write_config(trainer.run_dir, trainer.conf_data, trainer.config_hash)
                if chosen is not None:
                    trainer.load_shared(chosen)
            del chosen
        self.resume = None
        notes = trainer.transport.broadcast_state(notes if trainer.rank == 0 else None, 0,
                                                  name="fa_hvd.train.elastic.notes")
        payload = checkpoint.broadcast_bytes(trainer.transport, checkpoint.dumps(trainer.shared_state())
                                             if trainer.rank == 0 else None, 0, "fa_hvd.train.elastic.state")
        state = checkpoint.loads(payload, "elastic state from rank 0")
        del payload
        trainer.load_shared(state)
        if trainer.log is not None:
            trainer.log.rewind(trainer.step)  # the steps after the last commit are done again
        join(trainer)
        trainer.reseed()
        self.committed = state
        for note in notes:
            trainer.event(note)
        if self.changed_world:
            self.changed_world = False
            trainer.event(f"elastic: the world changed from {before} to {trainer.world} ranks; continuing at "
                          f"step {trainer.step} on {trainer.world} ranks", world_size=trainer.world)


def join(trainer: Trainer) -> None:
    """Re-check the rule for this world; rebuild this rank's shard, stream and faults."""
    trainer.meet()
    try:
        trainer.check_world()
    except ValueError as exc:
        raise WorldTooSmall(f"elastic: cannot continue on {trainer.world} ranks: {exc}") from None
    trainer.join_world()
    trainer.open_trust()  # a world of another size numbers its ranks anew: trust starts again, its suspects kept
    if trainer.rank == 0 and trainer.log is None:  # the world's first rank 0, or one after rank 0 was lost
        trainer.lock.take_over()
        trainer.open_outputs()


def run_elastic(trainer: Trainer, args, signals: control.StopSignals) -> int:
    """Train under ``hvd.elastic.run``; returns the exit status (:class:`~fa_hvd.train.resume.UsageError`
    on bad input, for the caller to report)."""
    try:
        trainer.load_data()
        trainer.check_world()
    except ValueError as exc:
        raise resume.UsageError(str(exc)) from None
    trainer.build()
    trainer.last_checkpoint_time = time.monotonic()
    state = ElasticState(trainer, resume_args=(args.resume, args.resume_reshard))

    @hvd.elastic.run
    def train(state: ElasticState) -> int:
        if state.changed_world:  # a reset that Horovod did not follow with a sync (hosts removed)
            state.sync()
        status = trainer.train(signals, commit=state.commit)
        trainer.finish(status)
        return status

    try:
        return train(state)
    except WorldTooSmall as exc:
        print(f"fa-hvd-train: rank {trainer.rank}: {exc}", flush=True)
        return EXIT_TOO_FEW


__all__ = ["ElasticState", "run_elastic"]
