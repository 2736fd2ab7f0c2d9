"""How often the trust ledger names the wrong rank, and how fast it names the right one.

    python -m fa_hvd.eval.suspects --grid configs/eval/suspects*.yaml [--match GLOB] [--out DIR] [--margin M]

Runs each cell of one or more grids in the simulation engine (:func:`fa_hvd.eval.simulate.simulate`)
with a :class:`~fa_hvd.train.trust.TrustLedger` fed every step's diagnostics and batch losses, and records, per
rank and per judged figure (:data:`FIGURES`: the window's mean relative weight, non-finite
fraction, alignment gap, distance to the others' aggregate both ways, share of steps as the rank closest to
the others' aggregate, gap to the nearest other rank's place, and loss excess, as is and gated by the loss z,
beside the loss z itself), every step at which the
figure, rounded to :data:`DIGITS` decimals, reached a new extreme in the suspect direction (a running
minimum, or maximum for the non-finite fraction, the "too far" distance, the closest share and the loss excess). From
these *records* the step at which any threshold (of at most :data:`DIGITS` decimals) would have named the
rank is exact (:func:`named_at`), so one sweep judges every threshold (but the loss z gate, which the records
fix at the measured rules' :data:`~fa_hvd.train.trust.LOSS_Z`). ``OUT/results.jsonl`` holds one
line per cell (cells already there are skipped); ``OUT/table.md`` is the report:

* per rule, the thresholds set from the honest ranks of its *calibration* cells (no attack, seeds below
  :data:`HELD_OUT_SEEDS`, the grid's splits :data:`BAR_SPLITS`; for IID shards the IID cells alone) with a
  stated ``margin`` (:func:`calibrate`), beside the rule's defaults (:func:`~fa_hvd.train.trust.defaults`);
* per rule at the defaults of each cell's split (:func:`cell_defaults`), on the *held-out* no-attack cells
  (seeds from :data:`HELD_OUT_SEEDS`, the grid's splits): the cells in which an honest rank was named and the
  honest rank-cells named, each with its 95 % upper confidence bound (:func:`upper_bound`); on the attacked
  cells: the cells in which every Byzantine rank was named, the step by which the last of them was, and honest
  ranks named;
  the same false-positive figures on any other split (a stress row, outside the bar);
* detection per fault and per shape, false positives per split, and the honest ranks' extremes.

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

import torch

from fa_hvd.cli_types import integer_at_least
from fa_hvd.train.trust import Thresholds, TrustLedger, defaults

from .grid import load_grid
from .simulate import simulate

FIGURES = {"weight": ("weight", "min_weight", -1), "nonfinite": ("nonfinite", "max_nonfinite", 1),
           "alignment_gap": ("alignment_gap", "min_alignment", -1), "distance": ("distance", "min_distance", -1),
           "distance_far": ("distance", "max_distance", 1), "alignment": ("alignment", None, -1),
           "closest": ("closest", "max_closest", 1), "twin": ("twin", "min_twin", -1),
           "loss_excess": ("loss_excess", None, 1), "loss_z": ("loss_z", None, 1),
           "loss_excess_gated": ("loss_excess_gated", "max_loss_excess", 1)}
"""Record -> (the window figure of :meth:`TrustLedger.window_table` it follows, its threshold in :class:`Thresholds`
(None: recorded, not judged), the suspect direction: -1 below, +1 above). ``loss_excess_gated`` is the loss excess
of the windows whose loss z passes :data:`~fa_hvd.train.trust.LOSS_Z` (:meth:`Thresholds.judged_loss_excess`), so
the gate is the measured rules' and fixed in the records; its threshold is calibrated on ``loss_excess`` alone
(:data:`CALIBRATED_ON`: the gate is set, not measured)."""
CALIBRATED_ON = {"loss_excess_gated": "loss_excess"}
"""Records whose threshold :func:`calibrate` sets from another record's honest extremes."""
GATE = Thresholds()
"""The loss z gate of the records (:data:`fa_hvd.train.trust.LOSS_Z`, every measured rule's)."""
THRESHOLDS = [name for _, name, _ in FIGURES.values() if name is not None]
"""The :class:`Thresholds` fields the sweep judges, in :data:`FIGURES` order."""
BAR_SPLITS = ("iid", "dirichlet0.5")  # the standing grid's splits (configs/eval/standing.yaml): calibrated and judged
HELD_OUT_SEEDS = 100  # no-attack cells of this seed or above are held out; below it they calibrate
DIGITS = 4  # recorded figures are rounded to this many decimals (thresholds have two)
NO_ATTACK = "none"


