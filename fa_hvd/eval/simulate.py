"""The simulation engine: p virtual workers in one process, one model replica.

Synchronous data parallelism keeps every rank's replica identical, so one model
stands for all of them. Each step:

1. worker ``r`` draws its batch exactly as rank ``r`` of the trainer does
   (:mod:`fa_hvd.train.sharding`: ``partition`` then ``ShardStream(shard, seed, r)``),
   from the training set poisoned for it (``poison_for_rank``);
2. the p per-worker gradients of the mean cross-entropy come from one backward pass
   through p stacked copies of the parameters (:class:`PerWorkerGradients`): worker
   ``r``'s loss depends only on copy ``r``, so the gradient of the summed losses with
   respect to copy ``r`` is worker ``r``'s gradient;
3. each worker's gradient is flattened into the optimizer's own buckets (the layout
   of :func:`fa_hvd.optimizer._make_buckets`) and sent through the worker's own
   :class:`~fa_hvd.faults.FaultInjector`; the honest view that omniscient attacks
   gather is the bucket's matrix before any fault, which is what the trainer's
   extra allgather returns;
4. the aggregator (:func:`fa_hvd.aggregators.get`) maps the ``(p, n)`` matrix to the
   update, written into ``.grad`` in bucket order, and the optimizer steps.

The model is built right after ``torch.manual_seed(seed)``; the step loss is the mean
over workers of each worker's batch loss. When the update turns non-finite the
parameters can never recover (NaN and Inf propagate through every later step), so
the run stops there and is reported as diverged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fa_hvd.aggregators import get as get_aggregator
from fa_hvd.faults import FaultInjector, parse_faults, poison_for_rank
from fa_hvd.optimizer import _make_buckets
from fa_hvd.train import data as datasets
from fa_hvd.train import models
from fa_hvd.train.sharding import ShardStream, partition, steps_per_epoch

from .grid import Cell


_QUIET = logging.getLogger("fa_hvd.eval.simulated_faults")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class _HonestBoard:
    """Stands in for the transport of the injectors: ``allgather`` returns the bucket's
    rows before any fault, which is what every rank's extra allgather gathers."""

    def __init__(self, rank: int, size: int, board: dict):
        self.rank, self.size, self._board = rank, size, board

    def allgather(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return self._board["rows"]


class PerWorkerGradients:
    """``(x, y)`` of shape ``(p, B, ...)`` and ``(p, B)`` -> per-worker gradients ``{name: (p, ...)}``
    and per-worker mean cross-entropy losses ``(p,)``, for ``model``'s current parameters.

    The forward runs over p stacked copies of the parameters: batched matrix products for an
    ``nn.Sequential`` of ``Flatten``, ``Linear`` and ``ReLU`` (the MLP), ``torch.func.vmap`` of
    the model's functional call for any other model (without buffers).
    """

    def __init__(self, model: nn.Module, p: int):
        self.model, self.p = model, p
        layers = list(model) if isinstance(model, nn.Sequential) else [model]
        self._layers = layers if all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU)) for m in layers) else None
        self._vmapped = vmap(lambda params, x: functional_call(model, params, (x,)))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, torch.Tensor]:
        p, batch = y.shape
        stacked = {name: param.detach().expand(p, *param.shape).clone().requires_grad_()
                   for name, param in self.model.named_parameters()}
        logits = self._sequential(stacked, x) if self._layers is not None else self._vmapped(stacked, x)
        losses = F.cross_entropy(logits.reshape(p * batch, -1), y.reshape(-1), reduction="none").view(p, batch).mean(1)
        grads = torch.autograd.grad(losses.sum(), list(stacked.values()))
        return dict(zip(stacked, grads)), losses.detach()

    def _sequential(self, stacked: dict, x: torch.Tensor) -> torch.Tensor:
        p, batch = x.shape[:2]
        h = x
        for index, layer in enumerate(self._layers):
            if isinstance(layer, nn.Flatten):
                h = h.reshape(p, batch, -1)
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            else:
                prefix = f"{index}." if isinstance(self.model, nn.Sequential) else ""
                weight, bias = stacked[prefix + "weight"], stacked.get(prefix + "bias")
                h = torch.bmm(h, weight.transpose(1, 2)) if bias is None else \
                    torch.baddbmm(bias[:, None, :], h, weight.transpose(1, 2))
        return h


