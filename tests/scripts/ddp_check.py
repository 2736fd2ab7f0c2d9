"""fa_hvd.ddp's hook against plain DDP on a real torchrun job (4 ranks, Gloo); rank 0 prints RESULT {json}.

torchrun --nproc-per-node 4 --no-python python ddp_check.py mean byzantine momentum

* mean: DDP with the hook and aggregator="mean" against plain DDP, k steps, with both exchanges:
  over pairs of ranks (process groups {0, 1} and {2, 3}) in every DDP mode (plain, static_graph,
  find_unused_parameters, no_sync accumulation, gradient_as_bucket_view, bf16 parameters, bf16
  autocast), and over the
  whole world (4 ranks) plain and bf16: the largest parameter difference, whether the bits are
  equal, and how far the parameters moved.
* momentum: over the whole world, plain DDP with SGD momentum 0.9 against the hook with "mean",
  worker_momentum=0.9 and SGD without momentum (the same SGD, up to rounding), several buckets,
  which DDP rebuilds after the first step, both exchanges (the sharded one with Nesterov's momentum).
* byzantine: rank 3 sends -8 times its gradient every step: plain DDP (the same lie through
  an allreduce hook) against the hook with flag (f = 1), both exchanges; the loss at the start and
  the end, and whether the ranks hold the same bits.
"""
import argparse
import json
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import fa_hvd.ddp
from fa_hvd.exchange import sharded as sharded_module

STEPS = 4
sharded_module.MIN_GATHER_PIECE = 16  # the aggregate gathered in pieces at this model's size too (torch.distributed)


class Net(nn.Module):
    def __init__(self, unused=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 3)
        self.spare = nn.Linear(64, 3) if unused else None  # never used: find_unused_parameters

    def forward(self, x):
        return self.head(self.body(x))


def data(rank, n=32):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 10, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def crc(model):
    value = 0
    for p in model.parameters():
        value = zlib.crc32(p.detach().contiguous().view(torch.uint8).numpy().tobytes(), value)
    return value


def flat_parameters(model):
    """``model``'s parameters as one fp32 vector."""
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def initial_parameters():
    """Every run's parameters before training (train() seeds the model the same way), flattened."""
    torch.manual_seed(0)
    return flat_parameters(Net())


def train(mode, group, hook_state, rank, steps=STEPS, momentum=0.9, nesterov=False):
    torch.manual_seed(0)
    model = Net(unused=mode == "unused")
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    kwargs = {"static_graph": True} if mode == "static_graph" else {}
    if mode == "unused":
        kwargs["find_unused_parameters"] = True
    if mode == "bucket_view":  # the gradients are views of DDP's bucket buffers
        kwargs["gradient_as_bucket_view"] = True
    ddp = DDP(model, process_group=group, bucket_cap_mb=0.01, **kwargs)  # several buckets
    if hook_state is not None:
        ddp.register_comm_hook(hook_state, fa_hvd.ddp.robust_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov and momentum > 0)
    x, y = data(rank)
    if mode == "bf16":
        x = x.to(torch.bfloat16)
    for _ in range(steps):
        opt.zero_grad()
        if mode == "no_sync":  # gradient accumulation: two micro-batches, one exchange
            with ddp.no_sync():
                F.cross_entropy(ddp(x[:16]), y[:16]).backward()
            F.cross_entropy(ddp(x[16:]), y[16:]).backward()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                loss = F.cross_entropy(ddp(x), y)
            loss.backward()
        opt.step()
    return model


def check_mean(rank, size):
    pair = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    start = initial_parameters()
    out = {}
    modes = {"world": ("plain", "bf16"), "pair": ("plain", "static_graph", "unused", "no_sync", "bucket_view", "bf16",
                                                 "autocast")}
    for where, group in (("world", None), ("pair", pair)):
        for mode in modes[where]:
            for exchange in ("allgather", "sharded"):
                plain = train(mode, group, None, rank)
                ours = train(mode, group, fa_hvd.ddp.RobustHookState("mean", process_group=group, exchange=exchange),
                             rank)
                a, b = flat_parameters(plain), flat_parameters(ours)
                out[f"{where}/{mode}/{exchange}"] = {
                    "max_abs_diff": float((a - b).abs().max()), "bits_equal": crc(plain) == crc(ours),
                    "moved": float((b[: start.numel()] - start).abs().max())}
    return out


def check_momentum(rank, size):
    start, out = initial_parameters(), {}
    for exchange, nesterov in (("allgather", False), ("sharded", True)):
        plain = train("plain", None, None, rank, nesterov=nesterov)
        state = fa_hvd.ddp.RobustHookState("mean", exchange=exchange, worker_momentum=0.9, worker_nesterov=nesterov)
        ours = train("plain", None, state, rank, momentum=0.0)
        a, b = flat_parameters(plain), flat_parameters(ours)
        out[exchange] = {"max_abs_diff": float((a - b).abs().max()), "moved": float((b - start).abs().max()),
                         "buffers": len(state.worker_momentum.buffers), "nesterov": state.worker_momentum.nesterov}
    return out


def check_byzantine(rank, size, steps=40):
    liar = size - 1
    x, y = data(rank, 64)
    eval_x, eval_y = data(1000, 512)

    def attack(flat, index, step):
        return -8 * flat if rank == liar else flat

    def lying_allreduce(_, bucket):  # plain DDP's allreduce of what each rank sends
        bucket.buffer().copy_(attack(bucket.buffer(), bucket.index(), 0))
        return default_hooks.allreduce_hook(None, bucket)

    out = {}
    for name in ("ddp", "flag/allgather", "flag/sharded"):
        torch.manual_seed(0)
        model = DDP(Net(), bucket_cap_mb=0.01)
        if name == "ddp":
            model.register_comm_hook(None, lying_allreduce)
        else:
            fa_hvd.ddp.wrap(model, aggregator="flag", f=1, exchange=name.split("/")[1], gradient_transform=attack)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with torch.no_grad():
            first = float(F.cross_entropy(model.module(eval_x), eval_y))
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            last = float(F.cross_entropy(model.module(eval_x), eval_y))
        crcs = [None] * size
        dist.all_gather_object(crcs, crc(model.module))  # test-side check only: every rank is this test's
        out[name] = {"first_loss": first, "last_loss": last, "ranks_agree": len(set(crcs)) == 1}
    return out


CHECKS = {"mean": check_mean, "byzantine": check_byzantine, "momentum": check_momentum}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    report = {name: CHECKS[name](rank, size) for name in args.checks}
    if rank == 0:
        print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()
