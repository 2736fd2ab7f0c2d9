"""Running a grid: cells in parallel processes, results appended as they finish, resumable.

Layout of an output directory::

    results.jsonl     one JSON object per finished cell (appended; the last valid line of a cell wins)
    cells/            results of ``--cell INDEX`` runs (one file each), folded into results.jsonl later
    table.md          the Markdown report (report.markdown)
    heatmap.png       the heatmap (report.heatmap)
    sessions.jsonl    one line per run that ran cells: cells, failures, wall time, jobs, engine

A line is valid for a cell when its ``key`` is the cell's and its ``digest`` is the cell's
digest under the line's ``engine``: a cell whose definition changed is run again. Each line also
names the ``machine`` that ran it (:func:`machine`): a cell's accuracy depends on it (training
turns a last-bit difference of a kernel into another trajectory), so a run says how many of the
cells it reuses came from another machine, and ``--rerun-other-machines`` runs those again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import report
from .grid import Cell, Grid

RESULTS = "results.jsonl"
CELLS = "cells"
TABLE = "table.md"
HEATMAP = "heatmap.png"
SESSIONS = "sessions.jsonl"


NOT_RECORDED = "not recorded"


@functools.cache
def machine() -> str:
    """This machine as a cell's result depends on it: the CPU's model, the instruction set torch's CPU
    kernels use here, torch's version, and the GPU when one is visible (for ``--engine distributed``:
    the machine that launched the jobs). Read once per process."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}{gpu}"


def run_cell(cell: Cell, engine: str, run_root: Path | None = None) -> dict:
    """Run one cell and return its record (what goes into results.jsonl)."""
    if engine == "simulation":
        from .simulate import simulate

        result = simulate(cell)
    else:
        from .distributed import run_distributed

        result = run_distributed(cell, run_root)
    return {
        "index": cell.index, "key": cell.key, "digest": cell.digest(engine), "engine": engine,
        "split": cell.split, "alpha": cell.alpha, "p": cell.p, "f": cell.f, "rule": cell.rule,
        "fault": cell.fault, "seed": cell.seed, "machine": machine(), **result,
    }


def _read_lines(path: Path) -> list[dict]:
    records = []
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"fa-hvd-eval: {path}:{number}: skipping a line that is not JSON (an interrupted write?)",
                  file=sys.stderr)
    return records