SUPPORTED = {
    "data": {"name": ("digits", "dir"), "dir": None, "alpha": None, "normalize": (False,)},
    "model": {"name": ("mlp", "cnn"), "hidden": (64,), "width": (16,), "dropout": (0, 0.0)},
    "optim": {"name": ("sgd",), "lr": None, "momentum": None, "nesterov": None, "weight_decay": None},
    "train": {"steps": None, "epochs": None, "batch_size": None, "eval_batch_size": None,
              "eval_every_steps": None, "eval_every_epochs": None, "device": ("auto", "cpu")},
    "robust": {"aggregator": None, "aggregator_params": None, "transport": None, "allow_exceeding_f": (False,)},
    "checkpoint": {}, "log": {}, "seed": None, "faults": None,
}
"""What the simulation reproduces of a trainer config: section -> key -> allowed values (None: any);
``checkpoint`` and ``log`` change no number and are ignored."""


@dataclasses.dataclass
class Settings:
    """The trainer settings a simulated run uses (the trainer's defaults where a key is absent)."""

    data: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
    steps: int | None = None
    epochs: float = 5
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0

    @classmethod
    def from_config(cls, conf: dict) -> "Settings":
        """From a trainer config mapping; ``ValueError`` names a key the simulation cannot reproduce."""
        for section, value in conf.items():
            if section not in SUPPORTED:
                raise ValueError(f"{section}: the simulation does not reproduce this trainer setting; "
                                 f"use --engine distributed")
            if not isinstance(value, dict) or section in ("checkpoint", "log"):
                continue
            for key, item in value.items():
                allowed = SUPPORTED[section].get(key, ())
                if key not in SUPPORTED[section] or (allowed is not None and item not in allowed):
                    raise ValueError(f"{section}.{key}: {item!r} is not reproduced by the simulation"
                                     + (f" (it takes {', '.join(map(repr, allowed))})" if allowed else "")
                                     + "; use --engine distributed")
        data, model, optim, train = (conf.get(k, {}) for k in ("data", "model", "optim", "train"))
        defaults = cls()
        return cls(data=data.get("name", defaults.data), data_dir=data.get("dir"),
                   model=model.get("name", defaults.model), steps=train.get("steps"),
                   epochs=train.get("epochs", defaults.epochs), batch_size=train.get("batch_size", defaults.batch_size),
                   lr=optim.get("lr", defaults.lr), momentum=optim.get("momentum", defaults.momentum),
                   nesterov=optim.get("nesterov", defaults.nesterov),
                   weight_decay=optim.get("weight_decay", defaults.weight_decay))


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None, seed: int) -> datasets.Split:
    return datasets.load_dataset(name, data_dir, seed=seed)


def _worker_data(train, specs, p: int, seed: int):
    """Per worker: the training tensors it reads (poisoned copies for data-faulty workers)."""
    x, y = train.tensors
    out = []
    for rank in range(p):
        poisoned = poison_for_rank(train, specs, rank, seed=seed)
        if poisoned is train:
            out.append((x, y))
            continue
        items = [poisoned[i] for i in range(len(poisoned))]
        out.append((torch.stack([item[0] for item in items]), torch.stack([torch.as_tensor(item[1]) for item in items])))
    return out


