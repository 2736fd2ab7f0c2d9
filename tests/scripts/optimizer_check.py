"""Multi-rank checks of fa_hvd.DistributedOptimizer; rank 0 prints RESULT {json}.

python optimizer_check.py --transport horovod|mpi|torch CHECK [CHECK ...]
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fa_hvd
from fa_hvd.comm import get_transport
from fa_hvd.optimizer import checksum

from fa_hvd.aggregators import get as get_aggregator

# For 5 ranks, the last one Byzantine (it sends -10 times its gradient).
RULES = {
    "mean": {}, "median": {"f": 2}, "trimmed_mean": {"f": 2}, "krum": {"f": 1}, "multikrum": {"f": 1},
    "bulyan": {"f": 0}, "geomed": {"f": 2}, "cclip": {"f": 2, "tau": 0.05}, "mda": {"f": 2}, "nmean": {},
    "flag": {"f": 1, "r": 2}, "nnm+krum": {"f": 1}, "bucketing+median": {"f": 1, "s": 2},
}


def model_and_data(rank, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return model, x, y


def train(model, opt, x, y, steps=4, keep_grads=False):
    for _ in range(steps):
        if keep_grads:  # as a script that zeroes its gradients in place would
            model.zero_grad(set_to_none=False)
        else:
            opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def agree(transport, params):
    sums = transport.allgather_json(checksum(params), name="check.crc", schema=object)
    return all(s == sums[0] for s in sums)


def plain_average(model, inner, transport_name, process_set=None):
    """The transport's own averaging of the same model: Horovod's optimizer (op=Average), or
    DDP over ``process_set`` (a process group) under torch.distributed. Returns (model, optimizer)."""
    if transport_name == "torch":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, process_group=process_set), inner
    import horovod.torch as hvd

    hvd.init()  # a no-op under horovodrun; under plain mpirun Horovod joins the same MPI world
    kwargs = {} if process_set is None else {"process_set": process_set}
    return model, hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters(), **kwargs)


def check_mean_vs_horovod(transport, rank):
    """fa_hvd's mean against Horovod's average (DDP's under torch.distributed)."""
    model, x, y = model_and_data(rank)
    ours = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
                                       aggregator="mean", transport=transport)
    train(model, ours, x, y)
    theirs_model, _, _ = model_and_data(rank)
    theirs_model, theirs = plain_average(theirs_model, torch.optim.SGD(theirs_model.parameters(), lr=0.1),
                                         transport.name)
    train(theirs_model, theirs, x, y)
    diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), theirs_model.parameters()))
    moved = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), model_and_data(rank)[0].parameters()))
    return {"max_abs_diff": diff, "moved": moved, "kept_gradients": kept_gradients(transport, rank, x, y)}


def kept_gradients(transport, rank, x, y) -> dict:
    """Gradients zeroed in place (``model.zero_grad(set_to_none=False)``) against ``zero_grad()``, for each
    exchange with the mean and FA: {"exchange/rule": (buckets, all sent from the gradients' buffer, the same
    parameters bit for bit)}."""
    report = {}
    for exchange in ("allgather", "sharded"):
        for rule, params in (("mean", {}), ("flag", {"f": 1})):
            runs = []
            for keep in (False, True):
                model, _, _ = model_and_data(rank)
                opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), bucket_bytes=256,
                                                  named_parameters=model.named_parameters(), aggregator=rule,
                                                  aggregator_params=params, exchange=exchange, transport=transport)
                train(model, opt, x, y, keep_grads=keep)
                runs.append((model, opt))
            (fresh, _), (kept, opt) = runs
            report[f"{exchange}/{rule}"] = (len(opt._buckets), all(b.sends_shared() for b in opt._buckets),
                                            all(torch.equal(a, b) for a, b in zip(kept.parameters(), fresh.parameters())))
    return report


