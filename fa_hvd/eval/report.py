"""The grid's results as a Markdown table, a heatmap and the bars of one rule.

Per (split, p, f) and per (rule, fault): the mean final test accuracy over seeds and
its spread (the sample standard deviation over seeds; 0 with one seed). A rule
*broke* in a cell when a seed diverged (non-finite update or loss) or when its mean
accuracy is below the grid's ``broken_below`` (default 50 %); broken cells are
marked ``x`` in the table and hatched with an ``x`` in the heatmap.

The bars (``bars: {rule: R}`` in the grid), per (split, p, f):

* ``best``: R's mean within ``tolerance`` (1 point) of the best other rule's mean,
  under every fault;
* ``clean``: R within ``tolerance`` of ``clean_rule`` (mean) under ``clean_fault`` (none);
* ``worst``: R's worst case over the faults above every other rule's worst case;
* ``control``: R above ``control`` (nmean) by more than the larger of their two
  spreads under at least one fault.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import yaml

from .grid import Grid


@dataclass
class Stat:
    mean: float
    spread: float
    count: int
    diverged: int
    broken: bool


def summarize(grid: Grid, records: dict) -> dict:
    """``{(split, p, f): {(rule, fault): Stat}}`` over the grid's cells that have a result."""
    groups: dict = {}
    for cell in grid.cells:
        record = records.get(cell.index)
        if record is None:
            continue
        groups.setdefault((cell.split, cell.p, cell.f), {}).setdefault((cell.rule, cell.fault), []).append(record)
    out = {}
    for where, cells in groups.items():
        out[where] = {}
        for what, recs in cells.items():
            accuracies = [r["test_accuracy"] for r in recs]
            mean = statistics.fmean(accuracies)
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            diverged = sum(bool(r["diverged"]) for r in recs)
            out[where][what] = Stat(mean, spread, len(recs), diverged,
                                    diverged > 0 or mean < grid.config.broken_below)
    return out


def _rules(grid: Grid) -> list[str]:
    return list(grid.config.rules)


def _faults(grid: Grid) -> list[str]:
    return list(grid.config.faults)


def _panels(grid: Grid, stats: dict) -> list[tuple]:
    seen = []
    for cell in grid.cells:
        where = (cell.split, cell.p, cell.f)
        if where in stats and where not in seen:
            seen.append(where)
    return sorted(seen, key=lambda w: (list(grid.config.splits).index(w[0]), -w[1], w[2]))


def _entry(stat: Stat | None) -> str:
    if stat is None:
        return "–"
    text = f"{100 * stat.mean:.1f} ±{100 * stat.spread:.1f}"
    return text + " x" if stat.broken else text


def worst_case(table: dict, rule: str, faults: list[str]) -> Stat | None:
    """The rule's lowest mean over the faults (None unless every fault has a result)."""
    stats = [table.get((rule, fault)) for fault in faults]
    if any(s is None for s in stats):
        return None
    return min(stats, key=lambda s: s.mean)


def markdown(grid: Grid, stats: dict, timing: dict | None = None) -> str:
    """The whole report: header, bars (if the grid names a rule), one table per (split, p, f)."""
    rules, faults = _rules(grid), _faults(grid)
    seeds = sorted({c.seed for c in grid.cells})
    trainer = yaml.safe_dump(grid.config.trainer, default_flow_style=True, sort_keys=False).strip()
    lines = [
        f"# Robustness grid `{grid.path.name}`",
        "",
        f"Final test accuracy (%) of each run (trainer settings `{trainer}`): the mean "
        f"over {len(seeds)} seed(s) ± the sample standard deviation over seeds. `x`: the rule broke (a seed "
        f"diverged, or the mean is below {100 * grid.config.broken_below:.0f} %). The faulty workers are the "
        f"{grid.config.faulty} f ranks. `worst`: the rule's lowest mean over the faults.",
        "",
    ]
    if timing:
        lines += [_timing_line(timing), ""]
    if grid.config.bars is not None:
        lines += bars_markdown(grid, stats) + [""]
    for where in _panels(grid, stats):
        split, p, f = where
        alpha = next(c.alpha for c in grid.cells if c.split == split)
        kind = "IID" if alpha is None else f"Dirichlet alpha = {alpha:g}"
        table = stats[where]
        lines += [f"## {split} ({kind}), p = {p}, f = {f}", ""]
        lines.append("| rule | " + " | ".join(faults) + " | worst |")
        lines.append("|---" * (len(faults) + 2) + "|")
        for rule in rules:
            worst = worst_case(table, rule, faults)
            row = [_entry(table.get((rule, fault))) for fault in faults]
            lines.append(f"| {rule} | " + " | ".join(row) + f" | {_entry(worst) if worst else '–'} |")
        lines.append("")
    return "\n".join(lines)


def _timing_line(timing: dict) -> str:
    jobs = "/".join(str(j) for j in timing["jobs"]) or "?"
    return (f"Time: {timing['cells']} cells, {timing['per_cell_s']:.2f} s per cell on average "
            f"(one core each; slowest rule {timing['slowest_rule']} at {timing['slowest_rule_s']:.2f} s), "
            f"{timing['cell_s'] / 3600:.2f} core-hours in all; the {timing['sessions']} run(s) that filled this "
            f"directory took {timing['wall_s'] / 3600:.2f} h wall-clock with {jobs} job(s). "
            + _machines_text(timing["machines"]))


