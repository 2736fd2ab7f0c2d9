"""``fa-hvd-bench step``: a training step with Horovod's allreduce (or DDP's) vs fa_hvd, same run.

Run under ``horovodrun -np 4 fa-hvd-bench step``, or ``torchrun --nproc-per-node 4
--no-python fa-hvd-bench step --transport torch``. Each rank builds the same model
(ResNet-18 by default, on the CPU; ``--device cuda``: one GPU per rank) once per variant:

* ``horovod_allreduce``: ``hvd.DistributedOptimizer`` (``op=Average``);
* ``fa_hvd_mean``: ``fa_hvd.DistributedOptimizer`` with ``mean`` and its default buckets;
* ``fa_hvd_mean_one_bucket``: the same with the whole gradient in one bucket (nothing
  leaves before backward ends: the no-overlap baseline);
* ``fa_hvd_flag``: FA with its default buckets;
* with ``--exchange allgather,sharded``, also ``fa_hvd_mean_sharded`` and
  ``fa_hvd_flag_sharded``: the same rules with ``exchange="sharded"``;
* with ``--digest-cost``, also ``..._digest`` twins of the FA variants with the
  deferred digest of the aggregate (:mod:`fa_hvd.exchange.digest`, the trainer's
  default), and every FA variant then ends its step as the trainer does, with the
  control row (:func:`fa_hvd.train.control.agree`), which the twin's digest words
  ride in: the digest's cost is the ratio of the two medians (``digest_cost``),
  measured in the same rounds, with each round's ratio (``digest_cost_per_round``:
  the spread), and, less noisy, the median time of rank 0's fingerprint
  (``fingerprint_s``, the only work the digest adds, on a worker thread) over the
  median step (``fingerprint_share``) and how long the step waited for it
  (``fingerprint_wait_s``); and the same ratios of the CPU seconds the rank's
  process spent per step, all threads (``digest_cpu_cost`` and per round), which
  other jobs on the machine disturb less than wall time.

With ``--transport torch`` (torch.distributed, Gloo or NCCL) the baseline is
``ddp_allreduce``, plain ``DistributedDataParallel``, and the variants are
``ddp_hook_mean`` and ``ddp_hook_flag``: DDP with :mod:`fa_hvd.ddp`'s hook (what a DDP
user adds), then ``fa_hvd_mean`` and ``fa_hvd_flag``: the optimizer over the torch
transport (and the ``_sharded`` twins of all four). Ratios are ``vs_ddp``. Under DDP the
exchange runs inside ``backward`` (DDP's buckets and the hook), so the DDP rows have no
exposed time of their own (``null``).

A step is ``zero_grad``, forward, ``backward``, ``synchronize()``, ``step()`` (under
``skip_synchronize``). Its *exposed communication* is the time from the end of
``backward`` (the last gradient) to the end of ``synchronize()`` (the aggregate in
``.grad``): the communication that backward did not hide, plus, for fa_hvd, the
rule. Rounds interleave the variants (``steps`` steps each per round) so machine
noise hits all alike; rank 0 prints one JSON line per variant with medians of the
step time and the exposed time, their ratios to Horovod's, fa_hvd's own split
(``wait_s``: blocked on communication, ``aggregate_s``: the rule).

Bytes: what each rank really sent and received per step, as the kernel counted
them on its TCP sockets (:mod:`fa_hvd.comm.traffic`; everything the process moved
over TCP, Horovod's own negotiation included; shared memory and NCCL are not
seen), over each round's steps between two barriers, the most of any rank; beside
it the cost model (:mod:`fa_hvd.exchange.cost`: ``2 (p-1)/p * 4n`` for a ring
allreduce of ``n`` fp32 values, ``(p-1) * 4n`` for the allgather, the allreduce's
plus the Gram words for the sharded exchange) and the memory the exchange held
(the sharded exchange counts its own buffers; the allgather's is the model's).
Sharded variants carry ``bytes_vs_allreduce`` (measured, the larger of sent and
received; "not counted" when the sockets saw none of the allreduce's bytes) and a
last summary line holds the sharded mode's bars: bytes per rank <= 1.1x the
allreduce's, step <= 1.1x plain Horovod's. Timing figures belong to whoever reads
them on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ALLGATHER_VARIANTS = ("fa_hvd_mean", "fa_hvd_mean_one_bucket", "fa_hvd_flag")
SHARDED_VARIANTS = ("fa_hvd_mean_sharded", "fa_hvd_flag_sharded")
TORCH_VARIANTS = ("ddp_hook_mean", "ddp_hook_flag", "fa_hvd_mean", "fa_hvd_flag")
EXCHANGES = ("allgather", "sharded")
BASELINES = {"horovod": ("horovod_allreduce", "vs_horovod"), "torch": ("ddp_allreduce", "vs_ddp")}


def variants_for(exchanges: list[str], transport: str = "horovod", digest_cost: bool = False) -> tuple[str, ...]:
    """The transport's own allreduce, then fa_hvd's variants for each exchange asked for."""
    names = (BASELINES[transport][0],)
    if transport == "torch":
        for exchange in exchanges:
            names += tuple(v + ("_sharded" if exchange == "sharded" else "") for v in TORCH_VARIANTS)
        return names
    if "allgather" in exchanges:
        names += ALLGATHER_VARIANTS + (("fa_hvd_flag_digest",) if digest_cost else ())
    if "sharded" in exchanges:
        names += SHARDED_VARIANTS + (("fa_hvd_flag_sharded_digest",) if digest_cost else ())
    return names


def _exchanges(text: str) -> list[str]:
    names = list(dict.fromkeys(part.strip() for part in text.split(",")))
    unknown = [name for name in names if name not in EXCHANGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(EXCHANGES)}, got {text!r}")
    return names


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "step", help="seconds per training step and exposed communication: Horovod allreduce (or DDP) vs "
                     "fa_hvd (run under horovodrun, or torchrun with --transport torch)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", choices=("resnet18", "resnet50", "cnn"), default="resnet18",
                        help="torchvision's ResNet-18 (11.7M parameters), ResNet-50 (25.6M; with --image 224 "
                        "and --num-classes 1000 the ImageNet shape) or a small CNN")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic labels")
    parser.add_argument("--exchange", type=_exchanges, default=["allgather"], metavar="LIST",
                        help="fa_hvd's exchanges to time, comma list of allgather, sharded (default: allgather)")
    parser.add_argument("--digest-cost", action="store_true",
                        help="also time FA with the deferred digest of the aggregate (variants ..._digest); FA "
                             "and its twin then end each step with the trainer's control row, which carries it")
    parser.add_argument("--transport", choices=tuple(BASELINES), default="horovod",
                        help="horovod (under horovodrun; baseline Horovod's allreduce) or torch (under torchrun; "
                             "baseline plain DDP)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda: one GPU per rank (its local rank), NCCL where Horovod has it")
    parser.add_argument("--width", type=int, default=32, help="the small CNN's width (channels of the first conv)")
    parser.add_argument("--image", type=int, default=32, help="input images are 3 x IMAGE x IMAGE")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--f", type=int, default=None,
                        help="FA's f (default: 1, or 0 below 3 ranks, where FA cannot tolerate one: p >= 2f + 1)")
    parser.add_argument("--r", type=int, default=None, help="FA's subspace dimension (default: FA's own, it follows p)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--bucket-bytes", type=int, default=None,
                        help="fa_hvd's bucket size (default: automatic, about 1/8 of the model within 1..25 MiB)")
    parser.set_defaults(run=run)


def build_model(args) -> torch.nn.Module:
    if args.model in ("resnet18", "resnet50"):
        import torchvision.models

        return getattr(torchvision.models, args.model)(num_classes=args.num_classes)
    from fa_hvd.train.models import small_cnn

    return small_cnn((3, args.image, args.image), args.num_classes, width=args.width)


NOT_COUNTED = "not counted"


def per_round_cost(mine: list[float], twin: list[float], steps: int) -> list[float]:
    """Each round's median step over its twin's in the same round, minus 1 (the spread of the cost:
    the rounds interleave the variants, so a round's noise hits both)."""
    rounds = range(0, len(mine), steps)
    return [round(statistics.median(mine[i : i + steps]) / statistics.median(twin[i : i + steps]) - 1, 4)
            for i in rounds]


def vs_allreduce(mine: list[float], allreduce: list[float]) -> float | str:
    """The larger of the sent and received byte ratios to Horovod's allreduce, or "not counted"
    when the sockets saw none of the allreduce's bytes (Open MPI's shared memory between ranks
    on one node, the default under horovodrun here)."""
    if not all(allreduce):
        return NOT_COUNTED
    return max(m / a for m, a in zip(mine, allreduce))


def run(args: argparse.Namespace) -> int:
    import fa_hvd
    import fa_hvd.ddp
    from fa_hvd.comm import get_transport
    from fa_hvd.comm.traffic import SocketTraffic
    from fa_hvd.exchange.cost import exchange_cost
    from fa_hvd.train import control

    transport = get_transport(args.transport)
    torch.set_num_threads(args.threads)
    size, rank = transport.size, transport.rank
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", transport.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 3, args.image, args.image, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)
    names = variants_for(args.exchange, args.transport, args.digest_cost)
    baseline, ratio = BASELINES[args.transport]
    with_control_row = {n for name in names if name.endswith("_digest") for n in (name, name.removesuffix("_digest"))}
    flag = {"f": min(1, (size - 1) // 2) if args.f is None else args.f,
            **({} if args.r is None else {"r": args.r})}

    def build(name):
        torch.manual_seed(0)
        model = build_model(args).to(device)
        inner = torch.optim.SGD(model.parameters(), lr=0.01)
        named = model.named_parameters()
        exchange = "sharded" if "_sharded" in name else "allgather"
        if name == "horovod_allreduce":
            import horovod.torch as hvd

            return model, hvd.DistributedOptimizer(inner, named_parameters=named, op=hvd.Average)
        if name.startswith("ddp_"):
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=args.bucket_bytes / 2**20 if args.bucket_bytes else None)
            if name.startswith("ddp_hook"):
                rule = "flag" if name.startswith("ddp_hook_flag") else "mean"
                fa_hvd.ddp.wrap(ddp, aggregator=rule, exchange=exchange, **(flag if rule == "flag" else {}))
            return ddp, inner
        bucket_bytes = 1 << 62 if name == "fa_hvd_mean_one_bucket" else args.bucket_bytes
        if name.startswith("fa_hvd_flag"):
            return model, fa_hvd.DistributedOptimizer(inner, named_parameters=named, aggregator="flag",
                                                      aggregator_params=flag, bucket_bytes=bucket_bytes,
                                                      exchange=exchange, transport=transport,
                                                      digest="deferred" if name.endswith("_digest") else False)
        return model, fa_hvd.DistributedOptimizer(inner, named_parameters=named, aggregator="mean",
                                                  bucket_bytes=bucket_bytes, exchange=exchange, transport=transport)

    variants = {name: build(name) for name in names}
    traffic = SocketTraffic()

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    keys = ("step_s", "exposed_s", "wait_s", "aggregate_s", "sent", "received", "peak_bytes", "fingerprint_s",
            "fingerprint_wait_s", "cpu_s")
    samples = {name: {key: [] for key in keys} for name in names}

    def steps(name, count, record):
        model, opt = variants[name]
        for _ in range(count):
            start, cpu = clock(), time.process_time()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if name.startswith("ddp_"):  # the exchange ran inside backward
                opt.step()
                if record:
                    samples[name]["step_s"].append(clock() - start)
                continue
            backward_done = clock()
            opt.synchronize()
            synced = clock()
            with opt.skip_synchronize():
                opt.step()
            if name in with_control_row:  # the trainer's control row, the twin's digest words in it
                control.agree(transport, 0.0, stop=False, checkpoint_due=False, faulty=False, overflowed=False,
                              digest=opt.digest)
                if record and opt.digest is not None:  # the last step's fingerprint (settled by this row)
                    samples[name]["fingerprint_s"].append(opt.digest.seconds)
                    samples[name]["fingerprint_wait_s"].append(opt.digest.waited)
            if record:
                samples[name]["step_s"].append(clock() - start)
                samples[name]["cpu_s"].append(time.process_time() - cpu)
                samples[name]["exposed_s"].append(synced - backward_done)
                stats = getattr(opt, "stats", {})
                for key in ("wait_s", "aggregate_s", "peak_bytes"):
                    if key in stats:
                        samples[name][key].append(stats[key])

    for name in names:
        steps(name, args.warmup, record=False)
    for round_ in range(args.rounds):
        for name in names:
            # Byte counts outside two barriers: no peer's bytes of this round arrive before the
            # first snapshot, and all of them have arrived before the second (barriers: ~100 B).
            before = traffic.totals()
            transport.allreduce_sum(torch.zeros(1), name=f"bench.barrier.{round_}.{name}")
            steps(name, args.steps, record=True)
            transport.allreduce_sum(torch.zeros(1), name=f"bench.barrier2.{round_}.{name}")
            after = traffic.totals()
            samples[name]["sent"].append((after[0] - before[0]) / args.steps)
            samples[name]["received"].append((after[1] - before[1]) / args.steps)
        if rank == 0:
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)

    n = sum(p.numel() for p in variants[baseline][0].parameters())
    medians = {name: {k: statistics.median(v) for k, v in s.items() if v} for name, s in samples.items()}
    wire = torch.tensor([[[medians[name][k] for k in ("sent", "received")] for name in names]], dtype=torch.float64)
    everyone = transport.allgather(wire, name="bench.bytes")  # (ranks, variants, 2): numbers, not pickles
    most = {name: everyone[:, i].amax(0).tolist() for i, name in enumerate(names)}
    base = medians[baseline]
    if rank == 0:
        records = []
        for name in names:
            m = medians[name]
            kind = "allreduce" if name == baseline else "sharded" if "_sharded" in name else "allgather"
            opt = variants[name][1]
            buckets = getattr(opt, "_buckets", None) if kind != "allreduce" else None  # DDP's are its own
            sizes = [b.numel for b in buckets] if buckets else [n]
            model = exchange_cost(kind, sizes, size)  # the deferred digest adds no exchange traffic
            record = {
                "bench": "step", "variant": name, "exchange": kind, "model": args.model, "device": args.device,
                "ranks": size, "parameters": n, "batch_per_rank": args.batch_size,
                "buckets": len(buckets) if buckets else None,
                "median_s": m["step_s"], "min_s": min(samples[name]["step_s"]),
                "max_s": max(samples[name]["step_s"]), ratio: m["step_s"] / base["step_s"],
                "exposed_s": m.get("exposed_s"),
                f"exposed_{ratio}": m["exposed_s"] / base["exposed_s"] if "exposed_s" in m and "exposed_s" in base
                else None,
                "bytes_sent_per_rank_per_step": int(most[name][0]),
                "bytes_received_per_rank_per_step": int(most[name][1]),
                "model_bytes_per_rank_per_step": int(model["bytes_received"]),
                "bytes_source": traffic.source,
                "exchange_peak_bytes": int(m["peak_bytes"]) if "peak_bytes" in m else None,
                "model_exchange_bytes": int(model["memory_bytes"]),
            }
            if kind == "sharded":
                record["bytes_vs_allreduce"] = vs_allreduce(most[name], most[baseline])
            record.update({k: m[k] for k in ("wait_s", "aggregate_s") if k in m})
            if name.endswith("_digest"):  # the digest's cost: this median over its twin's without it
                twin = name.removesuffix("_digest")
                record["digest_cost"] = m["step_s"] / medians[twin]["step_s"] - 1
                record["digest_cost_per_round"] = per_round_cost(samples[name]["step_s"], samples[twin]["step_s"],
                                                                 args.steps)
                record["fingerprint_s"] = m["fingerprint_s"]  # what the digest adds on this rank, its share:
                record["fingerprint_share"] = m["fingerprint_s"] / m["step_s"]
                record["fingerprint_wait_s"] = m["fingerprint_wait_s"]  # the part the next step waited for
                record["digest_cpu_cost"] = m["cpu_s"] / medians[twin]["cpu_s"] - 1
                record["digest_cpu_cost_per_round"] = per_round_cost(samples[name]["cpu_s"], samples[twin]["cpu_s"],
                                                                     args.steps)
            records.append(record)
            print(json.dumps(record), flush=True)
        sharded = [r for r in records if r["exchange"] == "sharded"]
        if sharded:
            print(json.dumps({"bench": "step", "summary": {
                "ranks": size, "model": args.model, "device": args.device,
                "bytes_vs_allreduce": {r["variant"]: r["bytes_vs_allreduce"] for r in sharded},
                ratio: {r["variant"]: r[ratio] for r in sharded},
                "sharded_bytes_within_1_1x_allreduce": NOT_COUNTED if any(
                    r["bytes_vs_allreduce"] == NOT_COUNTED for r in sharded) else all(
                    r["bytes_vs_allreduce"] <= 1.1 for r in sharded),
                f"sharded_step_within_1_1x_{baseline.split('_')[0]}": all(r[ratio] <= 1.1 for r in sharded),
            }}), flush=True)
    return 0
