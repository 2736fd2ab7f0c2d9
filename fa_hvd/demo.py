"""The demo job: data-parallel training with robust aggregation under horovodrun.

Every rank trains a small model on its shard of the data set; gradients are
all-gathered and aggregated by ``fa_hvd.DistributedOptimizer`` (FA by default).
Rank 0 reports loss and test accuracy per epoch; at the end every rank's
parameters are checksummed and compared. Run with::

    horovodrun -np 4 -H localhost:4 fa-hvd-demo --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fa_hvd
from fa_hvd import config as cfg
from fa_hvd.aggregators import get as get_aggregator
from fa_hvd.comm import TRANSPORTS, get_transport
from fa_hvd.faults import FaultInjector, parse_faults, poison_for_rank
from fa_hvd.optimizer import checksum
from fa_hvd.train import data as datasets
from fa_hvd.train import models


@dataclass
class DemoConfig:
    data: Literal["digits", "dir"] = "digits"
    data_dir: Optional[str] = None
    model: Literal["mlp", "cnn"] = "mlp"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    aggregator: str = "flag"
    aggregator_params: dict = field(default_factory=dict)
    transport: Literal["horovod", "mpi"] = "horovod"
    seed: int = 0
    faults: list = field(default_factory=list)
    allow_exceeding_f: bool = False

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.data == "dir" and not self.data_dir:
            raise ValueError("data: 'dir' needs data_dir")
        try:
            get_aggregator(self.aggregator, **self.aggregator_params)
        except ValueError as exc:
            raise ValueError(f"aggregator / aggregator_params: {exc}") from None


def parse_args(argv=None) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="fa-hvd-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with DemoConfig keys (configs/demo.yaml)")
    parser.add_argument("--aggregator",
                        help="rule name, e.g. flag, krum, nnm+krum; replaces the config's aggregator and its params")
    parser.add_argument("--f", type=int, help="Byzantine workers tolerated (aggregator_params.f)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="an aggregator parameter (repeatable), e.g. --param r=4")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--data-dir", help="read train.npz/test.npz or MNIST IDX files from here")
    parser.add_argument("--transport", choices=TRANSPORTS)
    args = parser.parse_args(argv)
    raw = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as fh:
                raw = yaml.safe_load(fh) or {}
        except OSError as exc:
            parser.error(f"cannot read --config: {exc}")
    if args.aggregator is not None:
        raw["aggregator"], raw["aggregator_params"] = args.aggregator, {}
    for key in ("epochs", "transport"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.data_dir is not None:
        raw["data"], raw["data_dir"] = "dir", args.data_dir
    try:
        extra = cfg.parse_key_values(args.param, "--param")
        if args.f is not None:
            extra["f"] = args.f
        if extra:
            raw["aggregator_params"] = {**(raw.get("aggregator_params") or {}), **extra}
        return cfg.from_dict(DemoConfig, raw)
    except cfg.ConfigError as exc:
        parser.error(str(exc))


def evaluate(model, dataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        accuracy = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return accuracy


def main(argv=None) -> int:
    conf = parse_args(argv)
    transport = get_transport(conf.transport)
    rank, size = transport.rank, transport.size
    try:
        specs = parse_faults(conf.faults, size, f=conf.aggregator_params.get("f", 0),
                             allow_exceeding_f=conf.allow_exceeding_f)
    except ValueError as exc:
        print(f"fa-hvd-demo: rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    injector = FaultInjector(specs, rank, size, seed=conf.seed, transport=transport)
    torch.manual_seed(conf.seed)
    split = datasets.load_dataset(conf.data, conf.data_dir, seed=conf.seed)
    model = models.build(conf.model, split.shape, split.num_classes)
    for name, tensor in model.state_dict().items():
        transport.broadcast_(tensor, 0, f"demo.init.{name}")
    optimizer = fa_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=conf.lr, momentum=conf.momentum),
        named_parameters=model.named_parameters(),
        aggregator=conf.aggregator,
        aggregator_params=conf.aggregator_params,
        transport=transport,
        gradient_transform=injector.gradient_transform if specs else None,
    )
    train_shard = poison_for_rank(datasets.shard(split.train, rank, size), specs, rank, seed=conf.seed)
    loader = DataLoader(
        train_shard, batch_size=conf.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(conf.seed + rank), drop_last=True,
    )
    if rank == 0:
        print(
            f"fa_hvd demo: {size} ranks ({transport.name}), {conf.data} "
            f"({len(split.train)} train / {len(split.test)} test), {conf.model}, "
            f"aggregator {optimizer.aggregator!r}", flush=True,
        )
        for spec in specs:
            print(f"fault: {spec.describe()} on rank(s) {spec.ranks}", flush=True)
    start = time.perf_counter()
    for epoch in range(conf.epochs):
        total = torch.zeros(2)
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item(), 1.0])
        total = transport.allreduce_sum(total, name=f"demo.loss.{epoch}")
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{conf.epochs}  loss {float(total[0] / total[1]):.4f}  "
                f"test accuracy {evaluate(model, split.test):.3f}  ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    counts = transport.allgather_object(injector.counts, name="demo.fault_counts")
    sums = transport.allgather_object(checksum(model.parameters()), name="demo.checksum")
    agree = all(s == sums[0] for s in sums)  # faulty ranks too: they aggregate the same matrix
    if rank == 0:
        for r, injected in enumerate(counts):
            if injected:
                print(f"rank {r} injected: " + ", ".join(f"{k} x{v}" for k, v in sorted(injected.items())), flush=True)
        verdict = "bit-identical on every rank" if agree else f"DIFFER across ranks: {sums}"
        print(f"parameters after {optimizer.step_count} steps: {verdict} (crc32 {sums[0]:08x})", flush=True)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
