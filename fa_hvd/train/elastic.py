"""Elastic mode (``elastic.enabled``): Horovod's ``hvd.elastic.run`` around the training loop.

Launch with ``horovodrun -np N --min-np M --max-np K --host-discovery-script S
fa-hvd-train ...`` (Gloo). :class:`ElasticState` is the Horovod state object:

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
A world change is an event in the log (``metrics.jsonl`` and rank 0's output).
"""

from __future__ import annotations

import copy
import time

import horovod.torch as hvd
from horovod.common.elastic import State

from fa_hvd import checkpoint
from fa_hvd.train import control
from fa_hvd.train.trainer import Trainer, UsageError, choose_checkpoint, open_outputs, prepare_run_dir, say, \
    usage_error

EXIT_TOO_FEW = 1


class WorldTooSmall(RuntimeError):
    """The world shrank below what the aggregator needs."""


class ElasticState(State):
    """Horovod's state object for the trainer (see the module docstring)."""

    def __init__(self, trainer: Trainer, resume: tuple[str, bool]):
        self.trainer = trainer
        self.resume = resume  # (--resume, --resume-reshard), used by the first sync
        self.committed = None
        self.changed_world = False
        super().__init__(bcast_object=self._broadcast, get_rank=hvd.rank)

    @staticmethod
    def _broadcast(obj):
        return hvd.broadcast_object(obj, root_rank=0, name="fa_hvd.train.elastic.hosts")

    def save(self) -> None:
        self.committed = copy.deepcopy(self.trainer.shared_state())

    def restore(self) -> None:
        if self.committed is not None:
            self.trainer.load_shared(self.committed)

    def reset(self) -> None:
        self.changed_world = True

    def sync(self) -> None:
        trainer = self.trainer
        before = trainer.world
        trainer.transport.refresh()
        trainer.rank, trainer.world = trainer.transport.rank, trainer.transport.size
        error, notes = None, []
        if self.resume is not None and trainer.rank == 0:  # the first sync: rank 0 picks the checkpoint
            try:
                prepare_run_dir(trainer)
                payload, notes = choose_checkpoint(trainer, *self.resume)
                if payload is not None:
                    trainer.load_shared(checkpoint.decode(payload))
            except (UsageError, OSError) as exc:
                error = str(exc)
        self.resume = None
        error, notes, state = hvd.broadcast_object(
            (error, notes, trainer.shared_state()) if trainer.rank == 0 else None, root_rank=0,
            name="fa_hvd.train.elastic.state")
        if error is not None:
            raise UsageError(error)
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
    try:
        trainer.check_world()
    except ValueError as exc:
        raise WorldTooSmall(f"elastic: cannot continue on {trainer.world} ranks: {exc}") from None
    trainer.join_world()
    if trainer.rank == 0 and trainer.log is None:
        open_outputs(trainer)


def run_elastic(trainer: Trainer, args) -> int:
    """Train under ``hvd.elastic.run``; returns the exit status."""
    try:
        trainer.load_data()
        trainer.check_world()
    except (ValueError, UsageError) as exc:
        return usage_error(str(exc), trainer.rank)
    trainer.build()
    trainer.last_checkpoint_time = time.monotonic()
    state = ElasticState(trainer, resume=(args.resume, args.resume_reshard))
    signals = control.StopSignals().install()

    @hvd.elastic.run
    def train(state: ElasticState) -> int:
        if state.changed_world:  # a reset that Horovod did not follow with a sync (hosts removed)
            state.sync()
        status = trainer.train(signals, commit=state.commit)
        trainer.finish(status)
        return status

    try:
        return train(state)
    except UsageError as exc:
        return usage_error(str(exc), trainer.rank)
    except WorldTooSmall as exc:
        say(f"fa-hvd-train: rank {trainer.rank}: {exc}")
        return EXIT_TOO_FEW
    finally:
        signals.uninstall()


__all__ = ["ElasticState", "run_elastic"]
