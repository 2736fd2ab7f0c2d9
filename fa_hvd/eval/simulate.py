"""The simulation engine: p virtual workers in one process, one model replica.

Synchronous data parallelism keeps every rank's replica identical, so one model
stands for all of them. The run is the trainer's (:mod:`fa_hvd.train.trainer`),
assembled from the trainer's own components (config, data, model, optimizer,
schedule, shards, faults, aggregators); each step ``t``:

1. worker ``r`` takes ``backward_passes_per_step`` micro-batches from its
   ``ShardStream(shard, seed, r)`` of ``partition(labels, p, seed, alpha)``, read
   from the training set poisoned for it (``poison_for_rank``) through
   ``split.batch`` (normalisation, seeded augmentation);
2. the p per-worker gradients come from one backward pass through p stacked
   copies of the parameters (:class:`PerWorkerGradients`): worker ``r``'s loss
   depends only on copy ``r``, so the gradient of the summed losses with respect
   to copy ``r`` is worker ``r``'s gradient; micro-batches are averaged as the
   trainer's ``loss / k`` backward accumulates them;
3. each worker's gradient is flattened into the optimizer's own buckets (the layout
   of :func:`fa_hvd.optimizer._make_buckets`), folded into the worker's own momentum
   with ``robust.worker_momentum`` (:class:`~fa_hvd.worker_momentum.WorkerMomentum`), and sent through the worker's own
   :class:`~fa_hvd.faults.FaultInjector` at step ``t``; the honest view that
   omniscient attacks gather is the bucket's matrix before any fault, which is
   what the trainer's extra allgather returns;
4. the aggregator (:func:`fa_hvd.aggregators.get`) maps the ``(p, n)`` matrix to the
   update, written into ``.grad`` in bucket order; ``optim.grad_clip`` clips it; the
   local optimizer steps and the learning-rate schedule follows.

The model is built right after ``torch.manual_seed(seed)``; the step loss is the median
over workers of each worker's batch loss (:func:`fa_hvd.train.control.median_loss`, as the
trainer logs it); the test loss and accuracy cover the whole
test set. When the update turns non-finite the parameters can never recover (NaN and
Inf propagate through every later step), so the run stops there and is reported as
diverged. What the simulation cannot reproduce (dropout, mixed precision, elastic
mode, process faults) is refused with a message naming the key.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.utils.data import TensorDataset

from fa_hvd.aggregators import get as get_aggregator
from fa_hvd import config as cfg
from fa_hvd.config import ConfigError
from fa_hvd.faults import FaultInjector, parse_faults, poison_for_rank
from fa_hvd.optimizer import _make_buckets
from fa_hvd.train import config as train_config
from fa_hvd.train import data, models, optim
from fa_hvd.train.control import median_loss
from fa_hvd.train.sharding import ShardStream, partition, steps_per_epoch
from fa_hvd.worker_momentum import WorkerMomentum

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


def check_reproducible(conf: train_config.RunConfig) -> None:
    """``ValueError`` naming the first setting the simulation cannot reproduce."""
    refused = [
        ("model.dropout", conf.model.dropout != 0, "per-rank dropout masks"),
        ("train.amp", conf.train.amp != "none", "mixed precision"),
        ("train.device", conf.train.device == "cuda", "a GPU run"),
        ("elastic.enabled", conf.elastic.enabled, "elastic mode"),
    ]
    for key, bad, what in refused:
        if bad:
            raise ValueError(f"{key}: the simulation does not reproduce {what}; use --engine distributed")


@functools.lru_cache(maxsize=4)
def _dataset(data_json: str, seed: int) -> data.Split:
    """The trainer's data set for a ``data`` section (as JSON, the cache key) and run seed."""
    d = cfg.from_dict(train_config.DataConfig, json.loads(data_json), "data")
    return data.load_dataset(d.name, d.dir, seed, normalize=d.normalize, augment=d.augment, verify=d.verify,
                             image_size=d.image_size, synthetic=d.synthetic)


def _materialized(dataset):
    """A poisoned data set as tensors (items read once), so batches index it like the clean one."""
    if isinstance(dataset, TensorDataset):
        return dataset
    x, y = data.fetch(dataset, torch.arange(len(dataset)))
    return TensorDataset(x, y)


