"""``fa-hvd-eval``: run a robustness grid and report it (table, heatmap, bars).

    fa-hvd-eval --grid configs/eval/standing.yaml --jobs 2      # run what is missing, then report
    fa-hvd-eval --grid configs/eval/standing.yaml --list        # the cells, in --cell order
    fa-hvd-eval --grid configs/eval/standing.yaml --cell 17     # one cell (a SLURM array task)
    fa-hvd-eval --grid configs/eval/standing.yaml --report      # fold --cell results in, report only
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from pathlib import Path

from fa_hvd import config as cfg
from fa_hvd.cli_types import integer_at_least

from . import runner
from .grid import ENGINES, load_grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fa-hvd-eval",
        description="Run a grid of (split x workers x rule x fault x seed) training runs and report the final "
        "test accuracy per cell: results.jsonl, table.md (mean and spread over seeds, the bars of the grid's "
        "bars.rule) and heatmap.png. Cells already in results.jsonl are skipped, so an interrupted grid resumes.",
        epilog="Exit status: 0 done; 1 a cell failed (the others still ran); 2 a bad grid file, --cell index or "
        "--match. Environment for --engine distributed: FA_HVD_EVAL_LAUNCH (launcher template with {p}, default "
        "'horovodrun -np {p} -H localhost:{p}'), FA_HVD_EVAL_TIMEOUT (seconds per job, default 3600).",
    )
    parser.add_argument("--grid", required=True, help="the grid's YAML file, e.g. configs/eval/standing.yaml")
    parser.add_argument("--out", help="output directory (default: the grid's out:, else runs/eval/<grid stem>)")
    parser.add_argument("--engine", choices=ENGINES, default="simulation",
                        help="simulation: p virtual workers in one process (seconds per cell); distributed: "
                        "each cell a horovodrun job of fa-hvd-train (default: simulation)")
    parser.add_argument("--jobs", type=integer_at_least(1), default=1,
                        help="cells run at once, one process (one core) each (default: 1)")
    parser.add_argument("--cell", type=integer_at_least(0), metavar="INDEX",
                        help="run only cell INDEX (0-based, --list order) and write its result under "
                        "OUT/cells/ for a later run or --report to collect (one SLURM array task per cell)")
    parser.add_argument("--match", action="append", default=[], metavar="GLOB",
                        help="run only the cells whose key matches GLOB (split/pPfF/rule/fault/sSEED, "
                        "e.g. 'iid/p15f3/*/alie*/*'); repeatable")
    parser.add_argument("--rerun-other-machines", action="store_true",
                        help="run again the cells whose result another machine computed (or one not recorded): a "
                        "cell's accuracy can differ between machines, and each result line names its machine")
    parser.add_argument("--list", action="store_true",
                        help="print the number of cells and one line per cell, '(done)' after a cell with a result "
                        "(in results.jsonl or a --cell file not yet collected)")
    parser.add_argument("--report", action="store_true", help="collect --cell results and write the report only")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except cfg.ConfigError as exc:
        print(f"fa-hvd-eval: error: {args.grid}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or grid.config.out or Path("runs") / "eval" / grid.name)
    cells = grid.cells
    if args.match:
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.key, pattern) for pattern in args.match)]
        if not cells:
            print(f"fa-hvd-eval: error: no cell key matches {args.match}", file=sys.stderr)
            return 2
    here = runner.machine() if args.rerun_other_machines else None
    if args.list:
        done = runner.valid_records(grid, out, here)
        listing = [f"{len(cells)} cells"] + [f"{c.index} {c.key}{'  (done)' if c.index in done else ''}" for c in cells]
        try:
            print("\n".join(listing), flush=True)
        except BrokenPipeError:  # the reader stopped early (| head): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.cell is not None:
        if args.cell >= len(grid.cells):
            print(f"fa-hvd-eval: error: --cell {args.cell}: the grid has {len(grid.cells)} cells "
                  f"(0..{len(grid.cells) - 1})", file=sys.stderr)
            return 2
        cell = grid.cells[args.cell]
        if cell.index in runner.valid_records(grid, out, here, cell.index):
            print(f"fa-hvd-eval: cell {cell.index} {cell.key}: already done", flush=True)
            return 0
        try:
            record = runner.run_cell(cell, args.engine, out / "runs")
        except Exception as exc:  # the whole message, no traceback: one line per failed array task
            print(f"fa-hvd-eval: cell {cell.index} {cell.key}: FAILED: {exc}", file=sys.stderr, flush=True)
            return 1
        path = runner.write_cell_file(out, record)
        print(f"fa-hvd-eval: cell {cell.index} {cell.key}: accuracy {100 * record['test_accuracy']:.1f}% "
              f"({record['wall_s']:.1f} s) -> {path}", flush=True)
        return 0
    runner.collect(out)
    failures = 0
    if not args.report:
        failures = runner.run_grid(grid, out, args.engine, args.jobs, cells, args.rerun_other_machines)
    table, heatmap = runner.write_report(grid, out)
    print(f"fa-hvd-eval: report: {table}, {heatmap}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
