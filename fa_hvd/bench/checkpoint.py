"""``fa-hvd-bench checkpoint``: what writing a checkpoint costs the step loop.

For each size, a synthetic state of that many MiB (float32 tensors of at most 64 MiB) and a
fixed CPU step (a chain of matrix products, the stand-in for training) are set up; each
round then takes one checkpoint the way the trainer does, and reports:

* ``blocked_s``: what the step loop waits for: the copy to host memory
  (:func:`fa_hvd.checkpoint.host_copy`) and the hand-over to the background
  :class:`~fa_hvd.checkpoint.Writer` (streaming ``torch.save``, SHA-256, fsync, rename);
* ``write_s``: from the hand-over until the file is on disk (in the background);
* ``step_s`` alone and ``step_during_write_s`` while the writer runs (the slowdown from
  sharing the cores and the memory bus with it).

One JSON line per size with the median and the spread (min, max) over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fa_hvd import checkpoint
from fa_hvd.cli_types import integer_at_least, integers_at_least

TENSOR_MIB = 64


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("checkpoint", help="what a checkpoint costs the step loop, by size",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=integers_at_least(0), default=[100, 3072],
                        help="comma-separated state sizes in MiB (default 100,3072)")
    parser.add_argument("--rounds", type=integer_at_least(1), default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    parser.set_defaults(run=run)


def synthetic_state(mib: int) -> dict:
    generator = torch.Generator().manual_seed(mib)
    left, model = mib, {}
    while left > 0:
        size = min(left, TENSOR_MIB)
        model[f"layer{len(model)}.weight"] = torch.randn(size * (1 << 18), generator=generator)
        left -= size
    return {"step": 1, "model": model}


def _step(x: torch.Tensor) -> float:
    started = time.perf_counter()
    for _ in range(8):
        x = torch.tanh(x @ x)
    return time.perf_counter() - started


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def run(args: argparse.Namespace) -> int:
    x = torch.randn(384, 384) / 20
    with tempfile.TemporaryDirectory(dir=args.dir) as where:
        directory = Path(where)
        for mib in args.mib:
            live = synthetic_state(mib)
            idle = [_step(x) for _ in range(10)]
            blocked, written, during = [], [], []
            for round_ in range(args.rounds):
                writer = checkpoint.Writer(keep=1)
                started = time.perf_counter()
                writer.submit(checkpoint.path_for(directory, round_), checkpoint.host_copy(live), round_)
                handed = time.perf_counter()
                while writer.busy:
                    during.append(_step(x))
                writer.wait()
                blocked.append(handed - started)
                written.append(time.perf_counter() - handed)
                print(f"checkpoint {mib} MiB: round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
            size = checkpoint.listing(directory)[-1][1].stat().st_size
            print(json.dumps({"bench": "checkpoint", "mib": mib, "file_bytes": size, "rounds": args.rounds,
                              "blocked_s": _spread(blocked), "write_s": _spread(written),
                              "step_s": _spread(idle), "step_during_write_s": _spread(during or [float("nan")])}),
                  flush=True)
            del live
            for _, path in checkpoint.listing(directory):
                path.unlink()
    return 0
