"""Rank 0's outputs: ``metrics.jsonl``, the progress display and ``summary.json``.

``metrics.jsonl`` holds one JSON object per line: ``"kind": "step"`` records
(``step`` counts optimizer steps done, from 1; ``epoch`` (fractional epochs done);
``loss``, the median of the ranks' finite batch losses; ``lr``; ``step_s``;
``backward_s`` (forward and backward, with the gradient exchange overlapping);
``synchronize_s`` (waiting for the exchange and aggregating); ``samples_per_s``;
``faults``, the number of ranks that injected a fault at that step; ``world_size``;
rank 0's ``optimizer.stats`` when the optimizer has them: ``exchange_s``,
``aggregate_s``, ``bytes_sent``, ``bytes_received``, and the aggregator's
diagnostics by rank: ``nonfinite``, ``dropped`` and (rules that combine rows, FA
among them) ``weights``, ``alignment`` and ``distance`` (:func:`fa_hvd.aggregators.base.residuals`);
``loss_scale`` under fp16), ``"kind": "eval"`` records
(``step``, ``epoch``, ``test_loss``, ``test_accuracy``) and ``"kind": "event"``
records (resume, preemption, elastic resets, a suspect named by :mod:`fa_hvd.train.trust`
with its evidence in ``suspect``, an eviction). On resume the file is cut back to
the checkpoint's step, so it always tells one consistent history.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from fa_hvd.checkpoint import write_atomic

BAR_WIDTH = 24
LINES_PER_RUN = 20


def _clean(value):
    """JSON has no NaN or Infinity: they become strings ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Appends records to ``RUN_DIR/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._cut(resume_step)
        self._fh = open(self.path, "a")

    def _cut(self, step: int) -> None:
        """Keep the records up to ``step`` (a killed run may have logged past its last checkpoint)."""
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill
                if record.get("step", 0) <= step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept))

    def rewind(self, step: int) -> None:
        """Forget the records after ``step`` (an elastic restore went back to it)."""
        self._fh.close()
        self._cut(step)
        self._fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(_clean(record)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (torn lines skipped)."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def write_summary(run_dir: str | Path, summary: dict) -> None:
    write_atomic(Path(run_dir) / "summary.json", (json.dumps(_clean(summary), indent=2) + "\n").encode())


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on a terminal, or a plain line every ``every`` steps.

    ``mode``: ``"auto"`` (bar if stdout is a terminal), ``"bar"``, ``"lines"``, ``"none"``.
    """

    def __init__(self, total_steps: int, start_step: int, mode: str = "auto", every: int | None = None,
                 stream=None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.total = total_steps
        self.every = every or max(1, total_steps // LINES_PER_RUN)
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.accuracy: float | None = None
        self._bar_shown = False

    def step(self, step: int, epoch: float, loss: float, samples_per_s: float) -> None:
        if self.mode == "none":
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / done * (self.total - step) if done else 0.0
        accuracy = f"  acc {self.accuracy:.3f}" if self.accuracy is not None else ""
        text = (f"step {step}/{self.total}  epoch {epoch:.2f}  loss {loss:.4f}{accuracy}  "
                f"{samples_per_s:.0f} samples/s  ETA {_duration(eta)}")
        if self.mode == "bar":
            filled = int(BAR_WIDTH * step / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}\x1b[K")
            self._bar_shown = True
        elif step % self.every == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (the bar, if shown, continues below it)."""
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def evaluation(self, step: int, epoch: float, test_loss: float, accuracy: float) -> None:
        self.accuracy = accuracy
        if self.mode != "none":
            self.message(f"eval at step {step} (epoch {epoch:.2f}): test loss {test_loss:.4f}  "
                         f"test accuracy {accuracy:.4f}")

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False
