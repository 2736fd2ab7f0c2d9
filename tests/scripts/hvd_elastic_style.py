"""A Horovod elastic script in the style of Horovod's examples/elastic/pytorch: plain Horovod, no fa_hvd.

python hvd_elastic_style.py --batches N --pid-dir DIR [--slow-host HOST]

Each worker writes ``DIR/<host>.<pid>`` (its host as horovodrun names it) and then,
every batch, ``DIR/progress.<host>`` with the batch it reached, so a test can kill the
worker on one host mid-run. The worker on ``--slow-host`` works ``--delay`` seconds
longer before its backward pass, so the others spend that time waiting in the
gradient exchange: a kill lands there. At the end rank 0 prints ``RESULT {json}``.
"""
import argparse
import json
import os
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--batches", type=int, default=60)
parser.add_argument("--pid-dir", required=True)
parser.add_argument("--slow-host", default=None)
parser.add_argument("--delay", type=float, default=0.05, help="extra seconds per batch on --slow-host")
args = parser.parse_args()

hvd.init()
torch.set_num_threads(1)
host = os.environ.get("HOROVOD_HOSTNAME", "unknown")
open(os.path.join(args.pid_dir, f"{host}.{os.getpid()}"), "w").close()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
sizes = []


@hvd.elastic.run
def train(state):
    while state.batch < args.batches:
        gen = torch.Generator().manual_seed(1000 * state.batch + hvd.rank())
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if host == args.slow_host:
            time.sleep(args.delay)
        loss.backward()
        optimizer.step()
        state.batch += 1
        sizes.append(hvd.size())
        state.commit()
        with open(os.path.join(args.pid_dir, f"progress.{host}"), "w") as f:
            f.write(str(state.batch))


state = hvd.elastic.TorchState(model=model, optimizer=optimizer, batch=0)
train(state)
if hvd.rank() == 0:
    print("RESULT " + json.dumps({
        "batches": state.batch, "final_size": hvd.size(), "sizes_seen": sorted(set(sizes)),
        "optimizer": type(optimizer).__module__,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }), flush=True)
