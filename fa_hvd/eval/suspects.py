"""How often the trust ledger names the wrong rank, and how fast it names the right one.

    python -m fa_hvd.eval.suspects --grid configs/eval/suspects.yaml [--match GLOB] [--out DIR]

Runs each cell of a grid in the simulation engine (:func:`fa_hvd.eval.simulate.simulate`)
with a :class:`~fa_hvd.train.trust.TrustLedger` fed every step's diagnostics, and records,
per rank, the lowest mean relative weight and the highest non-finite fraction over any full
window, and the first step at which each candidate ``min_weight`` (:data:`CANDIDATES`) was
crossed; likewise, per signal (alignment, distance), the lowest and highest window mean and
the first step each candidate of :data:`SIGNAL_CANDIDATES` was crossed. ``OUT/results.jsonl``
holds one line per cell (cells already there are skipped); ``OUT/table.md`` gives, per rule,
for weights alone per candidate ``min_weight`` and with the signals per candidate threshold:

* false positives: the share of no-attack cells in which an honest rank was named;
* detection: the share of attacked cells in which every Byzantine rank was named, and the
  median and worst step at which the last of them was (the faults start at step 1);
* honest ranks named in attacked cells;

and the signals' lowest window means, honest and Byzantine, from which the defaults are set.

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
SIGNAL_CANDIDATES = {"alignment": (-0.2, -0.25, -0.3, -0.4), "distance": (0.1, 0.15, 0.2, 0.25)}  # named below


class _Recorder:
    """Feeds a ledger and keeps, per rank, what every candidate threshold would have done."""

    def __init__(self, p: int, window: int):
        self.ledger = TrustLedger(p, Thresholds(window=window, min_weight=0.0, min_alignment=None, min_distance=None))
        self.min_weight: list = [None] * p
        self.max_nonfinite = [0.0] * p
        self.crossed = [{str(t): None for t in CANDIDATES} for _ in range(p)]
        self.signals = {key: {"min": [None] * p, "max": [None] * p,
                              "crossed": [{str(t): None for t in ts} for _ in range(p)]}
                        for key, ts in SIGNAL_CANDIDATES.items()}

    def __call__(self, step: int, diagnostics: dict) -> None:
        self.ledger.observe(step, diagnostics)
        if self.ledger.steps < self.ledger.thresholds.window:
            return
        for r in range(self.ledger.p):
            weight, nonfinite = self.ledger.window_figures(r)
            self.max_nonfinite[r] = max(self.max_nonfinite[r], nonfinite)
            for key, value in self.ledger.window_signals(r).items():
                if value is None:
                    continue
                figures = self.signals[key]
                figures["min"][r] = value if figures["min"][r] is None else min(figures["min"][r], value)
                figures["max"][r] = value if figures["max"][r] is None else max(figures["max"][r], value)
                for t in SIGNAL_CANDIDATES[key]:
                    if value < t and figures["crossed"][r][str(t)] is None:
                        figures["crossed"][r][str(t)] = step
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
            "max_nonfinite": recorder.max_nonfinite, "crossed": recorder.crossed, "signals": recorder.signals}


def named_at(cell: dict, rank: int, min_weight: float, max_nonfinite: float,
             min_alignment: float | None = None, min_distance: float | None = None) -> int | None:
    """The step ``rank`` would have been named at under these thresholds (None: never).

    The non-finite criterion is judged on the run's highest fraction: a rank over it is
    counted as named at the end of its first window (the only non-finite fault, ``nan``,
    is sent from step 1). The signals count when given and recorded for the cell."""
    steps = [cell["crossed"][rank][str(min_weight)]] if str(min_weight) in cell["crossed"][rank] else []
    for key, t in (("alignment", min_alignment), ("distance", min_distance)):
        if t is not None and key in cell.get("signals", {}):
            steps.append(cell["signals"][key]["crossed"][rank].get(str(t)))  # None: not a recorded candidate
    if cell["max_nonfinite"][rank] > max_nonfinite:
        steps.append(cell["window"])
    steps = [s for s in steps if s is not None]
    return min(steps) if steps else None


def _rates(mine: list[dict], **thresholds) -> str:
    """``| false positives | detected | steps median / worst | honest named (attacked) |`` for one rule."""
    clean = [c for c in mine if c["fault"] == "none"]
    attacked = [c for c in mine if c["fault"] != "none"]

    def honest_named(c):
        return any(named_at(c, r, **thresholds) is not None for r in range(c["p"]) if r not in c["byzantine"])

    latencies = []
    for c in attacked:
        steps = [named_at(c, r, **thresholds) for r in c["byzantine"]]
        if all(s is not None for s in steps):
            latencies.append(max(steps))
    fp = sum(map(honest_named, clean))
    worst = f"{statistics.median(latencies):.0f} / {max(latencies)}" if latencies else "-"
    return (f"{fp}/{len(clean)} ({_pct(fp, len(clean))}) | {len(latencies)}/{len(attacked)} "
            f"({_pct(len(latencies), len(attacked))}) | {worst} | {sum(map(honest_named, attacked))}/{len(attacked)} |")


HEADER = ("| false positives (no attack) | detected (attacked) | steps to name: median / worst | honest named (attacked) |",
          "|---|---|---|---|")


def report(cells: list[dict], max_nonfinite: float = Thresholds.max_nonfinite) -> str:
    """Weights alone, per candidate ``min_weight``."""
    lines = ["| rule | min_weight " + HEADER[0], "|---|---" + HEADER[1]]
    for rule in sorted({c["rule"] for c in cells}):
        mine = [c for c in cells if c["rule"] == rule]
        for t in CANDIDATES:
            lines.append(f"| {rule} | {t} | " + _rates(mine, min_weight=t, max_nonfinite=max_nonfinite))
    return "\n".join(lines) + "\n"


def signal_report(cells: list[dict], defaults: Thresholds = Thresholds()) -> str:
    """With the signals, at the default ``min_weight``: each candidate of one signal with the other's default."""
    lines = ["| rule | min_alignment | min_distance " + HEADER[0], "|---|---|---" + HEADER[1]]
    base = {"min_weight": defaults.min_weight, "max_nonfinite": defaults.max_nonfinite}
    settings = [(None, None)] + [(t, defaults.min_distance) for t in SIGNAL_CANDIDATES["alignment"]] + \
        [(defaults.min_alignment, t) for t in SIGNAL_CANDIDATES["distance"] if t != defaults.min_distance]
    for rule in sorted({c["rule"] for c in cells}):
        mine = [c for c in cells if c["rule"] == rule and "signals" in c]
        for a, d in settings:
            lines.append(f"| {rule} | {'-' if a is None else a} | {'-' if d is None else d} | "
                         + _rates(mine, **base, min_alignment=a, min_distance=d))
    return "\n".join(lines) + "\n"


