"""Multi-rank checks of the exchanges on a real transport; rank 0 prints RESULT {json}.

python exchange_check.py --transport horovod|mpi

* alltoall: uneven splits (zeros included) arrive in rank order; an allgather into a buffer the
  caller passes (``out``) fills that buffer.
* gram_bits: the summed partial Grams have the same bits on every rank.
* rules: the sharded exchange on seeded gradients with faulty rows (NaN in one coordinate,
  ALIE) against the rule applied in one process to the whole matrix, and the ranks' bits.
* optimizer: fa_hvd.DistributedOptimizer trained with exchange="sharded" and "allgather"
  (buckets started as backward makes them, a Byzantine rank): the same parameters.
* early: the coordinate-wise rules gather each bucket's shards of the aggregate as its alltoall
  arrives (on the worker thread where the transport allows it): the bits of the same exchange
  with the shards combined after the last bucket, every row finite or one NaN (dropped).
* compression: fp16 on the wire both ways, against the rule on fp16-rounded gradients.
* replicas: replicas=2 gives the plain sharded result; a rank that miscomputes is named
  by every rank alike.
* kernels: rank 1 runs with FA_HVD_NATIVE=0, the others with the compiled kernels on (whose Gram
  differs from the torch path's in the last bits, shown on one matrix): the optimizer's start-up
  agreement turns them off everywhere, and FA trains to the same bits on every rank.
* bytes: what the kernel counted on this process's TCP sockets for one exchange of
  n fp32 values: the transport's allreduce (Horovod's, or MPI_Allreduce), the sharded
  exchange and an allgather of the gradient (what allgather mode sends), median of 3.
"""
import argparse
import json
import statistics
import zlib

import torch

from fa_hvd.aggregators import get
from fa_hvd.comm import get_transport
from fa_hvd.exchange import ShardedExchange, ShardMismatch
from fa_hvd.exchange import sharded as sharded_module

SIZES = [301, 77, 1000]
sharded_module.MIN_GATHER_PIECE = 16  # pieces at these sizes too, where the transport gathers in pieces
RULES = {"mean": {}, "median": {"f": 1}, "trimmed_mean": {"f": 1}, "krum": {"f": 0}, "geomed": {"f": 1},
         "cclip": {"f": 1}, "nmean": {}, "flag": {"f": 1, "r": 2}, "nnm+multikrum": {"f": 0}, "bulyan": {"f": 0}}


def gradients(p, n, fault, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, generator=gen) + 0.3 * torch.randn(p, n, generator=gen)
    if fault == "nan":
        G[p - 1, 350] = float("nan")  # one coordinate: one rank's shard sees it
    elif fault == "alie":
        good = G[:-1]
        G[-1] = good.mean(0) - 1.5 * good.std(0)
    return G