def check_rules(transport, rank):
    """Each rule through the optimizer against the same rule applied in this process to the
    gathered matrix of what every rank sent (gathered separately). The last rank is Byzantine."""
    byzantine = transport.size - 1

    def attack(flat, bucket, step):
        return -10 * flat if rank == byzantine else flat

    out = {}
    for name, params in RULES.items():
        model, x, y = model_and_data(rank)
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator=name,
                                          aggregator_params=params, transport=transport, gradient_transform=attack)
        ordered = [p for bucket in opt._buckets for p in bucket.params]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sent = attack(torch.cat([p.grad.reshape(-1) for p in ordered]), 0, 0)
        G = transport.allgather(sent.reshape(1, -1), name=f"check.rules.{name}")
        expected = get_aggregator(name, **params)(G)
        opt.synchronize()
        got = torch.cat([p.grad.reshape(-1) for p in ordered])
        with opt.skip_synchronize():
            opt.step()
        out[name] = {"rel_diff": float((got - expected).norm() / expected.norm()),
                     "vs_mean": float((expected - G.mean(0)).norm() / expected.norm()),
                     "agree": agree(transport, model.parameters())}
    return out


def check_features(transport, rank):
    out = {}
    # backward_passes_per_step=2 equals one pass on the summed loss of both halves.
    model, x, y = model_and_data(rank)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      backward_passes_per_step=2, transport=transport)
    opt.zero_grad()
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    F.cross_entropy(model(x[16:]), y[16:]).backward()
    opt.step()
    ref, _, _ = model_and_data(rank)
    ref_opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), aggregator="mean", transport=transport)
    ref_opt.zero_grad()
    (F.cross_entropy(ref(x[:16]), y[:16]) + F.cross_entropy(ref(x[16:]), y[16:])).backward()
    ref_opt.step()
    out["bpps2_diff"] = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), ref.parameters()))

    # fp16 compression (Horovod's Compression.fp16 when available, else an equivalent).
    if transport.name == "horovod":
        import horovod.torch as hvd
        compression = hvd.Compression.fp16
    else:
        class compression:
            compress = staticmethod(lambda t: (t.half(), t.dtype))
            decompress = staticmethod(lambda t, ctx: t.to(ctx))
    model, x, y = model_and_data(rank)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="flag",
                                      aggregator_params={"f": 1, "r": 2}, compression=compression, transport=transport)
    train(model, opt, x, y)
    out["fp16_agree"] = agree(transport, model.parameters())

    # A parameter that gets no gradient, and a frozen one.
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(8, 3), "unused": nn.Linear(8, 3), "frozen": nn.Linear(8, 8)})
    model["frozen"].requires_grad_(False)
    frozen_before = model["frozen"].weight.clone()
    unused_before = model["unused"].weight.clone()
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
                                      aggregator="median", aggregator_params={"f": 1}, transport=transport)
    _, x, y = model_and_data(rank)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model["used"](model["frozen"](x)), y).backward()
        opt.step()
    out["frozen_unchanged"] = bool(torch.equal(model["frozen"].weight, frozen_before))
    out["unused_unchanged"] = bool(torch.equal(model["unused"].weight, unused_before))
    out["unused_agree"] = agree(transport, model.parameters())

    # Two optimizers on one model, each over its own parameters.
    model, x, y = model_and_data(rank)
    first = fa_hvd.DistributedOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), aggregator="flag",
                                        aggregator_params={"f": 1, "r": 2}, transport=transport)
    second = fa_hvd.DistributedOptimizer(torch.optim.Adam(model[2].parameters(), lr=0.01), aggregator="median",
                                         aggregator_params={"f": 1}, transport=transport)
    for _ in range(3):
        first.zero_grad()
        second.zero_grad()
        F.cross_entropy(model(x), y).backward()
        first.step()
        second.step()
    out["two_optimizers_agree"] = agree(transport, model.parameters())

    # synchronize(), clipping, then step() under skip_synchronize().
    model, x, y = model_and_data(rank)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="flag",
                                      aggregator_params={"f": 1, "r": 2}, transport=transport)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with opt.skip_synchronize():
        opt.step()
    clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    out["clipped_norm"] = float(clipped)
    out["clip_agree"] = agree(transport, model.parameters())
    opt.zero_grad(set_to_none=False)
    out["zero_grad_keeps_tensors"] = all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    out["zero_grad_sets_none"] = all(p.grad is None for p in model.parameters())

    # bf16 parameters: gradients travel as fp32 (Horovod's allgather has no bf16).
    model, x, y = model_and_data(rank)
    model = model.to(torch.bfloat16)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="flag",
                                      aggregator_params={"f": 1, "r": 2}, transport=transport)
    train(model, opt, x.to(torch.bfloat16), y, steps=2)
    out["bf16_agree"] = agree(transport, model.parameters())
    out["bf16_dtype_kept"] = all(p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16 for p in model.parameters())

    # Optimizer state (incl. the aggregator's) round-trips.
    model, x, y = model_and_data(rank)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), aggregator="cclip",
                                      aggregator_params={"f": 1}, transport=transport)
    train(model, opt, x, y, steps=2)
    state = opt.state_dict()
    out["aggregator_state_saved"] = "fa_hvd_aggregator" in state
    opt.load_state_dict(state)
    return out


