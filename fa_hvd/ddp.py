"""A DDP communication hook: DDP's bucket allreduce replaced by the robust aggregate of the whole gradient.

    model = DistributedDataParallel(model)
    model.register_comm_hook(fa_hvd.ddp.RobustHookState("flag", f=1), fa_hvd.ddp.robust_hook)
    # or, the same in one line:
    model = fa_hvd.ddp.wrap(model, aggregator="flag", f=1)

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations as objects.)

DDP hands a hook one bucket (a flat slice of the gradient) at a time, in bucket
index order on every rank, as backward makes them. The hook starts that bucket's
exchange at once (:data:`fa_hvd.exchange.EXCHANGES`: ``"allgather"`` gathers every
rank's bucket; ``"sharded"`` sends each rank its shard of it) and returns a future.
When the last bucket has been handed over, the exchange computes the aggregate of
the whole gradient, by the same code as :func:`fa_hvd.DistributedOptimizer` (the
rule's Gram matrix is a sum over buckets, its coefficients are solved once), and
every bucket's future completes with its part of it. DDP then writes the parts
into ``.grad`` as it would the averaged buckets, so the rest of the script (the
optimizer, clipping, ``GradScaler``) is unchanged.

Everything else is DDP's: ``no_sync()`` and gradient accumulation (no hook call,
gradients accumulate locally), ``static_graph``, ``gradient_as_bucket_view``,
``find_unused_parameters`` (the unused parameters' zeros travel), bucket sizes and
their rebuild after the first step, mixed precision (a bf16 bucket is aggregated as
fp32, as Horovod's wire needs, and returned as bf16). The aggregate is an average,
as DDP's is: with ``aggregator="mean"`` it is DDP's result up to the order of the
floating-point sum (``G.mean(0)`` against Gloo's ring allreduce of ``g / p``); bit
for bit the same at two ranks, where both sums have one term order and halving is
exact.

Faults: ``gradient_transform`` (``(flat_bucket, bucket_index, step) -> tensor``,
what this rank sends), or else ``FA_HVD_FAULTS`` from the environment as for
:mod:`fa_hvd.wrap`. Not supported: DDP's ``Join`` context for uneven inputs (a
rank that joins early sends no buckets).
"""

import itertools
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .aggregators import get as get_aggregator
from .comm import wire_format
from .comm.torchdist import TorchDistTransport
from .exchange import EXCHANGES, agree_on_compiled_kernels
from .worker_momentum import WorkerMomentum

_instances = itertools.count()  # same creation order on every rank -> same collective names