def step(exchange, row, sizes=SIZES):
    """One step, buckets started last first (as backward makes them)."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for index in reversed(range(len(sizes))):
        exchange.start(index, row[offsets[index] : offsets[index] + sizes[index]].clone())
    return exchange.finish(len(sizes), row.device, 0)


def crc(t):
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())


def check_alltoall(transport, rank):
    p = transport.size
    splits = [(rank + q) % 3 for q in range(p)]  # some zeros
    rows = torch.cat([torch.full((s, 2), 10.0 * rank + q) for q, s in enumerate(splits)])
    got = transport.wait(transport.alltoall_async(rows, splits, name="check.a2a"))
    expected = torch.cat([torch.full(((source + rank) % 3, 2), 10.0 * source + rank) for source in range(p)])
    out = torch.full((p, 5), float("nan"))  # allgather into a caller's buffer (kept across steps by the exchanges)
    gathered = [transport.allgather(torch.arange(5.0).reshape(1, 5) + 100 * rank + step, name="check.out", out=out)
                for step in range(2)]
    into = all(torch.equal(g, torch.arange(5.0) + 100 * torch.arange(float(p)).reshape(p, 1) + 1) and
               g.data_ptr() == out.data_ptr() for g in gathered[1:])
    return {"ok": transport.allgather_json(torch.equal(got, expected), name="check.a2a.ok", schema=object),
            "into_out": transport.allgather_json(into, name="check.out.ok", schema=object)}


class GramSpy(ShardedExchange):
    """Keeps the summed Gram of its last step."""

    def _gram(self, *args):
        K, rows, evidence = super()._gram(*args)
        self.last_gram = K
        return K, rows, evidence


def check_gram_bits(transport, rank):
    """The summed Gram on every rank: the same bits, and its distance to the Gram of the whole matrix."""
    from fa_hvd.aggregators.geometry import gram

    p, n = transport.size, sum(SIZES)
    G = gradients(p, n, "alie")
    spy = GramSpy(transport, get("flag", f=1, r=2), prefix="check.grambits")
    step(spy, G[rank])
    crcs = transport.allgather_json(crc(spy.last_gram), name="check.grambits.crc", schema=object)
    error = float(((spy.last_gram - gram(G)).abs() / gram(G).abs().max()).max())
    return {"ranks_agree": all(c == crcs[0] for c in crcs), "rel_error": error, "n": n}


def check_rules(transport, rank):
    p, n = transport.size, sum(SIZES)
    report = {}
    for fault in ("nan", "alie"):
        G = gradients(p, n, fault)
        for name, params in RULES.items():
            if name == "bulyan" and p < 3:
                continue
            exchange = ShardedExchange(transport, get(name, **params), prefix=f"check.{fault}.{name}")
            out = step(exchange, G[rank])
            expected = get(name, **params)(G)
            finite = expected.isfinite()
            diff = float((out[finite] - expected[finite]).abs().max() / expected[finite].abs().max())
            same_nan = bool(torch.equal(out.isfinite(), finite))
            crcs = transport.allgather_json(crc(out), name=f"check.{fault}.{name}.crc", schema=object)
            report[f"{name}/{fault}"] = {"rel_diff": diff, "same_non_finite": same_nan,
                                         "ranks_agree": all(c == crcs[0] for c in crcs)}
    return report


def check_early(transport, rank):
    from fa_hvd.exchange import sharded

    p, n = transport.size, sum(SIZES)
    report = {}
    for fault in ("clean", "nan"):
        G = gradients(p, n, fault)
        for name in ("mean", "median", "trimmed_mean"):
            outs, threaded = [], []
            for early in (True, False):
                exchange = ShardedExchange(transport, get(name, **RULES[name]),
                                           prefix=f"check.early.{fault}.{name}.{early}")
                transport.prepare(exchange.channels())  # as the optimizer and the DDP hook do
                chosen = sharded._early
                sharded._early = chosen if early else (lambda aggregator, replicas: False)
                try:
                    outs.append(step(exchange, G[rank]))
                finally:
                    sharded._early = chosen
                threaded.append(exchange._worker is not None)
            same = outs[0].view(torch.uint8).equal(outs[1].view(torch.uint8))
            everyone = transport.allgather_json([same, threaded[0]], name=f"check.early.{fault}.{name}", schema=object)
            report[f"{name}/{fault}"] = {"bits_equal": [e[0] for e in everyone], "threaded": [e[1] for e in everyone]}
    return report


class Fp16:
    """Horovod's Compression.fp16, for either transport."""

    @staticmethod
    def compress(tensor):
        return tensor.half(), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx)


def check_compression(transport, rank):
    """fp16 on both collectives: geomed of the fp16-rounded gradients, its result rounded to fp16."""
    p, n = transport.size, sum(SIZES)
    G = gradients(p, n, "alie")
    out = step(ShardedExchange(transport, get("geomed", f=1), compression=Fp16, prefix="check.fp16"), G[rank])
    expected = get("geomed", f=1)(G.half().float()).half().float()
    return {"max_abs_diff": float((out - expected).abs().max()), "dtype": str(out.dtype)}


def check_optimizer(transport, rank, steps=3):
    """fa_hvd.DistributedOptimizer with exchange="sharded" vs "allgather": a small model, several buckets
    started as backward makes them, rank 1 sending -50 g; parameters after the steps and ranks' bits."""
    import torch.nn.functional as F
    from torch import nn

    import fa_hvd
    from fa_hvd.optimizer import checksum

    results = {}
    for exchange in ("allgather", "sharded"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        attack = (lambda flat, index, step: -50 * flat) if rank == 1 else None
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                          named_parameters=model.named_parameters(), aggregator="median",
                                          aggregator_params={"f": 1}, transport=transport, exchange=exchange,
                                          bucket_bytes=400, gradient_transform=attack)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        results[exchange] = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
        crcs = transport.allgather_json(checksum(model.parameters()), name=f"check.opt.{exchange}", schema=object)
        results[f"{exchange}_agree"] = all(c == crcs[0] for c in crcs)
        results[f"{exchange}_buckets"] = len(opt._buckets)
    return {"max_abs_diff": float((results["sharded"] - results["allgather"]).abs().max()),
            "moved": float(results["sharded"].abs().max()),
            **{k: v for k, v in results.items() if not isinstance(v, torch.Tensor)}}