def extremes(cells: list[dict]) -> str:
    """Per rule and split: the honest ranks' lowest window means (no attack / any cell) and the Byzantine rank's
    lowest under the faults the weights miss, for each signal."""
    faults = [f for f in ("signflip", "alie-nf", "ipm0.1") if any(c["fault"] == f for c in cells)]
    lines = ["| signal | rule | split | honest, no attack | honest, any cell | " + " | ".join(f"Byzantine, {f}" for f in faults)
             + " |", "|---" * (5 + len(faults)) + "|"]
    for key in SIGNAL_CANDIDATES:
        for rule in sorted({c["rule"] for c in cells}):
            for split in dict.fromkeys(c["split"] for c in cells):
                mine = [c for c in cells if c["rule"] == rule and c["split"] == split and "signals" in c]

                def lowest(chosen, honest=True):
                    values = [c["signals"][key]["min"][r] for c in chosen for r in range(c["p"])
                              if (r not in c["byzantine"]) == honest and c["signals"][key]["min"][r] is not None]
                    return f"{min(values):.3f}" if values else "-"

                row = [lowest([c for c in mine if c["fault"] == "none"]), lowest(mine)]
                row += [lowest([c for c in mine if c["fault"] == f], honest=False) for f in faults]
                lines.append(f"| {key} | {rule} | {split} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def by_fault(cells: list[dict], thresholds: Thresholds = Thresholds(), signals: bool = True) -> str:
    """Detected cells per rule and fault at one setting (``signals``: with the alignment and distance)."""
    rules = sorted({c["rule"] for c in cells})
    faults = [f for f in dict.fromkeys(c["fault"] for c in cells) if f != "none"]
    extra = {"min_alignment": thresholds.min_alignment, "min_distance": thresholds.min_distance} if signals else {}
    lines = ["| fault | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for fault in faults:
        row = []
        for rule in rules:
            mine = [c for c in cells if c["rule"] == rule and c["fault"] == fault]
            hit = sum(all(named_at(c, r, thresholds.min_weight, thresholds.max_nonfinite, **extra) is not None
                          for r in c["byzantine"]) for c in mine)
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
    t = Thresholds()
    text = (f"# Suspects: {len(cells)} cells of {args.grid} (simulation engine, window {args.window})\n\n"
            + "## Weights alone\n\n" + report(cells)
            + f"\n## With the alignment and distance signals (min_weight {t.min_weight})\n\n" + signal_report(cells)
            + "\n## Lowest window means of the signals\n\n" + extremes(cells)
            + f"\n## Detected cells per fault at the defaults (min_weight {t.min_weight}, min_alignment "
            f"{t.min_alignment}, min_distance {t.min_distance})\n\n" + by_fault(cells)
            + f"\n## Detected cells per fault, weights alone (min_weight {t.min_weight})\n\n"
            + by_fault(cells, signals=False))
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
