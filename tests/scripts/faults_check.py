"""Multi-rank fault checks on the gathered matrix; rank 0 prints RESULT {json}.

python faults_check.py [--transport horovod|torch] sent|finite|slow
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

import fa_hvd
from fa_hvd.comm import get_transport
from fa_hvd.faults import FaultInjector, alie_z, parse_faults

KINDS = ["gaussian", "uniform", "signflip", "reverse", "zero", "nan", "inf", "bitflip", "alie", "ipm", "mimic"]


def setup(rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(10 + rank)
    return model, torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def local_gradient(model, x, y):
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in reversed(grads)])  # bucket order: reversed parameters


def check_sent(transport, rank):
    out = {}
    for kind in KINDS:
        model, x, y = setup(rank)
        honest = transport.allgather(local_gradient(model, x, y).reshape(1, -1), name=f"honest.{kind}")
        params = {"rate": 0.2} if kind == "bitflip" else {}
        specs = parse_faults([{"kind": kind, "ranks": [1], "params": params}], transport.size, f=1)
        injector = FaultInjector(specs, rank, transport.size, seed=0, transport=transport)
        captured = []

        def capture(G):
            captured.append(G.clone())
            return torch.zeros(G.shape[1], dtype=G.dtype)

        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator=capture,
                                          transport=transport, gradient_transform=injector.gradient_transform)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        G, H = captured[0], honest
        others = [0, 2, 3]
        sent, mine = G[1], H[1]
        mu, sigma = H[others].mean(0), H[others].std(0)
        expected = {
            "signflip": -mine, "reverse": -100 * mine, "zero": torch.zeros_like(mine),
            "alie": mu + alie_z(4, 1) * sigma, "ipm": -0.1 * mu, "mimic": H[0],
        }.get(kind)
        out[kind] = {
            "others_untouched": bool(torch.equal(G[others], H[others])),
            "changed": not bool(torch.equal(sent, mine)),
            "matches_formula": None if expected is None else bool(torch.allclose(sent, expected, rtol=1e-5, atol=1e-7)),
            "all_nan": bool(sent.isnan().all()), "all_posinf": bool((sent == float("inf")).all()),
            "in_unit_interval": bool(((sent >= 0) & (sent < 1)).all()),
            "changed_fraction": float((sent != mine).float().mean()),
            "counted": injector.counts.get(kind, 0) if rank == 1 else None,
        }
        out[kind]["counted"] = transport.allgather_json(out[kind]["counted"], name=f"count.{kind}", schema=object)[1]
    return out


def check_finite(transport, rank):
    out = {}
    for kind in ("nan", "inf"):
        for rule, params in {"mean": {}, "median": {"f": 1}, "trimmed_mean": {"f": 1}, "flag": {"f": 1, "r": 2},
                             "geomed": {"f": 1}, "nmean": {}, "cclip": {"f": 1}}.items():
            model, x, y = setup(rank)
            specs = parse_faults([{"kind": kind, "ranks": [2]}], transport.size, f=params.get("f", 1))
            injector = FaultInjector(specs, rank, transport.size, seed=0, transport=transport)
            opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator=rule,
                                              aggregator_params=params, transport=transport,
                                              gradient_transform=injector.gradient_transform)
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            out[f"{kind}/{rule}"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return out


SLOW_DELAY_S = 0.5  # rank 1's sleep per slow step: far above a normal step's time on a loaded machine


def check_slow(transport, rank):
    """Rank 0's step times: the median of steps 1-5, and the second-fastest of the slow steps 6-9."""
    model, x, y = setup(rank)
    specs = parse_faults([{"kind": "slow", "ranks": [1], "start_step": 6, "stop_step": 10,
                           "params": {"delay": SLOW_DELAY_S}}], transport.size, f=1)
    injector = FaultInjector(specs, rank, transport.size, seed=0, transport=transport)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="median",
                                      aggregator_params={"f": 1}, transport=transport,
                                      gradient_transform=injector.gradient_transform)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    before, during = sorted(times[1:6])[2], sorted(times[6:10])[1]
    return {"before_s": before, "during_s": during, "delay_s": SLOW_DELAY_S}


CHECKS = {"sent": check_sent, "finite": check_finite, "slow": check_slow}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", default="horovod")
    parser.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = parser.parse_args()
    transport = get_transport(args.transport)
    report = {name: CHECKS[name](transport, transport.rank) for name in args.checks}
    if transport.rank == 0:
        print("RESULT " + json.dumps(report), flush=True)