def check_mismatch(transport, rank):
    width = 17 if rank == 1 else 16
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 3))
    try:
        fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
                                    aggregator="mean", transport=transport)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def check_bad_world(transport, rank):
    model, _, _ = model_and_data(rank)
    try:
        fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="bulyan",
                                    aggregator_params={"f": 1}, transport=transport)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def twin_runs(rank, build, step_fn, steps, process_set=None, transport_name="horovod", **ours):
    """The same model and data trained with fa_hvd's mean and with the transport's own averaging
    (:func:`plain_average`); the largest parameter difference and how far training moved them."""
    models = []
    for wrap in ("fa_hvd", "plain"):
        model, inner = build()
        if wrap == "fa_hvd":
            kwargs = {} if process_set is None else {"process_set": process_set, "transport": transport_name}
            opt = fa_hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters(), aggregator="mean",
                                              **ours, **kwargs)
        else:
            model, opt = plain_average(model, inner, transport_name, process_set)
        for step in range(steps):
            step_fn(model, opt, step)
        models.append(model)
    start, _ = build()
    diff = max(float((a - b).abs().max()) for a, b in zip(models[0].parameters(), models[1].parameters()))
    moved = max(float((a - b).abs().max()) for a, b in zip(models[0].parameters(), start.parameters()))
    return {"max_abs_diff": diff, "moved": moved}


def check_unused_on_some_ranks(transport, rank):
    """Horovod's test_force_allreduce: rank 0 trains one head, the others another; the
    parameters a rank did not use still get the aggregate, as with Horovod."""
    def build():
        torch.manual_seed(0)
        model = nn.ModuleDict({"body": nn.Linear(8, 16), "head1": nn.Linear(16, 3), "head2": nn.Linear(16, 3)})
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    _, x, y = model_and_data(rank)

    def step(model, opt, _):
        opt.zero_grad()
        hidden = torch.tanh(model["body"](x))
        F.cross_entropy(model["head1" if rank == 0 else "head2"](hidden), y).backward()
        opt.step()

    return twin_runs(rank, build, step, steps=3, transport=transport)


def check_sparse_vs_horovod(transport, rank):
    """Horovod's test_sparse_embeddings, compared: SparseAdam on nn.Embedding(sparse=True),
    with and without sparse_as_dense, different tokens per rank."""
    out = {}
    for sparse_as_dense in (False, True):
        def build():
            torch.manual_seed(0)
            model = nn.Embedding(10, 3, sparse=True)
            return model, torch.optim.SparseAdam(list(model.parameters()), lr=0.1)

        tokens = torch.tensor([[1, 2, 4, 5], [4, 3, 2, 9]]) if rank == 0 else torch.tensor([[1, 3, 4], [4, 7, 9]])

        def step(model, opt, _):
            opt.zero_grad()
            model(tokens).sum().backward()
            opt.step()

        import horovod.torch as hvd

        hvd.init()
        out[str(sparse_as_dense)] = twin_runs(rank, build, step, steps=2, transport=transport,
                                              sparse_as_dense=sparse_as_dense)
    return out


def check_zero_step(transport, rank):
    """Horovod's broadcast_optimizer_state (what unchanged scripts call) initialises the
    state with a zero step: no exchange, no step counted, no fault step used."""
    import horovod.torch as hvd

    hvd.init()
    seen = []

    def record(flat, bucket, step):
        seen.append(step)
        return flat

    model, x, y = model_and_data(rank)
    opt = fa_hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), aggregator="mean",
                                      transport=transport, gradient_transform=record)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    fa_hvd.broadcast_optimizer_state(opt, root_rank=0)
    train(model, opt, x, y, steps=2)
    return {"steps_seen": sorted(set(seen)), "calls_per_step": len(seen) // 2, "buckets": len(opt._buckets),
            "step_count": opt.step_count}