class LyingGram(ShardedExchange):
    def _gram(self, work, *args):
        if self.rank == 1:
            work.partial.K[0][0, 0] += 1.0
        return super()._gram(work, *args)


def check_replicas(transport, rank):
    p, n = transport.size, sum(SIZES)
    G = gradients(p, n, "nan")
    plain = step(ShardedExchange(transport, get("krum", f=0), prefix="check.k1"), G[rank])
    doubled = step(ShardedExchange(transport, get("krum", f=0), prefix="check.k2", replicas=2), G[rank])
    try:
        step(LyingGram(transport, get("krum", f=0), prefix="check.lie", replicas=2), G[rank])
        error = None
    except ShardMismatch as exc:
        error = str(exc)
    errors = transport.allgather_json(error, name="check.lie.errors", schema=object)
    return {"same_as_plain": bool(torch.equal(plain, doubled)), "errors": errors}


def check_bytes(transport, rank, n=1 << 20, repeats=3):
    """Per-rank TCP bytes (sent, received) of one exchange of n fp32 values, median over repeats."""
    row = torch.randn(n, generator=torch.Generator().manual_seed(rank))
    sizes = [n // 4, n - n // 4]
    sharded = ShardedExchange(transport, get("mean"), prefix="bytes.sharded")
    runs = {
        "allreduce": lambda: transport.allreduce_sum(row, name="bytes.allreduce"),
        "sharded": lambda: step(sharded, row, sizes),
        "allgather": lambda: transport.allgather(row.reshape(1, -1), name="bytes.allgather"),
    }
    traffic = transport.traffic
    out = {}
    for name, run in runs.items():
        run()  # warm-up: connections, Horovod's response cache
        samples = []
        for i in range(repeats):
            # Snapshots outside barriers: no peer's bytes for this run arrive before the first,
            # and every byte of it has arrived everywhere before the second (the barriers add ~100 B).
            before = traffic.totals()
            transport.allreduce_sum(torch.zeros(1), name=f"bytes.barrier.{name}.{i}")
            run()
            transport.allreduce_sum(torch.zeros(1), name=f"bytes.barrier2.{name}.{i}")
            after = traffic.totals()
            samples.append((after[0] - before[0], after[1] - before[1]))
        out[name] = [int(statistics.median(s[k] for s in samples)) for k in (0, 1)]
    return {"n": n, "per_rank": transport.allgather_json(out, name="bytes.report", schema=object), "source": traffic.source}


def check_kernels(transport, rank, steps=3):
    import os

    import torch.nn.functional as F
    from torch import nn

    import fa_hvd
    from fa_hvd.aggregators import geometry, native
    from fa_hvd.optimizer import checksum

    G = gradients(4, 4096, "clean", seed=3)
    native.agree([True])  # forget the earlier checks' agreement (the launch's FA_HVD_NATIVE): this process alone
    os.environ["FA_HVD_NATIVE"] = "1"
    compiled = geometry.gram(G)
    os.environ["FA_HVD_NATIVE"] = "0"
    paths_differ = not torch.equal(compiled, geometry.gram(G))
    os.environ["FA_HVD_NATIVE"] = "0" if rank == 1 else "1"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 10))
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      named_parameters=model.named_parameters(), aggregator="flag",
                                      aggregator_params={"f": 1}, transport=transport)
    enabled = native.enabled()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    crcs = transport.allgather_json(checksum(model.parameters()), name="check.kernels", schema=int)
    flags = transport.allgather_json([paths_differ, enabled], name="check.kernels.flags", schema=(bool, bool))
    return {"paths_differ": [d for d, _ in flags], "compiled_on": [e for _, e in flags],
            "ranks_agree": all(c == crcs[0] for c in crcs)}


CHECKS = {"alltoall": check_alltoall, "rules": check_rules, "gram_bits": check_gram_bits, "early": check_early,
          "compression": check_compression,
          "optimizer": check_optimizer, "replicas": check_replicas, "bytes": check_bytes, "kernels": check_kernels}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", default="horovod")
    parser.add_argument("checks", nargs="*", default=sorted(CHECKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    transport = get_transport(args.transport)
    report = {name: CHECKS[name](transport, transport.rank) for name in args.checks}
    if transport.rank == 0:
        print("RESULT " + json.dumps(report), flush=True)