def _machines_text(machines) -> str:
    names = "; ".join(f"{name} ({count} cell{'s' if count != 1 else ''})" for name, count in machines.most_common())
    if len(machines) == 1:
        return f"Machine: {names}."
    return (f"Machines: {names}. A cell's accuracy can differ between machines: compare rules on one machine's "
            "cells (fa-hvd-eval --rerun-other-machines reruns the others on the machine that runs it).")


def bar_checks(grid: Grid, table: dict) -> dict:
    """The four bars of ``grid.config.bars`` on one (split, p, f) table (None where data is missing)."""
    bars = grid.config.bars
    rules, faults = _rules(grid), _faults(grid)
    rule, tol = bars.rule, bars.tolerance
    others = [r for r in rules if r != rule]
    out = {"misses": [], "best": None, "clean": None, "worst": None, "control": None, "control_faults": []}
    complete = all((r, fa) in table for r in rules for fa in faults)
    if not complete:
        return out
    for fault in faults:
        mine = table[(rule, fault)].mean
        best_rule = max(others, key=lambda r: table[(r, fault)].mean)
        best = table[(best_rule, fault)].mean
        if mine < best - tol:
            out["misses"].append((fault, best_rule, best - mine))
    out["best"] = not out["misses"]
    clean_gap = table[(bars.clean_rule, bars.clean_fault)].mean - table[(rule, bars.clean_fault)].mean
    out["clean"] = (clean_gap <= tol, clean_gap)
    mine_worst = worst_case(table, rule, faults).mean
    best_other_rule = max(others, key=lambda r: worst_case(table, r, faults).mean)
    other_worst = worst_case(table, best_other_rule, faults).mean
    out["worst"] = (mine_worst > other_worst, mine_worst, best_other_rule, other_worst)
    for fault in faults:
        a, b = table[(rule, fault)], table[(bars.control, fault)]
        if a.mean - b.mean > max(a.spread, b.spread):
            out["control_faults"].append((fault, a.mean - b.mean))
    out["control"] = bool(out["control_faults"])
    return out


def bars_markdown(grid: Grid, stats: dict) -> list[str]:
    bars = grid.config.bars
    tol = 100 * bars.tolerance
    lines = [
        f"## Bars for `{bars.rule}`",
        "",
        f"best: within {tol:g} point(s) of the best other rule under every fault; clean: within {tol:g} of "
        f"`{bars.clean_rule}` under `{bars.clean_fault}`; worst: its worst case above every other rule's worst "
        f"case; control: above `{bars.control}` by more than the seeds' spread under at least one fault.",
        "",
        "| split | p | f | best | clean | worst | control |",
        "|---|---|---|---|---|---|---|",
    ]
    for where in _panels(grid, stats):
        checks = bar_checks(grid, stats[where])
        if checks["best"] is None:
            lines.append(f"| {where[0]} | {where[1]} | {where[2]} | incomplete | | | |")
            continue
        best = "yes" if checks["best"] else "no: " + ", ".join(
            f"{fault} {100 * gap:.1f} below {other}" for fault, other, gap in checks["misses"])
        ok, gap = checks["clean"]
        clean = f"{'yes' if ok else 'no'} ({-100 * gap:+.1f})"
        ok, mine, other, theirs = checks["worst"]
        worst = f"{'yes' if ok else 'no'} ({100 * mine:.1f} vs {other} {100 * theirs:.1f})"
        control = ("yes: " + ", ".join(f"{fault} +{100 * gap:.1f}" for fault, gap in checks["control_faults"])
                   if checks["control"] else "no")
        lines.append(f"| {where[0]} | {where[1]} | {where[2]} | {best} | {clean} | {worst} | {control} |")
    return lines


def heatmap(grid: Grid, stats: dict, path) -> None:
    """One panel per (split, p, f): rules x faults, colour = mean accuracy, broken cells hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = _panels(grid, stats)
    if not panels:
        return
    rules, faults = _rules(grid), _faults(grid)
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.62 * len(faults) * cols + 2.5, 0.42 * len(rules) * rows + 1.6),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, where in zip(axes.flat, panels):
        table = stats[where]
        values = np.full((len(rules), len(faults)), np.nan)
        for i, rule in enumerate(rules):
            for j, fault in enumerate(faults):
                stat = table.get((rule, fault))
                if stat is None:
                    continue
                values[i, j] = 100 * stat.mean
                ax.text(j, i, f"{100 * stat.mean:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if stat.mean < 0.6 else "black")
                if stat.broken:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx",
                                               edgecolor="red", linewidth=0))
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(faults)), faults, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rules)), rules, fontsize=8)
        split, p, f = where
        ax.set_title(f"{split}, p={p}, f={f}", fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="final test accuracy (%); red x: broke")
    fig.savefig(path, dpi=110)
    plt.close(fig)