def check_process_sets(transport, rank):
    """Process sets {even ranks} and {odd ranks} (process groups under torch.distributed), each
    aggregating only its own: fa_hvd's mean against the transport's own averaging over the same
    set. The mpi4py transport has no process sets: there, passing one is refused."""
    if transport.name == "mpi":
        model, _, _ = model_and_data(rank)
        try:
            fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                        transport=transport, process_set=object())
        except ValueError as exc:
            return {"refused": str(exc)}
        return {"refused": None}
    if transport.name == "torch":
        import torch.distributed as dist

        evens, odds = (dist.new_group(list(range(start, transport.size, 2))) for start in (0, 1))
    else:
        import horovod.torch as hvd

        evens = hvd.add_process_set(list(range(0, transport.size, 2)))
        odds = hvd.add_process_set(list(range(1, transport.size, 2)))
    mine = evens if rank % 2 == 0 else odds
    _, x, y = model_and_data(rank)

    def build():
        model, _, _ = model_and_data(0)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def step(model, opt, _):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    out = twin_runs(rank, build, step, steps=3, process_set=mine, transport_name=transport.name)
    model, opt = build()
    opt = fa_hvd.DistributedOptimizer(opt, aggregator="median", process_set=mine, transport=transport.name)
    for i in range(3):
        step(model, opt, i)
    sums = transport.allgather_json(checksum(model.parameters()), name="check.ps", schema=object)
    out.update(same_within=all(sums[r] == sums[rank % 2] for r in range(rank % 2, transport.size, 2)),
               differ_across=sums[0] != sums[1], set_size=opt.transport.size)
    out = {k: transport.allgather_json(v, name=f"check.ps.{k}", schema=object) for k, v in out.items()}
    if transport.name == "horovod":
        hvd.remove_process_set(odds)
        hvd.remove_process_set(evens)
    return out


def check_process_set_sizes(transport, rank):
    """hvd.add_process_set([0..k-1]) for every k (singletons included), all ranks wrapping
    with it as Horovod's test_optimizer_process_sets does: ranks inside aggregate over the
    set, ranks outside step on their own gradients. fa_hvd's mean against Horovod's
    optimizer, on every rank."""
    import horovod.torch as hvd

    _, x, y = model_and_data(rank)

    def build():
        model, _, _ = model_and_data(0)
        return model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.1)

    def step(model, opt, _):
        opt.zero_grad()
        F.mse_loss(model(x), F.one_hot(y, 3).float()).backward()
        opt.step()

    out = {}
    for k in range(1, transport.size + 1):
        process_set = hvd.add_process_set(list(range(k))) if k < transport.size else hvd.global_process_set
        result = twin_runs(rank, build, step, steps=2, process_set=process_set)
        out[str(k)] = transport.allgather_json(result, name=f"check.sizes.{k}", schema=object)
        if k < transport.size:
            hvd.remove_process_set(process_set)
    return out


def check_slow_peer(transport, rank):
    """Rank 1 is busy for 1.5 s before it sends: every rank waits for it and reads its whole row."""
    if rank == 1:
        time.sleep(1.5)
    G = transport.allgather(torch.full((1, 4096), float(rank + 1)), name="check.slow_peer")
    expected = torch.arange(1, transport.size + 1, dtype=torch.float32)[:, None].expand(-1, 4096)
    return {"complete": all(transport.allgather_json(bool(torch.equal(G, expected)), name="check.slow_peer.ok", schema=object))}