def collect(out: Path) -> None:
    """Fold the files of ``--cell`` runs into results.jsonl (each file removed once appended)."""
    folder = out / CELLS
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        with open(out / RESULTS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        path.unlink()


def valid_records(grid: Grid, out: Path, here: str | None = None, index: int | None = None) -> dict[int, dict]:
    """``{cell index: record}`` for the cells whose current definition has a result (computed on
    machine ``here`` only, when given): in results.jsonl, or in a ``--cell`` file not yet collected
    (only cell ``index``'s file, when given: an array task need not read every other task's)."""
    by_key = {cell.key: cell for cell in grid.cells}
    found = {}
    pending = []  # read before results.jsonl: a file that collect() removes meanwhile is in it by then
    for path in sorted((out / CELLS).glob("*.json" if index is None else _cell_name(index, "*"))):
        try:
            pending += _read_lines(path)
        except FileNotFoundError:
            continue
    for record in [*pending, *_read_lines(out / RESULTS)]:
        cell = by_key.get(record.get("key"))
        if cell is not None and record.get("digest") == cell.digest(record.get("engine", "")) and \
                (here is None or record.get("machine") == here):
            found[cell.index] = record
    return found


def machines(records) -> collections.Counter:
    """How many of ``records`` each machine computed (:data:`NOT_RECORDED` for lines written before
    fa_hvd recorded it)."""
    return collections.Counter(record.get("machine", NOT_RECORDED) for record in records)


def _cell_name(index: int, digest: str) -> str:
    return f"{index:06d}-{digest}.json"


def write_cell_file(out: Path, record: dict) -> Path:
    """A ``--cell`` result, written atomically (a SLURM array task per cell writes its own file)."""
    path = out / CELLS / _cell_name(record["index"], record["digest"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
    return path


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _outcomes(cells: list[Cell], engine: str, jobs: int, run_root: Path):
    """``(cell, record or exception)`` as cells finish: in this process with one job, else in
    ``jobs`` worker processes (spawned, one torch thread each)."""
    if jobs == 1:
        for cell in cells:
            try:
                yield cell, run_cell(cell, engine, run_root)
            except Exception as exc:
                yield cell, exc
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                initializer=_worker_init) as pool:
        futures = {pool.submit(run_cell, cell, engine, run_root): cell for cell in cells}
        for future in concurrent.futures.as_completed(futures):
            exc = future.exception()
            yield futures[future], exc if exc is not None else future.result()


def run_grid(grid: Grid, out: Path, engine: str, jobs: int, cells: list[Cell],
             rerun_other_machines: bool = False) -> int:
    """Run ``cells`` (those without a valid result; with ``rerun_other_machines``, also those another
    machine computed), ``jobs`` at a time; returns the failure count."""
    out.mkdir(parents=True, exist_ok=True)
    here = machine()
    done = valid_records(grid, out, here if rerun_other_machines else None)
    todo = [cell for cell in cells if cell.index not in done]
    skipped = len(cells) - len(todo)
    print(f"fa-hvd-eval: {grid.path}: {len(cells)} cells, {skipped} already done, {len(todo)} to run "
          f"({engine}, {jobs} job(s)) -> {out}", flush=True)
    elsewhere = machines(done[cell.index] for cell in cells if cell.index in done)
    elsewhere.pop(here, None)
    if elsewhere:
        print(f"fa-hvd-eval: note: {sum(elsewhere.values())} of the {skipped} cells already done were computed on "
              f"another machine ({_counts(elsewhere)}; this one: {here}); a cell's accuracy can differ between "
              "machines, so compare rules on one machine's cells: --rerun-other-machines runs them here",
              file=sys.stderr, flush=True)
    failures = 0
    if not todo:
        return failures
    start = time.perf_counter()
    width = len(str(len(todo)))
    run_root = out / "runs"
    with open(out / RESULTS, "a") as results:
        for finished, (cell, outcome) in enumerate(_outcomes(todo, engine, jobs, run_root), 1):
            elapsed = time.perf_counter() - start
            eta = elapsed / finished * (len(todo) - finished)
            prefix = f"[{finished:{width}d}/{len(todo)}] {cell.describe()}:"
            if isinstance(outcome, BaseException):  # one broken cell must not stop the grid
                failures += 1
                detail = "".join(traceback.format_exception_only(type(outcome), outcome)).strip()
                print(f"{prefix} FAILED: {detail}  ETA {_duration(eta)}", flush=True)
                continue
            results.write(json.dumps(outcome) + "\n")
            results.flush()
            state = "  DIVERGED" if outcome["diverged"] else ""
            print(f"{prefix} accuracy {100 * outcome['test_accuracy']:.1f}%  loss {outcome['train_loss']:.3f}"
                  f"{state}  ({outcome['wall_s']:.1f} s)  ETA {_duration(eta)}", flush=True)
    wall = time.perf_counter() - start
    print(f"fa-hvd-eval: ran {len(todo) - failures} cell(s) in {_duration(wall)}"
          + (f"; {failures} FAILED" if failures else ""), flush=True)
    with open(out / SESSIONS, "a") as sessions:
        sessions.write(json.dumps({"cells": len(todo) - failures, "failed": failures, "wall_s": wall, "jobs": jobs,
                                   "engine": engine, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return failures


def _counts(counter: collections.Counter) -> str:
    return ", ".join(f"{name}: {count}" for name, count in counter.most_common())


def timing(grid: Grid, records: dict, out: Path) -> dict | None:
    """Per-cell times from the records, and the wall time of the sessions that ran cells here."""
    if not records:
        return None
    by_rule: dict = {}
    for cell in grid.cells:
        record = records.get(cell.index)
        if record is not None:
            by_rule.setdefault(cell.rule, []).append(record["wall_s"])
    times = [t for ts in by_rule.values() for t in ts]
    slowest = max(by_rule, key=lambda r: statistics.fmean(by_rule[r]))
    sessions = _read_lines(out / SESSIONS)
    return {"cells": len(times), "per_cell_s": statistics.fmean(times), "cell_s": sum(times),
            "slowest_rule": slowest, "slowest_rule_s": statistics.fmean(by_rule[slowest]),
            "sessions": len(sessions), "wall_s": sum(s["wall_s"] for s in sessions),
            "jobs": sorted({s["jobs"] for s in sessions}), "machines": machines(records.values())}


def write_report(grid: Grid, out: Path) -> tuple[Path, Path]:
    """table.md and heatmap.png from the valid results in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    records = valid_records(grid, out)
    stats = report.summarize(grid, records)
    (out / TABLE).write_text(report.markdown(grid, stats, timing(grid, records, out)) + "\n")
    report.heatmap(grid, stats, out / HEATMAP)
    return out / TABLE, out / HEATMAP
