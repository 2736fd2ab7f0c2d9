"""How often the trust ledger names the wrong rank, and how fast it names the right one.

    python -m fa_hvd.eval.suspects --grid configs/eval/suspects*.yaml [--match GLOB] [--out DIR] [--margin M]

Runs each cell of one or more grids in the simulation engine (:func:`fa_hvd.eval.simulate.simulate`)
with a :class:`~fa_hvd.train.trust.TrustLedger` fed every step's diagnostics, and records, per
rank and per judged figure (:data:`FIGURES`: the window's mean relative weight, non-finite
fraction, alignment gap and distance), every step at which the figure, rounded to :data:`DIGITS`
decimals, reached a new extreme in the suspect direction (a running minimum, or maximum for the
non-finite fraction). From these *records* the step at which any threshold (of at most
:data:`DIGITS` decimals) would have named the rank is exact (:func:`named_at`), so one sweep judges
every threshold. ``OUT/results.jsonl`` holds one line per cell (cells
already there are skipped); ``OUT/table.md`` is the report:

* the thresholds, set from the honest ranks of the *calibration* cells (no attack, seed
  :data:`CALIBRATION_SEED`) with a stated ``margin`` (:func:`calibrate`), beside the
  defaults (:class:`~fa_hvd.train.trust.Thresholds`);
* per rule at the defaults, on the *held-out* no-attack cells (every other seed): the cells in
  which an honest rank was named and the honest rank-cells named, each with its 95 % upper
  confidence bound (:func:`upper_bound`); on the attacked cells: the cells in which every
  Byzantine rank was named, the step by which the last of them was, and honest ranks named;
* detection per fault and per shape, and the honest ranks' extremes per split.

Rules that report no weights can name only non-finite rows (``max_nonfinite``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
import sys
from pathlib import Path

from fa_hvd.train.trust import Thresholds, TrustLedger

from .grid import load_grid
from .simulate import simulate

FIGURES = {"weight": ("min_weight", -1), "nonfinite": ("max_nonfinite", 1),
           "alignment_gap": ("min_alignment", -1), "distance": ("min_distance", -1), "alignment": (None, -1)}
"""Window figure -> (its threshold in :class:`Thresholds`, None: recorded, not judged; the suspect
direction: -1 below, +1 above)."""
CALIBRATION_SEED = 0
DIGITS = 4  # recorded figures are rounded to this many decimals (thresholds have two)
NO_ATTACK = "none"


class _Recorder:
    """Feeds a ledger that names no one and keeps, per rank and figure, the records of its running extreme."""

    def __init__(self, p: int, window: int):
        self.ledger = TrustLedger(p, Thresholds(window=window, min_weight=0.0, max_nonfinite=0.0,
                                                min_alignment=None, min_distance=None))
        self.records = {key: [[] for _ in range(p)] for key in FIGURES}

    def __call__(self, step: int, diagnostics: dict) -> None:
        self.ledger.observe(step, diagnostics)
        if self.ledger.steps < self.ledger.thresholds.window:
            return
        for r, row in enumerate(self.ledger.window_table()):
            for key, (_, sign) in FIGURES.items():
                value, mine = row[key], self.records[key][r]
                if value is None:
                    continue
                value = round(value, DIGITS)
                if not mine or sign * (value - mine[-1][1]) > 0:
                    mine.append([step, value])


def run_cell(cell, window: int) -> dict:
    recorder = _Recorder(cell.p, window)
    result = simulate(cell, observe=recorder)
    byzantine = sorted({r for entry in cell.fault_entries for r in entry.get("ranks", [])})
    return {"key": cell.key, "split": cell.split, "p": cell.p, "f": cell.f, "rule": cell.rule, "fault": cell.fault,
            "seed": cell.seed, "window": window, "byzantine": byzantine, "steps": result["steps"],
            "test_accuracy": result["test_accuracy"], "wall_s": round(result["wall_s"], 1), "records": recorder.records}


def named_at(cell: dict, rank: int, thresholds: Thresholds) -> int | None:
    """The step at which ``thresholds`` would have named ``rank`` in ``cell`` (None: never)."""
    steps = []
    for key, (name, sign) in FIGURES.items():
        t = None if name is None else getattr(thresholds, name)
        if t is None:
            continue
        steps += [next((step for step, value in cell["records"][key][rank] if sign * (value - t) > 0), None)]
    steps = [s for s in steps if s is not None]
    return min(steps) if steps else None


def extreme(cell: dict, rank: int, key: str) -> float | None:
    """``rank``'s most suspect window figure ``key`` over the run (None: never judged)."""
    mine = cell["records"][key][rank]
    return mine[-1][1] if mine else None