def check_broadcast_state(transport, rank):
    """Resume as Horovod scripts do: rank 0 loads the checkpoint, then broadcast. The cclip
    centre (aggregator state; tau small enough that clipping bites) must reach every rank:
    fa_hvd.broadcast_optimizer_state, and (over Horovod) elastic's TorchState.sync, carry it;
    Horovod's own function does not."""
    model, x, y = model_and_data(rank)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), aggregator="cclip",
                                      aggregator_params={"f": 1, "tau": 0.01}, transport=transport)
    train(model, opt, x, y, steps=2)
    checkpoint = (model.state_dict(), opt.state_dict())

    def resumed(broadcast):
        fresh, _, _ = model_and_data(rank)
        fresh_opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9),
                                                aggregator="cclip", aggregator_params={"f": 1, "tau": 0.01}, transport=transport)
        if rank == 0:
            fresh.load_state_dict(checkpoint[0])
            fresh_opt.load_state_dict(checkpoint[1])
        for name, tensor in sorted(fresh.state_dict().items()):
            transport.broadcast_(tensor, 0, name=f"check.bcast.{broadcast}.{name}")
        if broadcast == "fa_hvd":
            fa_hvd.broadcast_optimizer_state(fresh_opt, root_rank=0)
        elif broadcast == "torchstate":
            import horovod.torch as hvd

            hvd.elastic.TorchState(model=fresh, optimizer=fresh_opt).sync()
        else:
            import horovod.torch as hvd

            hvd.broadcast_optimizer_state(fresh_opt, root_rank=0)
        centre = fresh_opt.aggregator.state_dict().get("center")
        centre_crc = None if centre is None else checksum([centre])
        train(fresh, fresh_opt, x, y, steps=1)
        return {"centres_agree": len(set(transport.allgather_json(centre_crc, name=f"check.c.{broadcast}", schema=object))) == 1,
                "params_agree": agree(transport, fresh.parameters())}

    out = {"fa_hvd": resumed("fa_hvd")}
    if transport.name == "horovod":
        out["torchstate"] = resumed("torchstate")
        out["horovods_own"] = resumed("horovod")
    return out


def check_gather_state(transport, rank):
    """A checkpoint's per-rank state gathered to rank 2 in rows 7 bytes wide (states of different lengths
    cross them): what rank 2 read back, and what every other rank holds (None)."""
    from fa_hvd.comm import base

    width, base.GATHER_ROW_BYTES = base.GATHER_ROW_BYTES, 7
    try:
        states = transport.gather_state({"w": torch.arange(10 * rank + 3, dtype=torch.float32), "rank": rank}, 2,
                                        name="check.gather")
    finally:
        base.GATHER_ROW_BYTES = width
    whole = None if states is None else (
        [s["rank"] for s in states] == list(range(transport.size))
        and all(torch.equal(s["w"], torch.arange(10 * r + 3, dtype=torch.float32)) for r, s in enumerate(states)))
    return {"held": transport.allgather_json([states is not None, whole], name="check.gather.held", schema=object)}


def check_object_bound(transport, rank):
    """torch.distributed: rank 1 announces a 1 TiB object message; every rank refuses it, naming rank 1,
    before allocating anything for it."""
    from fa_hvd.comm.torchdist import TorchDistTransport

    class Announcer(TorchDistTransport):
        def allgather(self, tensor, name):
            if name.endswith(".lengths") and self.rank == 1:
                tensor = torch.tensor([[1 << 40]])
            return super().allgather(tensor, name)

    try:
        Announcer().allgather_json({"ok": True}, name="check.bound", schema=object)
    except ValueError as exc:
        error = str(exc)
    else:
        error = None
    return {"errors": transport.allgather_json(error, name="check.bound.errors", schema=object)}


CHECKS = {"object_bound": check_object_bound, "gather_state": check_gather_state,
          "mean_vs_horovod": check_mean_vs_horovod, "rules": check_rules, "features": check_features,
          "mismatch": check_mismatch, "bad_world": check_bad_world,
          "process_sets": check_process_sets, "slow_peer": check_slow_peer,
          "broadcast_state": check_broadcast_state, "unused_on_some_ranks": check_unused_on_some_ranks,
          "sparse_vs_horovod": check_sparse_vs_horovod, "zero_step": check_zero_step,
          "process_set_sizes": check_process_set_sizes}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", default="horovod")
    parser.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = parser.parse_args()
    if {"process_sets", "process_set_sizes"} & set(args.checks) and args.transport == "horovod":
        import horovod.torch as hvd

        hvd.init(process_sets="dynamic")
    transport = get_transport(args.transport)
    report = {name: CHECKS[name](transport, transport.rank) for name in args.checks}
    if transport.rank == 0:
        print("RESULT " + json.dumps(report), flush=True)
    sys.exit(0)