class _Recorder:
    """Feeds a ledger that names no one and keeps, per rank and figure, the records of its running extreme."""

    def __init__(self, p: int, window: int):
        self.ledger = TrustLedger(p, Thresholds(window=window, min_weight=0.0, max_nonfinite=0.0,
                                                min_alignment=None, min_distance=None, max_distance=None,
                                                max_closest=None, min_twin=None, max_loss_excess=None))
        self.records = {key: [[] for _ in range(p)] for key in FIGURES}

    def __call__(self, step: int, diagnostics: dict, losses: list[float]) -> None:
        self.ledger.observe(step, diagnostics, losses)
        if self.ledger.steps < self.ledger.thresholds.window:
            return
        for r, row in enumerate(self.ledger.window_table()):
            row["loss_excess_gated"] = GATE.judged_loss_excess(row)
            for key, (figure, _, sign) in FIGURES.items():
                value, mine = row[figure], self.records[key][r]
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
    for key, (_, name, sign) in FIGURES.items():
        t = None if name is None else getattr(thresholds, name)
        if t is None:
            continue
        steps += [next((step for step, value in records(cell, key)[rank] if sign * (value - t) > 0), None)]
    steps = [s for s in steps if s is not None]
    return min(steps) if steps else None


def records(cell: dict, key: str) -> list[list]:
    """The cell's records of figure ``key`` per rank (none for a figure its sweep did not yet record)."""
    return cell["records"].get(key) or [[] for _ in range(cell["p"])]


def extreme(cell: dict, rank: int, key: str) -> float | None:
    """``rank``'s most suspect window figure ``key`` over the run (None: never judged)."""
    mine = records(cell, key)[rank]
    return mine[-1][1] if mine else None


def honest(cell: dict) -> list[int]:
    return [r for r in range(cell["p"]) if r not in cell["byzantine"]]


def calibrate(cells: list[dict], margin: float) -> dict:
    """Thresholds from the honest ranks' most suspect window figures over ``cells`` (no-attack cells),
    ``margin`` beyond them and rounded outward to two decimals: the lowest weight, distance and twin gap divided
    by it, the lowest alignment gap and the highest distance times it; the highest closest share, a share of the
    window's steps bounded by 1, as ``1 - (1 - share) / margin`` (its complement, the steps at which the honest
    rank was not the closest, divided by the margin, as the figures that fall towards 0 are; an honest share of
    1: None, not judged). The non-finite fraction is kept: no honest row is ever non-finite. Per threshold:
    ``(honest extreme, threshold)``; a record of :data:`CALIBRATED_ON` from the other record's extremes."""
    out = {}
    for key, (_, name, sign) in FIGURES.items():
        source = CALIBRATED_ON.get(key, key)
        values = [v for c in cells for r in honest(c) if (v := extreme(c, r, source)) is not None]
        if name in (None, "max_nonfinite") or not values:
            continue
        most = min(values) if sign < 0 else max(values)
        if key == "closest":  # a share, at most 1: the margin shrinks its complement (the steps it was not closest)
            beyond = 1 - (1 - most) / margin
        else:
            beyond = most * margin if key in ("alignment_gap", "distance_far", "loss_excess_gated") else most / margin
        threshold = (math.floor if sign < 0 else math.ceil)(round(beyond * 100, 6)) / 100
        out[name] = (most, None if key == "closest" and threshold >= 1 else threshold)  # a share of 1 names no one
    return out