def simulate(cell: Cell, curve: bool = False) -> dict:
    """Train ``cell`` and return its result: ``test_accuracy``, ``test_loss``, ``train_loss``
    (mean step loss over the last epoch), ``diverged``, ``steps`` run, ``wall_s``, and with
    ``curve`` the per-step losses ``losses``."""
    start = time.perf_counter()
    settings, p, seed = Settings.from_config(cell.run_config()), cell.p, cell.seed
    specs = parse_faults(cell.fault_entries, p, f=cell.f)
    if any(spec.category == "process" for spec in specs):
        raise ValueError(f"{cell.key}: the simulation has no processes to crash, hang or slow; "
                         f"use the distributed engine for process faults")
    split = _dataset(settings.data, settings.data_dir, seed)
    train_x, train_y = split.train.tensors
    shards = partition(train_y, p, seed, cell.alpha)
    batch_size = settings.batch_size
    epoch = steps_per_epoch(len(train_y), p, batch_size)
    steps = settings.steps or max(1, math.ceil(settings.epochs * epoch))
    # A stream's whole run at once: take(B * steps) gives what steps calls of take(B) give.
    order = torch.stack([ShardStream(shard, seed, rank).take(batch_size * steps).view(steps, batch_size)
                         for rank, shard in enumerate(shards)], dim=1)  # (steps, p, B)
    worker_data = _worker_data(split.train, specs, p, seed)

    torch.manual_seed(seed)
    model = models.build(settings.model, split.shape, split.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                nesterov=settings.nesterov, weight_decay=settings.weight_decay)
    aggregator = get_aggregator(cell.aggregator, **cell.aggregator_params)
    aggregator.check(p)
    buckets = _make_buckets(optimizer.param_groups, None, None)  # the optimizer's default layout
    names = {id(param): name for name, param in model.named_parameters()}
    layout = [[(names[id(param)], param) for param in bucket.params] for bucket in buckets]

    board: dict = {}
    injectors = {rank: FaultInjector(specs, rank, p, seed=seed, transport=_HonestBoard(rank, p, board),
                                   log=_QUIET)
                 for rank in sorted({r for spec in specs if spec.category == "gradient" for r in spec.ranks})}

    per_worker = PerWorkerGradients(model, p)
    clean = all(wx is train_x and wy is train_y for wx, wy in worker_data)
    losses: list[float] = []
    diverged = False
    for step in range(steps):
        indices = order[step]
        if clean:
            x, y = train_x[indices], train_y[indices]
        else:
            x = torch.stack([worker_data[r][0][indices[r]] for r in range(p)])
            y = torch.stack([worker_data[r][1][indices[r]] for r in range(p)])
        grads, batch_losses = per_worker(x, y)
        losses.append(float(batch_losses.mean()))
        rows = []
        for index, bucket in enumerate(layout):
            G = torch.cat([grads[name].reshape(p, -1) for name, _ in bucket], dim=1)
            if injectors:
                board["rows"] = G
                G = G.clone()
                for rank, injector in injectors.items():
                    G[rank] = injector.gradient_transform(G[rank], index, step)
            rows.append(G)
        update = aggregator(torch.cat(rows, dim=1) if len(rows) > 1 else rows[0])
        offset = 0
        for bucket in layout:
            for _, param in bucket:
                param.grad = update[offset:offset + param.numel()].view_as(param).clone()
                offset += param.numel()
        optimizer.step()
        if not bool(torch.isfinite(update).all()):
            diverged = True
            break
    test_x, test_y = split.test.tensors
    with torch.no_grad():
        logits = model(test_x)
        test_loss = float(F.cross_entropy(logits, test_y))
        accuracy = float((logits.argmax(1) == test_y).float().mean())
    last = losses[-epoch:]
    result = {
        "test_accuracy": accuracy,
        "test_loss": test_loss,
        "train_loss": sum(last) / len(last),
        "diverged": diverged or not math.isfinite(test_loss),
        "steps": len(losses),
        "wall_s": time.perf_counter() - start,
    }
    if curve:
        result["losses"] = losses
    return result