def honest(cell: dict) -> list[int]:
    return [r for r in range(cell["p"]) if r not in cell["byzantine"]]


def calibrate(cells: list[dict], margin: float) -> dict:
    """Thresholds from the honest ranks' extremes over ``cells`` (no-attack cells), ``margin`` beyond them:
    the lowest weight and distance divided by it, the lowest alignment gap times it (the non-finite
    fraction is kept: no honest row is ever non-finite). Per figure: ``(honest extreme, threshold)``."""
    out = {}
    for key, name in (("weight", "min_weight"), ("alignment_gap", "min_alignment"), ("distance", "min_distance")):
        values = [v for c in cells for r in honest(c) if (v := extreme(c, r, key)) is not None]
        if values:
            lowest = min(values)
            out[name] = (lowest, lowest * margin if key == "alignment_gap" else lowest / margin)
    return out


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound of a rate seen ``k`` times in ``n``:
    the rate at which ``k`` or fewer would be seen with probability ``1 - confidence``. For ``k = 0``,
    ``1 - (1 - confidence)^(1/n)``, about 3/n (the rule of three)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0

    def cdf(rate: float) -> float:
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                            + i * math.log(rate) + (n - i) * math.log1p(-rate)) for i in range(k + 1))

    low, high = k / n, 1.0
    for _ in range(60):  # cdf falls as the rate grows
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) > 1 - confidence else (low, mid)
    return high


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({_pct(k, n)}, <= {100 * upper_bound(k, n):.1f} %)" if n else "-"


def false_positives(cells: list[dict], thresholds: Thresholds) -> tuple[int, int, int, int]:
    """``(cells with an honest rank named, cells, honest rank-cells named, honest rank-cells)``."""
    named = [[named_at(c, r, thresholds) is not None for r in honest(c)] for c in cells]
    return sum(map(any, named)), len(cells), sum(map(sum, named)), sum(map(len, named))


def detection(cells: list[dict], thresholds: Thresholds) -> tuple[int, int, list[int]]:
    """``(cells with every Byzantine rank named, cells, the step the last of them was, per detected cell)``."""
    latencies = []
    for c in cells:
        steps = [named_at(c, r, thresholds) for r in c["byzantine"]]
        if all(s is not None for s in steps):
            latencies.append(max(steps))
    return len(latencies), len(cells), latencies


def rates(cells: list[dict], thresholds: Thresholds) -> str:
    """Per rule: false positives on the held-out no-attack cells, detection on the attacked ones."""
    lines = ["| rule | no-attack cells with an honest rank named | honest rank-cells named | attacked cells with "
             "every Byzantine rank named | named by step: median / worst | honest named, attacked cells |",
             "|---|---|---|---|---|---|"]
    for rule in sorted({c["rule"] for c in cells}):
        mine = [c for c in cells if c["rule"] == rule]
        clean = [c for c in mine if c["fault"] == NO_ATTACK and c["seed"] != CALIBRATION_SEED]
        attacked = [c for c in mine if c["fault"] != NO_ATTACK]
        fp_cells, n_cells, fp_ranks, n_ranks = false_positives(clean, thresholds)
        hit, n, latencies = detection(attacked, thresholds)
        steps = f"{statistics.median(latencies):.0f} / {max(latencies)}" if latencies else "-"
        wrong = false_positives(attacked, thresholds)
        lines.append(f"| {rule} | {_rate(fp_cells, n_cells)} | {_rate(fp_ranks, n_ranks)} | "
                     f"{hit}/{n} ({_pct(hit, n)}) | {steps} | {wrong[0]}/{wrong[1]} |")
    return "\n".join(lines) + "\n"


