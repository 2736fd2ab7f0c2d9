"""``fa-hvd-plot RUN_DIR...``: training loss, test accuracy and per-rank trust of one or more runs, in one PNG.

    fa-hvd-plot runs/demo/flag runs/demo/mean [--out runs/demo/curves.png] [--labels FA mean]

Reads each run's ``metrics.jsonl`` (see :mod:`fa_hvd.train.metrics`): the first
panel is the step loss (mean over ranks, log scale) against the optimizer step, the second
the test accuracy at each evaluation. Losses that are not finite are drawn
at the top edge of the panel with an ``x`` (a run that diverged stays visible); a record
without the figure a panel draws (one written by hand) is left out of that panel.
Then, for each run whose rule reported weights, a trust heatmap: steps x ranks, each
cell the rank's relative weight ``p c_i / sum c`` (1: an equal share; 0: dropped;
:func:`fa_hvd.train.trust.relative_weights`), non-finite rows black, and each suspect the
run named (:mod:`fa_hvd.train.trust`) marked with a triangle at the step it was named.
Default output: ``RUN_DIR/curves.png`` for one run, ``./curves.png`` for several.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fa_hvd.train import metrics
from fa_hvd.train.trust import relative_weights

TRUST_MAX = 2.0  # the heatmap's colour scale: relative weight 0 .. 2, 1 (an equal share) in the middle


def _number(value) -> float:
    return float(value)  # metrics.jsonl writes non-finite numbers as "nan", "inf", "-inf"


def curves(run_dir: Path) -> tuple[list, list, list, list]:
    records = metrics.read(run_dir)
    steps = [r for r in records if r.get("kind") == "step" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval" and "test_accuracy" in r]
    return ([r["step"] for r in steps], [_number(r["loss"]) for r in steps],
            [r["step"] for r in evals], [_number(r["test_accuracy"]) for r in evals])


def trust_map(run_dir: Path) -> tuple[list, list, list] | None:
    """``(steps, rows, suspects)``: per step the ranks' relative weights (NaN where unknown, -inf
    for a non-finite row) and the ``(step, rank)`` of each named suspect; None without weights."""
    records = metrics.read(run_dir)
    steps, rows = [], []
    for r in records:
        if r.get("kind") != "step" or "weights" not in r:
            continue
        p = r.get("world_size", len(r["weights"]))
        row = relative_weights(p, r) or [math.nan] * p
        steps.append(r["step"])
        rows.append([-math.inf if i in r.get("nonfinite", ()) else w for i, w in enumerate(row)])
    if not steps:
        return None
    suspects = [(r["step"], r["suspect"]["rank"]) for r in records if r.get("kind") == "event" and "suspect" in r]
    return steps, rows, suspects


def _draw_trust(ax, fig, steps, rows, suspects, label) -> None:
    import numpy as np
    from matplotlib import colormaps

    width = max(len(row) for row in rows)
    grid = np.full((width, len(steps)), np.nan)
    for j, row in enumerate(rows):
        grid[: len(row), j] = row
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey", under="black")
    image = ax.imshow(np.clip(grid, -1, TRUST_MAX), aspect="auto", cmap=cmap, vmin=0, vmax=TRUST_MAX,
                      interpolation="nearest", origin="lower", extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5,
                                                                        width - 0.5))
    for step, rank in suspects:
        ax.plot([step], [rank], marker="v", color="black", markersize=8, markeredgecolor="white")
    ax.set_yticks(range(width))
    ax.set_yticklabels([f"{r}" + (" suspect" if any(r == s for _, s in suspects) else "") for r in range(width)])
    ax.set(xlabel="step", ylabel="rank", title=f"trust: {label} (weight / (1/p))")
    fig.colorbar(image, ax=ax, extend="both")


def plot(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = [(labels[i] if labels else d.name, trust_map(d)) for i, d in enumerate(run_dirs)]
    maps = [(label, m) for label, m in maps if m is not None]
    fig, axes = plt.subplots(1, 2 + len(maps), figsize=(11 + 5 * len(maps), 4))
    ax_loss, ax_acc = axes[0], axes[1]
    for ax, (label, (steps, rows, suspects)) in zip(axes[2:], maps):
        _draw_trust(ax, fig, steps, rows, suspects, label)
    finite_losses = []
    drawn = []
    for i, run_dir in enumerate(run_dirs):
        label = labels[i] if labels else run_dir.name
        steps, losses, eval_steps, accuracies = curves(run_dir)
        finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
        line, = ax_loss.plot([s for s, _ in finite], [v for _, v in finite], label=label, linewidth=1)
        drawn.append((line.get_color(), [s for s, v in zip(steps, losses) if not math.isfinite(v)]))
        finite_losses += [v for _, v in finite]
        ax_acc.plot(eval_steps, accuracies, marker="o", markersize=3, label=label, color=line.get_color())
    top = max(finite_losses) * 1.05 if finite_losses else 1.0
    for color, bad_steps in drawn:
        if bad_steps:
            ax_loss.plot(bad_steps, [top] * len(bad_steps), "x", color=color, markersize=4)
    ax_loss.set(xlabel="step", ylabel="training loss (mean over ranks)", title="loss", yscale="log")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="test accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fa-hvd-plot",
                                     description="Training loss, test accuracy and a per-rank trust heatmap (steps x "
                                                 "ranks, weight relative to 1/p, suspects marked) of one or more "
                                                 "runs, in one PNG.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path)
    parser.add_argument("--out", type=Path, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the directory names)")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            parser.error(f"{run_dir}: no metrics.jsonl (not a fa-hvd-train run directory)")
    if args.labels and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.run_dirs)} runs")
    out = args.out or (args.run_dirs[0] / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png"))
    print(plot(args.run_dirs, out, args.labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
