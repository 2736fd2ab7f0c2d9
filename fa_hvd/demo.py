"""``fa-hvd-demo`` (``make demo``): the trainer on 4 ranks, FA against the plain mean.

Runs ``fa-hvd-train --config configs/demo.yaml`` twice under ``horovodrun`` (Gloo, one
torch thread per rank): once with the config's aggregator (the Flag Aggregator) and
once with ``mean``, both with the config's Byzantine rank. Prints both final test
accuracies and draws both runs' curves into one PNG (``fa-hvd-plot``). Each job's
full output is kept in ``OUT/<aggregator>/job.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fa_hvd import plot
from fa_hvd.cli_types import integer_at_least
from fa_hvd.train import config as train_config


def launch(np: int, config: str, run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    command = ["horovodrun", "-np", str(np), "-H", f"localhost:{np}", "--gloo",
               "fa-hvd-train", "--config", config, "--run-dir", str(run_dir), "--resume", "never"]
    for item in overrides:
        command += ["--set", item]
    tools = str(Path(sys.executable).parent)  # horovodrun and fa-hvd-train, also when the venv is not activated
    env = dict(os.environ, PATH=os.pathsep.join([tools, os.environ.get("PATH", "")]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "job.log", "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def suspects(summary: dict) -> str:
    """``rank 3 (host h, step 20)`` for each rank the run named a suspect (fa_hvd.train.trust), or ``none``."""
    named = summary.get("suspects", [])
    return ", ".join(f"rank {s['rank']} (host {s['host']}, step {s['step']})" for s in named) or "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fa-hvd-demo",
                                     description="The trainer on 4 ranks, FA against the plain mean.")
    parser.add_argument("--np", type=integer_at_least(1), default=4, help="ranks (default 4)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where both runs and the plot go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both runs (see fa-hvd-train --help)")
    args = parser.parse_args(argv)
    try:
        conf, _ = train_config.load(args.config, args.set)
    except train_config.cfg.ConfigError as exc:
        parser.error(str(exc))
    robust = conf.robust
    runs = [(robust.aggregator, []),
            ("mean", ["robust.aggregator=mean", f"robust.aggregator_params={{f: {robust.f}}}"])]
    faults = ", ".join(f"{e['kind']} on rank(s) {e.get('ranks')}" for e in conf.faults) or "none"
    print(f"fa_hvd demo: {args.np} ranks, {conf.data.name}, {conf.model.name}; faults: {faults}; "
          f"{robust.aggregator} vs mean", flush=True)
    results = {}
    for name, extra in runs:
        run_dir = args.out / name
        started = time.perf_counter()
        proc = launch(args.np, args.config, run_dir, args.set + extra)
        summary_file = run_dir / "summary.json"
        if proc.returncode != 0 or not summary_file.exists():
            tail = (run_dir / "job.log").read_text().splitlines()[-25:]
            print(f"[{name}] the job failed (exit {proc.returncode}); last lines of {run_dir / 'job.log'}:",
                  *tail, sep="\n", file=sys.stderr)
            return 1
        summary = json.loads(summary_file.read_text())
        results[name] = summary
        final = summary["final"]
        print(f"[{name}] {summary['step']} steps in {time.perf_counter() - started:.1f} s (training "
              f"{summary['wall_s']:.1f} s): final test accuracy {final['test_accuracy']:.3f}, train loss "
              f"{float(final['train_loss']):.4g}; parameters "
              f"{'bit-identical on every rank' if summary['params_identical_on_ranks'] else 'DIFFER across ranks'}; "
              f"suspects: {suspects(summary)}", flush=True)
    png = plot.plot([args.out / name for name, _ in runs], args.out / "curves.png", [name for name, _ in runs])
    accuracies = ", ".join(f"{name} {results[name]['final']['test_accuracy']:.3f}" for name, _ in runs)
    print(f"final test accuracy: {accuracies}")
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