def simulate(cell: Cell, curve: bool = False, observe=None) -> dict:
    """Train ``cell`` and return its result: ``test_accuracy``, ``test_loss``, ``train_loss``
    (the last step's loss, as the trainer's summary has it), ``diverged``, ``steps`` run,
    ``wall_s``, and with ``curve`` the per-step losses ``losses``. ``observe(step, diagnostics, losses)``,
    when given, is told the aggregator's diagnostics and the workers' batch losses (in rank order) after every
    step (steps counted from 1, as the trainer's ``metrics.jsonl``)."""
    start = time.perf_counter()
    try:
        conf, _ = train_config.parse(cell.run_config())
    except ConfigError as exc:
        raise ValueError(f"{cell.key}: {exc}") from None
    check_reproducible(conf)
    p, seed, passes, batch_size = cell.p, conf.seed, conf.optim.backward_passes_per_step, conf.train.batch_size
    specs = parse_faults(conf.faults, p, f=conf.robust.f, allow_exceeding_f=conf.robust.allow_exceeding_f)
    if any(spec.category == "process" for spec in specs):
        raise ValueError(f"{cell.key}: the simulation has no processes to crash, hang or slow; "
                         f"use --engine distributed for process faults")
    if any(spec.category == "role" for spec in specs):
        raise ValueError(f"{cell.key}: the simulation has no exchange or control messages to lie in; "
                         f"use --engine distributed for role faults ({', '.join(s.kind for s in specs)})")
    split = _dataset(json.dumps(cfg.to_dict(conf.data), sort_keys=True), seed)
    shards = partition(split.labels(), p, seed, conf.data.alpha)
    epoch = steps_per_epoch(len(split.train), p, batch_size * passes)
    steps = conf.train.steps or max(1, math.ceil(conf.train.epochs * epoch))
    # A stream's whole run at once: one take(B k steps) gives what steps x k calls of take(B) give.
    order = torch.stack([ShardStream(shard, seed, rank).take(batch_size * passes * steps)
                         .view(steps, passes, batch_size) for rank, shard in enumerate(shards)], dim=2)
    worker_sets = [_materialized(poison_for_rank(split.train, specs, rank, seed=seed)) for rank in range(p)]
    clean = all(dataset is split.train for dataset in worker_sets)

    with models.seeded(seed):
        model = models.build(conf.model.name, split.shape, split.num_classes, conf.model.hidden,
                             conf.model.width, conf.model.dropout)
    optimizer = optim.build_optimizer(conf.optim, model)
    scheduler = optim.build_scheduler(optimizer, conf.schedule, conf.optim.lr, steps, epoch)
    aggregator = get_aggregator(conf.robust.aggregator, **conf.robust.aggregator_params)
    aggregator.check(p)
    names = {id(param): name for name, param in model.named_parameters()}
    layout = [[(names[id(param)], param) for param in bucket.params]
              for bucket in _make_buckets(optimizer.param_groups, None, None)]  # the optimizer's default
    board: dict = {}
    injectors = {rank: FaultInjector(specs, rank, p, seed=seed, transport=_HonestBoard(rank, p, board), log=_QUIET)
                 for rank in sorted({r for spec in specs if spec.category == "gradient" for r in spec.ranks})}
    per_worker = PerWorkerGradients(model, p)
    momenta = [WorkerMomentum(conf.robust.worker_momentum, conf.worker_nesterov) for _ in range(p)]
    losses: list[float] = []
    diverged = False
    for step in range(steps):
        grads, step_losses = {}, 0
        for micro in range(passes):
            x, y = _batches(split, worker_sets, order[step, micro], clean, seed, step, micro)
            micro_grads, micro_losses = per_worker(x, y)
            for name, g in micro_grads.items():
                grads[name] = grads[name] + g / passes if name in grads else g / passes
            step_losses = step_losses + micro_losses / passes
        losses.append(median_loss(step_losses.double()))
        rows = []
        for index, bucket in enumerate(layout):
            G = torch.cat([grads[name].reshape(p, -1) for name, _ in bucket], dim=1)
            if conf.robust.worker_momentum:
                G = torch.stack([momenta[rank](G[rank], index) for rank in range(p)])
            if injectors:
                board["rows"] = G
                G = G.clone()
                for rank, injector in injectors.items():
                    G[rank] = injector.gradient_transform(G[rank], index, step)
            rows.append(G)
        update = aggregator(torch.cat(rows, dim=1) if len(rows) > 1 else rows[0])
        if observe is not None:
            observe(step + 1, aggregator.diagnostics, step_losses.tolist())
        offset = 0
        for bucket in layout:
            for _, param in bucket:
                param.grad = update[offset:offset + param.numel()].view_as(param).clone()
                offset += param.numel()
        if conf.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), conf.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if not bool(torch.isfinite(update).all()):
            diverged = True
            break
    test_loss, accuracy = _evaluate(model, split, conf.train.eval_batch_size)
    result = {
        "test_accuracy": accuracy,
        "test_loss": test_loss,
        "train_loss": losses[-1],
        "diverged": diverged or not math.isfinite(test_loss),
        "steps": len(losses),
        "wall_s": time.perf_counter() - start,
    }
    if curve:
        result["losses"] = losses
    return result


def _batches(split, worker_sets, indices, clean, seed, step, micro):
    """The p workers' micro-batch ``micro`` of ``step``: ``(p, B, ...)`` inputs and ``(p, B)`` labels."""
    if clean and split.augment == "none":
        x, y = split.batch(split.train, indices.reshape(-1))
        return x.view(*indices.shape, *x.shape[1:]), y.view(indices.shape)
    pairs = [split.batch(worker_sets[rank], indices[rank],
                         data.augment_generator(seed, rank, step, micro) if split.augment != "none" else None)
             for rank in range(indices.shape[0])]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def _evaluate(model, split, batch_size: int) -> tuple[float, float]:
    """Test loss and accuracy over the whole test set (the trainer's sums, in one process)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for chunk in torch.arange(len(split.test)).split(batch_size):
            x, y = split.batch(split.test, chunk)
            out = model(x).float()
            sums += torch.tensor([float(F.cross_entropy(out, y, reduction="sum")),
                                  float((out.argmax(1) == y).sum()), float(len(y))], dtype=torch.float64)
    model.train()
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])
