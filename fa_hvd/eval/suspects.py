"""How often the trust ledger names the wrong rank, and how fast it names the right one.

    python -m fa_hvd.eval.suspects --grid configs/eval/suspects.yaml [--match GLOB] [--out DIR]

Runs each cell of a grid in the simulation engine (:func:`fa_hvd.eval.simulate.simulate`)
with a :class:`~fa_hvd.train.trust.TrustLedger` fed every step's diagnostics, and records,
per rank, the lowest mean relative weight and the highest non-finite fraction over any full
window, and the first step at which each candidate ``min_weight`` (:data:`CANDIDATES`) was
crossed. ``OUT/results.jsonl`` holds one line per cell (cells already there are skipped);
``OUT/table.md`` gives, per rule and candidate threshold:

* false positives: the share of no-attack cells in which an honest rank was named;
* detection: the share of attacked cells in which every Byzantine rank was named, and the
  median and worst step at which the last of them was (the faults start at step 1);
* honest ranks named in attacked cells.

Rules that report no weights can name only non-finite rows (``max_nonfinite``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
from pathlib import Path

from fa_hvd.train.trust import Thresholds, TrustLedger

from .grid import load_grid
from .simulate import simulate

CANDIDATES = (0.1, 0.2, 0.3, 0.5)


class _Recorder:
    """Feeds a ledger and keeps, per rank, what every candidate threshold would have done."""

    def __init__(self, p: int, window: int):
        self.ledger = TrustLedger(p, Thresholds(window=window, min_weight=0.0))
        self.min_weight: list = [None] * p
        self.max_nonfinite = [0.0] * p
        self.crossed = [{str(t): None for t in CANDIDATES} for _ in range(p)]

    def __call__(self, step: int, diagnostics: dict) -> None:
        self.ledger.observe(step, diagnostics)
        if self.ledger.steps < self.ledger.thresholds.window:
            return
        for r in range(self.ledger.p):
            weight, nonfinite = self.ledger.window_figures(r)
            self.max_nonfinite[r] = max(self.max_nonfinite[r], nonfinite)
            if weight is None:
                continue
            self.min_weight[r] = weight if self.min_weight[r] is None else min(self.min_weight[r], weight)
            for t in CANDIDATES:
                if weight < t and self.crossed[r][str(t)] is None:
                    self.crossed[r][str(t)] = step


def run_cell(cell, window: int) -> dict:
    recorder = _Recorder(cell.p, window)
    result = simulate(cell, observe=recorder)
    byzantine = sorted({r for entry in cell.fault_entries for r in entry.get("ranks", [])})
    return {"key": cell.key, "split": cell.split, "p": cell.p, "f": cell.f, "rule": cell.rule, "fault": cell.fault,
            "seed": cell.seed, "window": window, "byzantine": byzantine, "steps": result["steps"],
            "test_accuracy": result["test_accuracy"], "min_weight": recorder.min_weight,
            "max_nonfinite": recorder.max_nonfinite, "crossed": recorder.crossed}


def named_at(cell: dict, rank: int, min_weight: float, max_nonfinite: float) -> int | None:
    """The step ``rank`` would have been named at under these thresholds (None: never).

    The non-finite criterion is judged on the run's highest fraction: a rank over it is
    counted as named at the end of its first window (the only non-finite fault, ``nan``,
    is sent from step 1)."""
    steps = [cell["crossed"][rank][str(min_weight)]] if str(min_weight) in cell["crossed"][rank] else []
    if cell["max_nonfinite"][rank] > max_nonfinite:
        steps.append(cell["window"])
    steps = [s for s in steps if s is not None]
    return min(steps) if steps else None


def report(cells: list[dict], max_nonfinite: float = Thresholds.max_nonfinite) -> str:
    lines = ["| rule | min_weight | false positives (no attack) | detected (attacked) | steps to name: median / worst "
             "| honest named (attacked) |", "|---|---|---|---|---|---|"]
    for rule in sorted({c["rule"] for c in cells}):
        mine = [c for c in cells if c["rule"] == rule]
        clean = [c for c in mine if c["fault"] == "none"]
        attacked = [c for c in mine if c["fault"] != "none"]
        for t in CANDIDATES:
            def honest_named(c):
                return any(named_at(c, r, t, max_nonfinite) is not None
                           for r in range(c["p"]) if r not in c["byzantine"])

            latencies = []
            for c in attacked:
                steps = [named_at(c, r, t, max_nonfinite) for r in c["byzantine"]]
                if all(s is not None for s in steps):
                    latencies.append(max(steps))
            fp = sum(map(honest_named, clean))
            worst = f"{statistics.median(latencies):.0f} / {max(latencies)}" if latencies else "-"
            lines.append(f"| {rule} | {t} | {fp}/{len(clean)} ({_pct(fp, len(clean))}) | {len(latencies)}/"
                         f"{len(attacked)} ({_pct(len(latencies), len(attacked))}) | {worst} | "
                         f"{sum(map(honest_named, attacked))}/{len(attacked)} |")
    return "\n".join(lines) + "\n"


def by_fault(cells: list[dict], min_weight: float, max_nonfinite: float = Thresholds.max_nonfinite) -> str:
    """Detected cells per rule and fault at one threshold."""
    rules = sorted({c["rule"] for c in cells})
    faults = [f for f in dict.fromkeys(c["fault"] for c in cells) if f != "none"]
    lines = ["| fault | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for fault in faults:
        row = []
        for rule in rules:
            mine = [c for c in cells if c["rule"] == rule and c["fault"] == fault]
            hit = sum(all(named_at(c, r, min_weight, max_nonfinite) is not None for r in c["byzantine"])
                      for c in mine)
            row.append(f"{hit}/{len(mine)}")
        lines.append(f"| {fault} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f} %" if b else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa_hvd.eval.suspects", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--out", help="default: the grid's out:")
    parser.add_argument("--match", action="append", default=[], metavar="GLOB")
    parser.add_argument("--window", type=int, default=Thresholds.window)
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    out = Path(args.out or grid.config.out or f"runs/eval/{grid.name}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {json.loads(line)["key"] for line in path.read_text().splitlines()} if path.exists() else set()
    for cell in grid.cells:
        if cell.key in done or (args.match and not any(fnmatch.fnmatch(cell.key, g) for g in args.match)):
            continue
        record = run_cell(cell, args.window)
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"{cell.key}: min honest weight "
              f"{min((w for r, w in enumerate(record['min_weight']) if r not in record['byzantine'] and w is not None), default=None)}",
              flush=True)
    cells = [json.loads(line) for line in path.read_text().splitlines()]
    text = (f"# Suspects: {len(cells)} cells of {args.grid} (simulation engine, window {args.window})\n\n"
            + report(cells) + f"\n## Detected cells per fault at min_weight {Thresholds.min_weight}\n\n"
            + by_fault(cells, Thresholds.min_weight))
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
