"""Preemption signals and the per-step agreement of the ranks.

SLURM sends SIGTERM (or the ``--signal`` of ``sbatch``, often SIGUSR1) before a
time limit or a preemption, possibly to one task only. :class:`StopSignals`
turns either signal into a flag; nothing happens inside the handler.

At every step boundary the ranks sum one small vector (:func:`agree`): each
rank's batch loss, whether it has a stop request, whether rank 0's clock says
a timed checkpoint is due, how many ranks injected a fault, how many had an
fp16 overflow. One rank's signal therefore reaches every rank at the same step,
and all of them checkpoint and exit together.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Records SIGTERM / SIGUSR1 instead of dying; ``received`` names the first one."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class StepAgreement:
    """What every rank knows after a step's :func:`agree`."""

    mean_loss: float
    stop: bool
    checkpoint_due: bool
    faulty_ranks: int
    overflowed_ranks: int


def agree(transport, loss: float, stop: bool, checkpoint_due: bool, faulty: bool,
          overflowed: bool) -> StepAgreement:
    """One allreduce of five numbers: the step's shared decisions (see the module docstring)."""
    local = torch.tensor([loss, float(stop), float(checkpoint_due and transport.rank == 0), float(faulty),
                          float(overflowed)], dtype=torch.float64)
    total = transport.allreduce_sum(local, name="fa_hvd.train.agree")
    return StepAgreement(
        mean_loss=float(total[0]) / transport.size,
        stop=bool(total[1] > 0),
        checkpoint_due=bool(total[2] > 0),
        faulty_ranks=int(total[3]),
        overflowed_ranks=int(total[4]),
    )