def breakdown(cells: list[dict], thresholds: Thresholds, by: str) -> str:
    """Detected attacked cells per rule and ``by`` (``fault``, ``shape``), and held-out no-attack cells with an
    honest rank named per rule and ``split`` (``by="split"``)."""
    rules = sorted({c["rule"] for c in cells})

    def label(c):
        return f"p{c['p']}f{c['f']}" if by == "shape" else c[by]

    chosen = ([c for c in cells if c["fault"] == NO_ATTACK and c["seed"] != CALIBRATION_SEED] if by == "split"
              else [c for c in cells if c["fault"] != NO_ATTACK])
    lines = [f"| {by} | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for value in dict.fromkeys(map(label, chosen)):
        row = []
        for rule in rules:
            mine = [c for c in chosen if c["rule"] == rule and label(c) == value]
            if by == "split":
                fp, n, _, _ = false_positives(mine, thresholds)
                row.append(f"{fp}/{n}" if n else "-")
            else:
                hit, n, _ = detection(mine, thresholds)
                row.append(f"{hit}/{n}" if n else "-")
        lines.append(f"| {value} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def extremes(cells: list[dict]) -> str:
    """Per rule and split: the honest ranks' most suspect window figures, calibration and held-out no-attack
    cells and attacked cells, beside the Byzantine ranks' (attacked cells)."""
    lines = ["| figure | rule | split | honest, calibration | honest, held-out no attack | honest, attacked | "
             "Byzantine, attacked: median / least suspect |", "|---" * 7 + "|"]
    groups = (("calibration", lambda c: c["fault"] == NO_ATTACK and c["seed"] == CALIBRATION_SEED),
              ("held-out", lambda c: c["fault"] == NO_ATTACK and c["seed"] != CALIBRATION_SEED),
              ("attacked", lambda c: c["fault"] != NO_ATTACK))
    for key in ("weight", "alignment", "alignment_gap", "distance"):
        sign = FIGURES[key][1]
        for rule in sorted({c["rule"] for c in cells}):
            for split in dict.fromkeys(c["split"] for c in cells):
                mine = [c for c in cells if c["rule"] == rule and c["split"] == split]
                row = []
                for _, chosen in groups:
                    values = [v for c in mine if chosen(c) for r in honest(c) if (v := extreme(c, r, key)) is not None]
                    row.append(f"{(min if sign < 0 else max)(values):.3f}" if values else "-")
                byz = [v for c in mine if c["fault"] != NO_ATTACK for r in c["byzantine"]
                       if (v := extreme(c, r, key)) is not None]
                row.append(f"{statistics.median(byz):.3f} / {max(byz) if sign < 0 else min(byz):.3f}" if byz else "-")
                lines.append(f"| {key} | {rule} | {split} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report(cells: list[dict], margin: float, defaults: Thresholds = Thresholds()) -> str:
    calibration = [c for c in cells if c["fault"] == NO_ATTACK and c["seed"] == CALIBRATION_SEED]
    calibrated = calibrate(calibration, margin)
    lines = [f"## Thresholds (window {defaults.window})\n",
             f"From the honest ranks of {len(calibration)} calibration cells (no attack, seed {CALIBRATION_SEED}), "
             f"margin {margin}:\n", "| threshold | honest extreme | calibrated | default |", "|---|---|---|---|"]
    for name, (lowest, value) in calibrated.items():
        lines.append(f"| {name} | {lowest:.3f} | {value:.3f} | {getattr(defaults, name)} |")
    lines.append(f"| max_nonfinite | - | - | {defaults.max_nonfinite} |\n")
    return ("\n".join(lines) + "\n## Rates per rule at the defaults (95 % upper bounds: exact one-sided)\n\n"
            + rates(cells, defaults)
            + "\n## Held-out no-attack cells with an honest rank named, per split\n\n"
            + breakdown(cells, defaults, "split")
            + "\n## Detected attacked cells per fault\n\n" + breakdown(cells, defaults, "fault")
            + "\n## Detected attacked cells per shape\n\n" + breakdown(cells, defaults, "shape")
            + "\n## Most suspect window figures (weight, alignment (not judged), alignment gap, distance: lowest)\n\n"
            + extremes(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa_hvd.eval.suspects", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, nargs="+", help="one or more grid files, run in order")
    parser.add_argument("--out", help="default: the first grid's out:")
    parser.add_argument("--match", action="append", default=[], metavar="GLOB")
    parser.add_argument("--window", type=int, default=Thresholds.window)
    parser.add_argument("--margin", type=float, default=1.5,
                        help="how far beyond the calibration cells' honest extremes the thresholds are set")
    args = parser.parse_args(argv)
    if not args.margin >= 1:
        parser.error(f"--margin: must be >= 1, got {args.margin}")
    grids = [load_grid(path) for path in args.grid]
    out = Path(args.out or grids[0].config.out or f"runs/eval/{grids[0].name}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {json.loads(line)["key"] for line in path.read_text().splitlines()} if path.exists() else set()
    for cell in (cell for grid in grids for cell in grid.cells):
        if cell.key in done or (args.match and not any(fnmatch.fnmatch(cell.key, g) for g in args.match)):
            continue
        record = run_cell(cell, args.window)
        done.add(cell.key)
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        gaps = [v for r in honest(record) if (v := extreme(record, r, "alignment_gap")) is not None]
        print(f"{cell.key}: lowest honest alignment gap {min(gaps, default=None)}", flush=True)
    cells = list({cell["key"]: cell for cell in map(json.loads, path.read_text().splitlines())}.values())  # last wins
    text = (f"# Suspects: {len(cells)} cells of {', '.join(args.grid)} (simulation engine, window {args.window})\n\n"
            + report(cells, args.margin))
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