class RobustHookState:
    """What :func:`robust_hook` needs: the transport over DDP's process group, the rule, the exchange.

    ``aggregator``: a name for :func:`fa_hvd.aggregators.get` (its parameters as
    ``aggregator_params`` or keywords, e.g. ``f=1``) or a callable ``(p, n) -> (n,)``;
    ``exchange``: ``"allgather"`` or ``"sharded"`` (or a factory, as for the optimizer);
    ``compression``: the wire format (default none). ``step`` counts completed
    exchanges; ``stats`` holds the last one's aggregator diagnostics (``nonfinite``,
    ``dropped``, ``weights``); ``timings`` its ``time.perf_counter()`` stamps from the last
    bucket on (``last_bucket``, the exchange's own, ``handed``: every future completed) and
    ``hook_s`` the seconds its hook calls took before the last bucket (starting each bucket's
    exchange), for ``fa-hvd-bench step --profile``. ``worker_momentum`` (``beta``, 0 by default):
    this rank sends its momentum instead of its gradient (:mod:`fa_hvd.worker_momentum`; give the
    optimizer no momentum of its own; ``worker_nesterov=True``: Nesterov's ``g_t + beta m_t``), kept
    per parameter because DDP rebuilds its buckets after the first step; the buffers are in
    ``state.worker_momentum``, keyed by the order in which the parameters first reached the hook.
    """

    def __init__(self, aggregator="flag", aggregator_params: dict | None = None, *, process_group=None,
                 exchange="allgather", compression=None, gradient_transform=None, worker_momentum: float = 0.0,
                 worker_nesterov: bool = False, **params):
        momentum = WorkerMomentum(worker_momentum, worker_nesterov)
        self.worker_momentum = momentum if momentum.beta else None
        self._parameter_keys: dict[int, int] = {}
        self.transport = TorchDistTransport(process_group)
        params = {**(aggregator_params or {}), **params}
        if isinstance(aggregator, str):
            aggregator = get_aggregator(aggregator, **params)
        elif params:
            raise ValueError("fa_hvd: aggregator parameters are only used with an aggregator name")
        if hasattr(aggregator, "check"):
            aggregator.check(self.transport.size)
        if isinstance(exchange, str) and exchange not in EXCHANGES:
            raise ValueError(f"fa_hvd: unknown exchange {exchange!r}; known: {', '.join(EXCHANGES)}")
        self.aggregator = aggregator
        name = f"fa_hvd.ddp{next(_instances)}"
        self.exchange = (EXCHANGES[exchange] if isinstance(exchange, str) else exchange)(
            self.transport, aggregator, wire_format(compression), name)
        self.transport.prepare(self.exchange.channels())  # every rank builds its state at the same point
        agree_on_compiled_kernels(self.transport, f"{name}.kernels")
        if gradient_transform is None:
            from .wrap import _fault_transform

            gradient_transform = _fault_transform(self.transport, params, os.environ)
        self.gradient_transform = gradient_transform
        self.step = 0
        self.stats: dict = {}
        self.timings: dict = {}
        self.hook_s = 0.0
        self._pending: dict[int, tuple[torch.futures.Future, torch.Tensor]] = {}

    def momentum(self, bucket: dist.GradBucket, flat: torch.Tensor) -> torch.Tensor:
        """This rank's momentum of the bucket's gradient ``flat``, parameter by parameter."""
        params = bucket.parameters()
        if sum(p.numel() for p in params) != flat.numel():
            raise RuntimeError(f"fa_hvd.ddp: bucket {bucket.index()} holds {flat.numel()} elements, its "
                               f"parameters {sum(p.numel() for p in params)}; worker momentum needs them to match")
        pieces, offset = [], 0
        for param in params:
            key = self._parameter_keys.setdefault(id(param), len(self._parameter_keys))
            pieces.append(self.worker_momentum(flat[offset: offset + param.numel()], key))
            offset += param.numel()
        return torch.cat(pieces)

    def _finish(self) -> None:
        """The last bucket is in: aggregate, and complete every bucket's future with its part."""
        count = len(self._pending)
        if sorted(self._pending) != list(range(count)):
            raise RuntimeError(f"fa_hvd.ddp: buckets {sorted(self._pending)} were handed over; expected 0..{count - 1}")
        called = time.perf_counter()
        pending, self._pending = self._pending, {}
        device = pending[0][1].device
        try:
            parts = self.exchange.finish_buckets([pending[i][1].numel() for i in range(count)], device, self.step)
        except BaseException:
            self.exchange.abandon()
            raise
        self.step += 1
        self.stats = {"step": self.step - 1, **getattr(self.aggregator, "diagnostics", {})}
        for index, part in enumerate(parts):
            future, buffer = pending[index]
            # DDP views a hook's result at the bucket's offsets counted from the start of its storage: a
            # part that starts its storage in the bucket's dtype (an early rule's gathered shards, the
            # first bucket's part of an aggregate) is handed over as it is, any other copied into the
            # bucket's own buffer, as DDP's allreduce hook leaves its result (memory DDP already touched:
            # a fresh tensor per bucket costs its pages every step).
            whole = part.storage_offset() == 0 and (part.dtype, part.device) == (buffer.dtype, buffer.device)
            future.set_result(part if whole else buffer.copy_(part))
        self.timings = {"last_bucket": called, **self.exchange.timings, "handed": time.perf_counter()}


def robust_hook(state: RobustHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook (``model.register_comm_hook(state, robust_hook)``); see the module's doc."""
    began = time.perf_counter()
    buffer = bucket.buffer()
    flat = buffer.float() if buffer.dtype == torch.bfloat16 else buffer
    index = bucket.index()
    if state.worker_momentum is not None:
        flat = state.momentum(bucket, flat)
    if state.gradient_transform is not None:
        flat = state.gradient_transform(flat, index, state.step)
    # A CUDA-aware future for a GPU bucket: it records the stream the aggregate was written on.
    future = torch.futures.Future(devices=[buffer.device] if buffer.device.type == "cuda" else None)
    if not state._pending:
        state.hook_s = 0.0
    state._pending[index] = (future, buffer)
    try:
        state.exchange.start(index, flat)
        state.hook_s += time.perf_counter() - began
        if bucket.is_last():
            state._finish()
    except BaseException:
        state._pending.clear()
        state.exchange.abandon()
        raise
    return future


def wrap(model: torch.nn.Module, aggregator="flag", aggregator_params: dict | None = None, *,
         exchange="allgather", compression=None, gradient_transform=None, worker_momentum: float = 0.0,
         worker_nesterov: bool = False, **params) -> DistributedDataParallel:
    """Register :func:`robust_hook` on ``model`` (a ``DistributedDataParallel``, or a module that is
    wrapped in one first) over its process group; returns the DDP model. Its state is
    ``model.fa_hvd_state``."""
    ddp = model if isinstance(model, DistributedDataParallel) else DistributedDataParallel(model)
    state = RobustHookState(aggregator, aggregator_params, process_group=ddp.process_group, exchange=exchange,
                            compression=compression, gradient_transform=gradient_transform,
                            worker_momentum=worker_momentum, worker_nesterov=worker_nesterov, **params)
    ddp.register_comm_hook(state, robust_hook)
    ddp.fa_hvd_state = state
    return ddp
