"""``fa-hvd-bench step``: a training step with Horovod's allreduce vs fa_hvd, same run.

Run under ``horovodrun -np 4 fa-hvd-bench step``. Each rank builds the same small
CNN three times: one trained with ``hvd.DistributedOptimizer`` (allreduce,
``op=Average``), one with ``fa_hvd.DistributedOptimizer`` and ``mean``, one with
FA. Rounds interleave the three (``steps`` steps each per round) so machine noise
hits all alike; rank 0 prints one JSON line per variant with the median seconds
per step, the ratio to Horovod's step, and the bytes each rank receives per step
on the wire: ``2 (p-1)/p * 4n`` for a ring allreduce of ``n`` fp32 values,
``(p-1) * 4n`` for the allgather (a model of the traffic, not a capture).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "step", help="seconds per training step: Horovod allreduce vs fa_hvd (run under horovodrun)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--width", type=int, default=32, help="CNN width (channels of the first conv)")
    parser.add_argument("--image", type=int, default=32, help="input images are 3 x IMAGE x IMAGE")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--f", type=int, default=1, help="FA's f")
    parser.add_argument("--r", type=int, default=2, help="FA's subspace dimension")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import horovod.torch as hvd

    import fa_hvd
    from fa_hvd.train.models import small_cnn

    hvd.init()
    torch.set_num_threads(args.threads)
    size, rank = hvd.size(), hvd.rank()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 3, args.image, args.image, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)

    def build(wrap):
        torch.manual_seed(0)
        model = small_cnn((3, args.image, args.image), 10, width=args.width)
        return model, wrap(torch.optim.SGD(model.parameters(), lr=0.01), model)

    variants = {
        "horovod_allreduce": build(lambda opt, m: hvd.DistributedOptimizer(
            opt, named_parameters=m.named_parameters(), op=hvd.Average)),
        "fa_hvd_mean": build(lambda opt, m: fa_hvd.DistributedOptimizer(
            opt, named_parameters=m.named_parameters(), aggregator="mean")),
        "fa_hvd_flag": build(lambda opt, m: fa_hvd.DistributedOptimizer(
            opt, named_parameters=m.named_parameters(), aggregator="flag",
            aggregator_params={"f": args.f, "r": args.r})),
    }

    def steps(model, opt, count):
        for _ in range(count):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    for model, opt in variants.values():
        steps(model, opt, args.warmup)
    times = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (model, opt) in variants.items():
            hvd.allreduce(torch.zeros(1), name=f"bench.barrier.{round_}.{name}")
            start = time.perf_counter()
            steps(model, opt, args.steps)
            times[name].append((time.perf_counter() - start) / args.steps)
        if rank == 0:
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)

    n = sum(p.numel() for p in variants["horovod_allreduce"][0].parameters())
    received = {"horovod_allreduce": 2 * (size - 1) / size * 4 * n, "fa_hvd_mean": (size - 1) * 4 * n,
                "fa_hvd_flag": (size - 1) * 4 * n}
    base = statistics.median(times["horovod_allreduce"])
    if rank == 0:
        for name, samples in times.items():
            median = statistics.median(samples)
            print(json.dumps({
                "bench": "step", "variant": name, "ranks": size, "parameters": n, "batch_per_rank": args.batch_size,
                "median_s": median, "min_s": min(samples), "vs_horovod": median / base,
                "bytes_received_per_rank_per_step": int(received[name]),
            }), flush=True)
    return 0