def group(cell: dict) -> str:
    """``attacked``, or for a no-attack cell ``calibration``, ``held-out`` (both on :data:`BAR_SPLITS`) or
    ``stress`` (another split: reported, outside the bar, never calibrated on)."""
    if cell["fault"] != NO_ATTACK:
        return "attacked"
    if cell["split"] not in BAR_SPLITS:
        return "stress"
    return "held-out" if cell["seed"] >= HELD_OUT_SEEDS else "calibration"


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


def cell_defaults(cell: dict) -> Thresholds:
    """The defaults the trainer would judge ``cell``'s run by: its rule's, for IID shards or not."""
    return defaults(cell["rule"], iid=cell["split"] == "iid")


def false_positives(cells: list[dict]) -> tuple[int, int, int, int]:
    """At each cell's rule's defaults: ``(cells with an honest rank named, cells, honest rank-cells named,
    honest rank-cells)``."""
    named = [[named_at(c, r, cell_defaults(c)) is not None for r in honest(c)] for c in cells]
    return sum(map(any, named)), len(cells), sum(map(sum, named)), sum(map(len, named))


def detection(cells: list[dict]) -> tuple[int, int, list[int]]:
    """At each cell's rule's defaults: ``(cells with every Byzantine rank named, cells, the step the last of
    them was, per detected cell)``."""
    latencies = []
    for c in cells:
        steps = [named_at(c, r, cell_defaults(c)) for r in c["byzantine"]]
        if all(s is not None for s in steps):
            latencies.append(max(steps))
    return len(latencies), len(cells), latencies


def best_possible(cells: list[dict], allowed: int) -> tuple[int, int, int, Thresholds, list[str]]:
    """The most attacked cells that *any* thresholds could detect while naming honest ranks in at most
    ``allowed`` of the held-out no-attack cells, the thresholds chosen on those very cells (an upper bound on
    what the figures can tell apart here, not a calibration: no margin, nothing held out). Exact: for each set
    of at most ``allowed`` held-out cells given up, each threshold is put at the honest extreme of the other
    held-out cells (no honest rank there crosses it, and any threshold that also spares them names no
    Byzantine rank sooner), and the best of these sets wins. A figure no honest rank reported is not judged.
    Returns ``(detected, attacked cells, held-out cells with an honest rank named, thresholds, missed
    cells' keys)``; at most one cell is given up (``allowed`` is 0 or 1)."""
    if allowed not in (0, 1):
        raise ValueError(f"allowed: 0 or 1 held-out cells, got {allowed}")
    held_out = [c for c in cells if group(c) == "held-out"]
    attacked = [c for c in cells if group(c) == "attacked"]
    best = None
    for spared in [None] + (list(range(len(held_out))) if allowed else []):
        kept = [c for i, c in enumerate(held_out) if i != spared]
        tightest = {}
        for key, (_, name, sign) in FIGURES.items():
            if name is None:
                continue
            values = [v for c in kept for r in honest(c) if (v := extreme(c, r, key)) is not None]
            tightest[name] = (min(values) if sign < 0 else max(values)) if values else None
        thresholds = Thresholds(**tightest)
        missed = [c["key"] for c in attacked if any(named_at(c, r, thresholds) is None for r in c["byzantine"])]
        if best is None or len(missed) < len(best[1]):
            best = (thresholds, missed)
    thresholds, missed = best
    false = sum(any(named_at(c, r, thresholds) is not None for r in honest(c)) for c in held_out)
    return len(attacked) - len(missed), len(attacked), false, thresholds, missed


