"""Preemption signals and the per-step agreement of the ranks.

SLURM sends SIGTERM (or the ``--signal`` of ``sbatch``, often SIGUSR1) before a
time limit or a preemption, possibly to one task only. :class:`StopSignals`
turns either signal into a flag; nothing happens inside the handler.

At every step boundary the ranks gather one small fixed-layout vector each
(:func:`agree`: five float64 words, plus three for the deferred digest; no pickle)
and every rank draws the same decisions from the same matrix, so no rank's word
counts for more than its own row:

* the logged loss is the median of the finite losses (a lying rank moves it no
  further than the honest spread);
* a stop request from any one rank stops every rank at the same step (that is
  preemption: SLURM may signal one task only; a Byzantine rank can therefore end
  the run early, with a checkpoint: documented, not tolerated);
* a timed checkpoint is due when rank 0's clock says so (rank 0 is trusted);
* an fp16 overflow counts only from a rank that says it overflowed *and* whose
  gradient row the exchange found non-finite (the row is dropped and counted
  against ``f`` like any other bad row), so a rank cannot make others back off;
* the count of ranks that injected a fault is each rank's own word (logging only);
* with the deferred digest (:class:`fa_hvd.exchange.digest.DeferredDigest`), the
  last step's aggregate fingerprints must all agree (else
  :class:`~fa_hvd.exchange.digest.Divergence` on every rank, naming the groups) and
  the nonces key this step's fingerprints: the check costs no collective of its own.
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

    loss: float  # the median over ranks of the finite losses (nan if none)
    losses: list[float]  # each rank's loss as it said (the trust ledger's loss excess)
    stop: bool
    checkpoint_due: bool
    faulty_ranks: int
    overflowed_ranks: int


def median_loss(losses: torch.Tensor) -> float:
    """The step's logged loss from every rank's: the median of the finite ones (nan if none)."""
    finite = losses[losses.isfinite()]
    return float(finite.quantile(0.5)) if finite.numel() else float("nan")


def agree(transport, loss: float, stop: bool, checkpoint_due: bool, faulty: bool, overflowed: bool,
          nonfinite_rows=(), lies=None, digest=None) -> StepAgreement:
    """One allgather of five numbers per rank (eight with ``digest``): the step's shared decisions
    (see the module docstring).

    ``nonfinite_rows``: the ranks whose gradient rows this step's exchange found
    non-finite (the same list on every rank: the optimizer's ``stats["nonfinite"]``).
    A flag word counts as set when it is > 0 (NaN is not). ``lies``: fault injection
    (:class:`fa_hvd.faults.roles.RoleLies`), what this rank says instead. ``digest``: the
    optimizer's :class:`~fa_hvd.exchange.digest.DeferredDigest`, whose words ride along;
    raises :class:`~fa_hvd.exchange.digest.Divergence` when the last step's aggregates differed.
    """
    extra = digest.words() if digest is not None else []
    local = torch.tensor([[loss, float(stop), float(checkpoint_due and transport.rank == 0), float(faulty),
                           float(overflowed), *extra]], dtype=torch.float64)
    if lies is not None:
        local = lies.control(local)
    rows = transport.allgather(local, name="fa_hvd.train.agree").reshape(transport.size, 5 + len(extra))
    if digest is not None:
        digest.receive(rows[:, 5:])
    rows = rows[:, :5]
    flags = rows[:, 1:] > 0
    bad_rows = torch.zeros(transport.size, dtype=torch.bool)
    bad_rows[[r for r in nonfinite_rows if 0 <= r < transport.size]] = True
    return StepAgreement(
        loss=median_loss(rows[:, 0]),
        losses=rows[:, 0].tolist(),
        stop=bool(flags[:, 0].any()),
        checkpoint_due=bool(flags[0, 1]),
        faulty_ranks=int(flags[:, 2].sum()),
        overflowed_ranks=int((flags[:, 3] & bad_rows).sum()),
    )
