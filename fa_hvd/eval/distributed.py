"""The distributed engine: each cell a real ``fa-hvd-train`` job of p ranks.

The cell's trainer config (:meth:`~fa_hvd.eval.grid.Cell.run_config`, plus bookkeeping
that changes no number: evaluation only at the end, no checkpoints, a metrics line per
step) is written to ``RUN/cell.yaml`` and launched as

    horovodrun -np P -H localhost:P fa-hvd-train --config RUN/cell.yaml --run-dir RUN --resume never

or with the launcher in ``FA_HVD_EVAL_LAUNCH``, a command template with ``{p}`` for the
world size (``srun --mpi=pmix -n {p}`` inside a SLURM allocation, ``mpirun -np {p}``).
The result comes from the run's ``summary.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .grid import Cell

LAUNCH_VARIABLE = "FA_HVD_EVAL_LAUNCH"
DEFAULT_LAUNCH = "horovodrun -np {p} -H localhost:{p}"
TIMEOUT_VARIABLE = "FA_HVD_EVAL_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0
BOOKKEEPING = {"train": {"eval_every_epochs": 0}, "checkpoint": {"at_end": False}, "log": {"progress": "lines",
                                                                                          "every_steps": 1}}
"""Settings added to every cell's config: they change what is logged and saved, not the numbers."""


def cell_config(cell: Cell) -> dict:
    """The config the job reads: the cell's run config plus :data:`BOOKKEEPING`."""
    conf = cell.run_config()
    for section, values in BOOKKEEPING.items():
        conf[section] = {**conf.get(section, {}), **values}
    return conf


def launch_command(p: int, environ=os.environ) -> list[str]:
    """The launcher's argv for ``p`` ranks (``FA_HVD_EVAL_LAUNCH`` or horovodrun on this host)."""
    template = environ.get(LAUNCH_VARIABLE) or DEFAULT_LAUNCH
    argv = shlex.split(template.format(p=p))
    if argv and argv[0] == "horovodrun":
        argv[0] = str(Path(sys.executable).parent / "horovodrun")  # the one beside this Python
    return argv


def run_distributed(cell: Cell, run_root: Path, curve: bool = False) -> dict:
    """Run ``cell`` as a job; the same record fields as the simulation (``losses`` with ``curve``)."""
    run_dir = Path(run_root) / cell.key.replace("/", "_")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "cell.yaml"
    config.write_text(yaml.safe_dump(cell_config(cell), sort_keys=False))
    for stale in ("summary.json", "metrics.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    train = str(Path(sys.executable).parent / "fa-hvd-train")
    argv = launch_command(cell.p) + [train, "--config", str(config), "--run-dir", str(run_dir), "--resume", "never"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    timeout = float(env.get(TIMEOUT_VARIABLE) or DEFAULT_TIMEOUT_S)
    start = time.perf_counter()
    with open(run_dir / "job.log", "w") as log:
        try:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cell.key}: the job ran past {timeout:.0f} s ({TIMEOUT_VARIABLE}); "
                               f"log: {run_dir / 'job.log'}") from None
    wall = time.perf_counter() - start
    summary_path = run_dir / "summary.json"
    if done.returncode != 0 or not summary_path.exists():
        tail = (run_dir / "job.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{cell.key}: `{shlex.join(argv)}` exited with {done.returncode}; last lines of "
                           f"{run_dir / 'job.log'}:\n" + "\n".join(tail))
    summary = json.loads(summary_path.read_text())
    final = summary["final"]
    losses = [record["loss"] for record in _metrics(run_dir / "metrics.jsonl") if record.get("kind") == "step"]
    finite = all(math.isfinite(v) for v in (final["test_loss"], final["train_loss"]))
    result = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "train_loss": final["train_loss"],
        "diverged": not finite,
        "steps": summary["step"],
        "wall_s": wall,
    }
    if curve:
        result["losses"] = losses
    return result


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