def best_possible_table(cells: list[dict]) -> str:
    """Per rule, :func:`best_possible` giving up one held-out cell where that is within the bar's 1 % of them
    (100 cells or more), else none; beside it, the cells the rule's defaults detect."""
    lines = ["| rule | held-out cells given up | attacked cells with every Byzantine rank named (defaults) | "
             "held-out cells with an honest rank named | thresholds | missed |", "|---" * 6 + "|"]
    for rule in sorted({c["rule"] for c in cells}):
        mine = [c for c in cells if c["rule"] == rule]
        allowed = min(1, sum(group(c) == "held-out" for c in mine) // 100)
        hit, n, false, thresholds, missed = best_possible(mine, allowed)
        default_hit = detection([c for c in mine if group(c) == "attacked"])[0]
        chosen = ", ".join(f"{name} {value:.3f}" for name in THRESHOLDS if (value := getattr(thresholds, name)) is not None)
        lines.append(f"| {rule} | {allowed} | {hit}/{n} ({_pct(hit, n)}) ({default_hit}/{n}) | {false} | {chosen} | "
                     f"{', '.join(missed) or '-'} |")
    return "\n".join(lines) + "\n"


def rates(cells: list[dict]) -> str:
    """Per rule at its defaults: false positives on the held-out no-attack cells, detection on the attacked
    ones, false positives on the stress split."""
    lines = ["| rule | held-out no-attack cells with an honest rank named | honest rank-cells named | attacked "
             "cells with every Byzantine rank named | named by step: median / worst | honest named, attacked "
             "cells | stress (outside the bar): cells with an honest rank named |", "|---" * 7 + "|"]
    for rule in sorted({c["rule"] for c in cells}):
        mine = [c for c in cells if c["rule"] == rule]
        fp_cells, n_cells, fp_ranks, n_ranks = false_positives([c for c in mine if group(c) == "held-out"])
        hit, n, latencies = detection([c for c in mine if group(c) == "attacked"])
        steps = f"{statistics.median(latencies):.0f} / {max(latencies)}" if latencies else "-"
        wrong = false_positives([c for c in mine if group(c) == "attacked"])
        stress = false_positives([c for c in mine if group(c) == "stress"])
        lines.append(f"| {rule} | {_rate(fp_cells, n_cells)} | {_rate(fp_ranks, n_ranks)} | "
                     f"{hit}/{n} ({_pct(hit, n)}) | {steps} | {wrong[0]}/{wrong[1]} | {_rate(*stress[:2])} |")
    return "\n".join(lines) + "\n"


def breakdown(cells: list[dict], by: str) -> str:
    """Per rule at its defaults: detected attacked cells per ``by`` (``fault``, ``shape``), or with
    ``by="split"`` held-out and stress no-attack cells with an honest rank named per split."""
    rules = sorted({c["rule"] for c in cells})

    def label(c):
        return f"p{c['p']}f{c['f']}" if by == "shape" else c[by]

    chosen = ([c for c in cells if group(c) in ("held-out", "stress")] if by == "split"
              else [c for c in cells if group(c) == "attacked"])
    lines = [f"| {by} | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for value in dict.fromkeys(map(label, chosen)):
        row = []
        for rule in rules:
            mine = [c for c in chosen if c["rule"] == rule and label(c) == value]
            hit, n = (false_positives(mine) if by == "split" else detection(mine))[:2]
            row.append(f"{hit}/{n}" if n else "-")
        lines.append(f"| {value} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def extremes(cells: list[dict]) -> str:
    """Per figure, rule and split: the honest ranks' most suspect window figures in calibration, held-out and
    stress no-attack cells and in attacked cells, beside the Byzantine ranks' (attacked cells)."""
    groups = ("calibration", "held-out", "stress", "attacked")
    lines = ["| figure | rule | split | " + " | ".join(f"honest, {g}" for g in groups)
             + " | Byzantine, attacked: median / least suspect |", "|---" * 8 + "|"]
    for key in ("weight", "alignment", "alignment_gap", "distance", "distance_far", "closest", "twin", "loss_excess",
                "loss_z", "loss_excess_gated"):
        sign = FIGURES[key][2]
        for rule in sorted({c["rule"] for c in cells}):
            for split in dict.fromkeys(c["split"] for c in cells):
                mine = [c for c in cells if c["rule"] == rule and c["split"] == split]
                row = []
                for chosen in groups:
                    values = [v for c in mine if group(c) == chosen for r in honest(c)
                              if (v := extreme(c, r, key)) is not None]
                    row.append(f"{(min if sign < 0 else max)(values):.3f}" if values else "-")
                byz = [v for c in mine if group(c) == "attacked" for r in c["byzantine"]
                       if (v := extreme(c, r, key)) is not None]
                row.append(f"{statistics.median(byz):.3f} / {(max if sign < 0 else min)(byz):.3f}" if byz else "-")
                lines.append(f"| {key} | {rule} | {split} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report(cells: list[dict], margin: float) -> str:
    rules = sorted({c["rule"] for c in cells})
    lines = [f"## Thresholds per rule (window {Thresholds.window})\n",
             f"From the honest ranks of the calibration cells (no attack, seeds below {HELD_OUT_SEEDS}, "
             f"{' and '.join(BAR_SPLITS)}; for IID shards, the IID ones alone), margin {margin}: honest extreme -> "
             f"calibrated (default, `fa_hvd/train/trust.py`; each cell is judged by the defaults of its split):\n",
             "| rule | calibration cells | " + " | ".join(THRESHOLDS) + " |",
             "|---" * (len(THRESHOLDS) + 2) + "|"]
    for rule in rules:
        for iid in (False, True):  # the defaults for any split, from every bar split; those for IID shards
            calibration = [c for c in cells if c["rule"] == rule and group(c) == "calibration"
                           and (c["split"] == "iid" or not iid)]
            calibrated, chosen = calibrate(calibration, margin), defaults(rule, iid=iid)
            row = [f"{calibrated[n][0]:.3f} -> {calibrated[n][1]} ({getattr(chosen, n)})" if n in calibrated
                   else f"- ({getattr(chosen, n)})" for n in THRESHOLDS]
            lines.append(f"| {rule}{', IID shards' if iid else ''} | {len(calibration)} | " + " | ".join(row) + " |")
    return ("\n".join(lines) + "\n\n## Rates per rule at its defaults (95 % upper bounds: exact one-sided)\n\n"
            + rates(cells)
            + "\n## What any thresholds could do on these cells (chosen on the held-out cells themselves)\n\n"
            + "An upper bound, not a calibration (`best_possible`): the thresholds that detect the most attacked "
              "cells while naming honest ranks in at most 1 % of the held-out cells, each at the honest extreme "
              "of the held-out cells kept.\n\n"
            + best_possible_table(cells)
            + "\n## No-attack cells with an honest rank named, per split (held-out seeds; dirichlet0.1: stress)\n\n"
            + breakdown(cells, "split")
            + "\n## Detected attacked cells per fault\n\n" + breakdown(cells, "fault")
            + "\n## Detected attacked cells per shape\n\n" + breakdown(cells, "shape")
            + "\n## Most suspect window figures (weight, alignment (not judged), alignment gap, distance, twin: "
              "lowest; distance_far: the distance's highest; closest: the highest share; loss_excess, loss_z and "
              "loss_excess_gated (the excess where the loss z is at least the gate): the highest)\n\n"
            + extremes(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa_hvd.eval.suspects", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, nargs="+", help="one or more grid files, run in order")
    parser.add_argument("--out", help="default: the first grid's out:")
    parser.add_argument("--match", action="append", default=[], metavar="GLOB")
    parser.add_argument("--window", type=integer_at_least(1), default=Thresholds.window)
    parser.add_argument("--margin", type=float, default=1.5,
                        help="how far beyond the calibration cells' honest extremes the thresholds are set")
    args = parser.parse_args(argv)
    if not args.margin >= 1:
        parser.error(f"--margin: must be >= 1, got {args.margin}")
    grids = [load_grid(path) for path in args.grid]
    torch.set_num_threads(1)  # one core a sweep: a thread pool on a shared machine only slows the cells
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
