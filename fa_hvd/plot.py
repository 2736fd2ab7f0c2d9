"""``fa-hvd-plot RUN_DIR...``: training loss and test accuracy of one or more runs, in one PNG.

    fa-hvd-plot runs/demo/flag runs/demo/mean [--out runs/demo/curves.png] [--labels FA mean]

Reads each run's ``metrics.jsonl`` (see :mod:`fa_hvd.train.metrics`): the left
panel is the step loss (mean over ranks, log scale) against the optimizer step, the right
panel the test accuracy at each evaluation. Losses that are not finite are drawn
at the top edge of the panel with an ``x`` (a run that diverged stays visible).
Default output: ``RUN_DIR/curves.png`` for one run, ``./curves.png`` for several.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fa_hvd.train import metrics


def _number(value) -> float:
    return float(value)  # metrics.jsonl writes non-finite numbers as "nan", "inf", "-inf"


def curves(run_dir: Path) -> tuple[list, list, list, list]:
    records = metrics.read(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return ([r["step"] for r in steps], [_number(r["loss"]) for r in steps],
            [r["step"] for r in evals], [_number(r["test_accuracy"]) for r in evals])


def plot(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
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
                                     description="Training loss and test accuracy of one or more runs, in one PNG.")
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
