"""Rank 0's TensorBoard scalars (``log.tensorboard: DIR`` or ``fa-hvd-train --tensorboard DIR``).

Through ``torch.utils.tensorboard``, which needs the ``tensorboard`` package
(``pip install fa_hvd[tensorboard]``); without it :func:`open_board` says so in one
line and the run goes on without the event files. Scalars, per step:
``train/loss``, ``train/lr``, ``train/samples_per_s``, ``time/step_s``,
``time/backward_s``, ``time/synchronize_s`` (and ``time/exchange_s``,
``time/aggregate_s`` when the optimizer measured them), ``trust/weight/rank_R``
(rank R's relative weight ``p c_R / sum c``: 1 is an equal share; rules that report
weights), ``trust/dropped`` and ``trust/nonfinite`` (how many rows the rule dropped);
per evaluation ``eval/test_loss`` and ``eval/test_accuracy``.
"""

from __future__ import annotations

from pathlib import Path

from fa_hvd.train.trust import relative_weights

STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "samples_per_s": "train/samples_per_s",
                "step_s": "time/step_s", "backward_s": "time/backward_s", "synchronize_s": "time/synchronize_s",
                "exchange_s": "time/exchange_s", "aggregate_s": "time/aggregate_s"}
MISSING = ("fa-hvd-train: warning: log.tensorboard is set but the tensorboard package is missing "
           "(pip install 'fa_hvd[tensorboard]'); no TensorBoard events are written")


class Board:
    """A ``SummaryWriter`` fed the trainer's step and eval records."""

    def __init__(self, writer):
        self.writer = writer

    def step(self, record: dict) -> None:
        step = record["step"]
        for key, tag in STEP_SCALARS.items():
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(tag, record[key], step)
        p = record.get("world_size", 0)
        weights = relative_weights(p, record)
        for rank, weight in enumerate(weights or ()):
            self.writer.add_scalar(f"trust/weight/rank_{rank}", weight, step)
        for key in ("dropped", "nonfinite"):
            if key in record:
                self.writer.add_scalar(f"trust/{key}", len(record[key]), step)

    def evaluation(self, step: int, test_loss: float, accuracy: float) -> None:
        self.writer.add_scalar("eval/test_loss", test_loss, step)
        self.writer.add_scalar("eval/test_accuracy", accuracy, step)

    def close(self) -> None:
        self.writer.close()


def open_board(directory: str | Path | None, say=print) -> Board | None:
    """A :class:`Board` writing to ``directory``, or None (no directory, or no tensorboard package)."""
    if directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say(MISSING)
        return None
    return Board(SummaryWriter(log_dir=str(directory)))
