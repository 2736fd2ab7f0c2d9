"""``fa_hvd.DistributedOptimizer``: Horovod's optimizer wrapper with robust aggregation.

Where ``hvd.DistributedOptimizer`` all-reduces gradients, this wrapper
all-gathers them and every rank computes the same robust aggregate:

1. Gradient hooks (``register_post_accumulate_grad_hook``) count the backward
   passes of each parameter. When every parameter of a bucket has seen
   ``backward_passes_per_step`` passes, the bucket is flattened (sparse gradients
   densified, bf16 sent as fp32, then ``compression``) and handed to the
   exchange at once, so communication overlaps the rest of the backward pass.
   Buckets may start in a different order on different ranks: Horovod matches
   collectives by name, and the mpi4py transport gives each bucket its own
   communicator (MPI orders collectives per communicator). Only a gradient
   transform that runs collectives itself (omniscient fault injection) makes
   buckets start in their fixed index order.
2. ``synchronize()`` starts every bucket not started yet (parameters that got no
   gradient send zeros), and the exchange (:class:`~fa_hvd.exchange.GradientExchange`; the
   default gathers every gradient, ``exchange="sharded"`` aggregates one shard of
   the coordinates per rank, :mod:`fa_hvd.exchange`) returns
   the ``(n,)`` aggregate of the whole gradient (FA needs the whole vector),
   which is written back into each ``.grad`` in the layout it had (a sparse
   gradient stays sparse).
3. ``step()`` synchronizes unless inside ``skip_synchronize()``, then steps.

Every rank aggregates the same gathered matrix with the same deterministic
kernels, so honest ranks hold bit-identical parameters (on identical hardware
and thread counts).

Horovod's behaviour is kept where a script can see it: the attributes
(``_parameter_names``, ``backward_passes_per_step``, ``_allreduce_delay``,
``_requires_update``, ``_handles``, ``_synchronized``, ``_should_synchronize``,
``op``, ``process_set``, ...), the errors (``AssertionError`` for a gradient
computed too often or ``zero_grad()`` with gradients pending, ``ValueError`` for
bad names and groups), the warning when ``step()`` follows ``synchronize()``
outside ``skip_synchronize()`` (and the second exchange it makes), ranks outside
the process set stepping on their own gradients, and ``load_state_dict``
dropping what is in flight.

Elastic Horovod (``hvd.elastic.run``): Horovod's ``HorovodInternalError`` and
``HostsUpdatedInterrupt`` leave ``step()``/``synchronize()`` as themselves (with
this rank and step added as a note), so elastic resets. Each step starts by
re-reading rank and world size from the transport; after a change the
aggregator's preconditions are checked again (a ``ValueError`` naming the rule,
``f`` and ``p``). In elastic mode (``HOROVOD_ELASTIC=1``) the constructor makes
no collective call: workers that join later build their optimizer while the
others are already training.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import time
import warnings
import weakref
import zlib
from typing import Callable, Iterable

import torch

from .aggregators import Aggregator, get as get_aggregator
from .comm import Transport, get_transport, wire_format
from .exchange import EXCHANGES, GradientExchange, agree_on_compiled_kernels, rule_name
from .exchange.digest import DeferredDigest
from .worker_momentum import WorkerMomentum, check_single_momentum

MIN_BUCKET_BYTES = 1 << 20  # automatic bucket sizes: total / TARGET_BUCKETS, within these bounds
MAX_BUCKET_BYTES = 25 << 20
TARGET_BUCKETS = 8
_instances = itertools.count()  # same creation order on every rank -> same collective names
_log = logging.getLogger("fa_hvd")

# Horovod 0.28.1's messages, word for word (scripts and tests match on them).
STEP_AFTER_SYNCHRONIZE = ("optimizer.step() called without optimizer.skip_synchronize() context after "
                          "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                          "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your code.")
ZERO_GRAD_PENDING = ("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() or "
                     "optimizer.synchronize(). This is prohibited as it can cause a race condition.")
TOO_MANY_PASSES = ("Gradients were computed more than backward_passes_per_step times before call to step(). "
                   "Increase backward_passes_per_step to accumulate gradients locally.")


class RobustOptimizer:
    """Base of every optimizer class :func:`DistributedOptimizer` builds (for ``isinstance``)."""


class _Bucket:
    """Parameters (on one device) whose gradients travel together."""

    def __init__(self, index: int, params: list[torch.nn.Parameter]):
        self.index = index
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.device = params[0].device
        self.ready = 0  # parameters whose passes are complete this step
        self.started = False
        self.sparse_dims: dict[int, int] = {}  # id(param) -> sparse_dim of a sparse gradient sent this step
        self.shared: torch.Tensor | None = None  # (numel,): the one buffer of the gradients (share_gradients)
        self.written: list[weakref.ref] = []  # the .grad tensors the last write-back wrote

    def gradients_kept(self) -> bool:
        """Whether every ``.grad`` is the tensor the last write-back wrote (zeroed in place by
        ``zero_grad(set_to_none=False)``, or not zeroed): the gradients outlive the steps."""
        return bool(self.written) and all(p.grad is not None and p.grad is ref()
                                          for p, ref in zip(self.params, self.written))

    def share_gradients(self) -> None:
        """Put the parameters' ``.grad`` into one buffer that the bucket keeps, in order: the same
        tensors with their values, their storage moved (``Tensor.set_``, as Horovod sets ``.grad`` to
        its allreduce's output). Backward then accumulates there and the bucket is sent as it is, with
        no copy (:meth:`sends_shared`). Only where every gradient is dense, contiguous, of the
        parameters' one dtype (fp16, fp32 or fp64) and not part of a graph; otherwise nothing changes."""
        if self.sends_shared():
            return
        dtype = self.params[0].dtype
        if dtype not in (torch.float16, torch.float32, torch.float64) or not all(
                p.grad is not None and not p.grad.is_sparse and p.grad.dtype == dtype and p.is_contiguous()
                and p.grad.is_contiguous() and not p.grad.requires_grad for p in self.params):
            return
        if self.shared is None:
            self.shared = torch.empty(self.numel, dtype=dtype, device=self.device)
        offset = 0
        for p in self.params:
            part = self.shared[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
            part.copy_(p.grad)
            p.grad.set_(part)

    def sends_shared(self) -> bool:
        """Whether every parameter's ``.grad`` lies in :attr:`shared`, in order (:meth:`share_gradients`,
        then backward accumulated in place): the bucket's gradients are that buffer."""
        if self.shared is None:
            return False
        address, width, offset = self.shared.data_ptr(), self.shared.element_size(), 0
        for p in self.params:
            grad = p.grad
            if (grad is None or grad.is_sparse or grad.dtype != self.shared.dtype or not grad.is_contiguous()
                    or grad.requires_grad or grad.data_ptr() != address + offset * width):
                return False
            offset += p.numel()
        return True


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class at run time (as Horovod does)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step: int, op, op_name: str,
                 gradient_predivide_factor: float, groups, sparse_as_dense: bool, process_set,
                 aggregator: Callable[[torch.Tensor], torch.Tensor], transport: Transport, exchange,
                 bucket_bytes: int | None, gradient_transform: Callable[[torch.Tensor, int, int], torch.Tensor] | None,
                 digest: bool | str, worker_momentum: WorkerMomentum | None):
        super(self.__class__, self).__init__(params)
        # Horovod's attributes, with Horovod's meaning.
        self._compression = compression
        self._parameter_names = _parameter_names(self.param_groups, named_parameters)
        self.backward_passes_per_step = backward_passes_per_step
        self._allreduce_delay = {p: backward_passes_per_step for p in self._parameter_names}
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self._groups = groups
        self._requires_update = {p for group in self.param_groups for p in group["params"] if p.requires_grad}
        self._synchronized = False
        self._should_synchronize = True
        # fa_hvd's own.
        self._transport = transport
        self._aggregator = aggregator
        self._op_name = op_name
        self._scale = float(transport.size) if op_name == "Sum" else 1.0
        self._prefix = f"fa_hvd.opt{next(_instances)}"
        self._gradient_transform = gradient_transform
        self.worker_momentum = worker_momentum
        self._ordered = bool(getattr(getattr(gradient_transform, "__self__", gradient_transform),
                                     "uses_collectives", False))
        self._exchange = (EXCHANGES[exchange] if isinstance(exchange, str) else exchange)(
            transport, aggregator, compression, self._prefix, **({"digest": True} if digest is True else {}))
        self.digest = DeferredDigest() if digest == "deferred" else None  # the caller's control row checks it
        self._buckets = _make_buckets(self.param_groups, groups, bucket_bytes)
        self._bucket_of = {p: b for b in self._buckets for p in b.params}
        self._aggregation_device = _aggregation_device(self._buckets)
        if self._buckets:
            self._exchange.plan([b.numel for b in self._buckets], _sent_dtype(self._buckets), self._aggregation_device)
        self._written: set[int] = set()  # buckets whose aggregate is in .grad already this step
        self._exchange.bucket_final = self._bucket_final
        self._next_ordered = 0
        self._step_started = False
        self._taken_over: set[str] = set()
        self._marks: dict = {}
        self.step_count = 0  # gradient exchanges completed
        self.stats: dict = {}
        self._hook_handles = []
        if transport.included:
            if os.environ.get("HOROVOD_ELASTIC") != "1":
                _check_same_model(transport, self.param_groups, self._parameter_names, f"{self._prefix}.model")
                agree_on_compiled_kernels(transport, f"{self._prefix}.kernels")
                transport.prepare([self._exchange_name(b.index) for b in self._buckets] + self._exchange.channels())
            self._hook_handles = [_claim(self, p) for b in self._buckets for p in b.params]
        # Horovod's broadcast_optimizer_state initialises an empty optimizer state by
        # stepping the inner optimizer of its own DistributedOptimizer (recognised by
        # ``optimizer.__module__``), with no gradient exchange. This optimizer answers
        # that test too, so that zero step (also run by elastic's TorchState.sync) never
        # exchanges, never counts as a step and never advances a fault schedule.
        self.__module__ = "horovod.torch.optimizer"

    def _exchange_name(self, index: int) -> str:
        return f"{self._prefix}.bucket{index}"

    # -- Horovod's public methods --------------------------------------------------------
    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = passes

    @staticmethod
    def find_duplicates(names) -> set:
        seen, duplicates = set(), set()
        for name in names:
            (duplicates if name in seen else seen).add(name)
        return duplicates

    @property
    def _handles(self) -> dict:
        """What is pending, as Horovod keeps it: a parameter with a partial count, or a
        bucket (tuple of parameters) in flight. Non-empty forbids ``zero_grad()``."""
        pending = {b_params: True for b_params in (tuple(b.params) for b in self._buckets if b.started)}
        pending.update({p: None for p, left in self._allreduce_delay.items()
                        if left != self.backward_passes_per_step and not self._bucket_of[p].started})
        return pending

    # -- hooks and buckets -----------------------------------------------------------
    def _start_step(self) -> None:
        """Once per step, before its first collective: follow an elastic change of the world."""
        if self._step_started:
            return
        if self._taken_over:
            raise RuntimeError(
                f"fa_hvd: parameter(s) {sorted(self._taken_over)} of this optimizer were taken over by a later "
                f"fa_hvd.DistributedOptimizer over the same model (wrapping it again removes the old hooks); "
                f"step the new optimizer")
        self._step_started = True
        self._written.clear()  # a step that failed after some buckets were written leaves nothing behind
        self._marks = {"start": time.perf_counter(), **_byte_counters(self._transport)}
        self._follow_world()

    def _follow_world(self) -> None:
        """After an elastic reset: this rank's new rank and size, the rule's preconditions checked again."""
        before = self._transport.size
        if self._transport.refresh():
            self._exchange.abandon()
            if isinstance(self._aggregator, Aggregator):
                self._aggregator.check(self._transport.size)
            if self._op_name == "Sum":
                self._scale = float(self._transport.size)
            name = rule_name(self._aggregator)
            _log.warning("fa_hvd: rank %d: now %d rank%s (was %d): aggregating with %s", self._transport.rank,
                         self._transport.size, "" if self._transport.size == 1 else "s", before, name)

    def _on_grad(self, param: torch.Tensor) -> None:
        self._start_step()
        if self._allreduce_delay[param] <= 0:
            raise AssertionError(f"{TOO_MANY_PASSES} (fa_hvd: parameter {self._parameter_names[param]!r})")
        if param.grad is not None and param.grad.requires_grad:  # Horovod's hook asserts the same, silently
            raise AssertionError(f"fa_hvd: parameter {self._parameter_names[param]!r}: its gradient is part of a "
                                 f"graph (backward(create_graph=True)); the exchange carries gradient values, not "
                                 f"graphs (Horovod's optimizer refuses it too)")
        self._allreduce_delay[param] -= 1
        if self._allreduce_delay[param] == 0:
            bucket = self._bucket_of[param]
            bucket.ready += 1
            if self._ordered:
                self._start_ordered(force=False)
            elif bucket.ready == len(bucket.params):
                self._start_bucket(bucket)

    def _start_ordered(self, force: bool) -> None:
        while self._next_ordered < len(self._buckets):
            bucket = self._buckets[self._next_ordered]
            if not force and bucket.ready < len(bucket.params):
                return
            self._start_bucket(bucket)
            self._next_ordered += 1

    def _start_bucket(self, bucket: _Bucket) -> None:
        began = time.perf_counter()
        self._marks.setdefault("first_start", began)
        bucket.started = True
        if bucket.sends_shared():
            flat = bucket.shared  # its values are the gradients'; written again only with the aggregate
        else:
            pieces = []
            for p in bucket.params:
                grad = p.grad
                if grad is None:
                    grad = torch.zeros_like(p)
                elif grad.is_sparse:
                    bucket.sparse_dims[id(p)] = grad.sparse_dim()
                    grad = grad.to_dense()
                pieces.append(grad.reshape(-1))
            flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        if flat.dtype == torch.bfloat16:
            flat = flat.float()  # Horovod's allgather has no bf16
        if self.worker_momentum is not None:
            flat = self.worker_momentum(flat, bucket.index)
        if self._gradient_transform is not None:
            flat = self._gradient_transform(flat, bucket.index, self.step_count)
        flattened = time.perf_counter()
        self._exchange.start(bucket.index, flat)
        self._marks["flatten_s"] = self._marks.get("flatten_s", 0.0) + flattened - began
        self._marks["send_s"] = self._marks.get("send_s", 0.0) + time.perf_counter() - flattened

    # -- synchronize / step ------------------------------------------------------------
    def synchronize(self) -> None:
        """Exchange every bucket, aggregate, and write the aggregate into ``.grad``.

        As in Horovod, every call exchanges what ``.grad`` holds (a second call
        without a backward pass in between exchanges the aggregate again). Ranks
        outside the process set keep their own gradients.
        """
        if not self._transport.included:
            self._synchronized = True
            return
        self._start_step()
        if self._ordered:
            self._start_ordered(force=True)
        else:
            for bucket in self._buckets:
                if not bucket.started:
                    self._start_bucket(bucket)
        if self._buckets:
            waiting = time.perf_counter()
            if self.digest is not None:
                self.digest.settle()  # the last aggregate's fingerprint is done before the exchange reuses buffers
            update = self._exchange.finish(len(self._buckets), self._aggregation_device, self.step_count)
            if self.digest is not None:
                self.digest.hold(update, self.step_count)
            if self._scale != 1.0:
                update = update * self._scale
            unflatten = time.perf_counter()
            for bucket, values in zip(self._buckets, update.split([b.numel for b in self._buckets])):
                if bucket.index not in self._written:
                    self._write_bucket(bucket, values)
            self._record_stats(waiting, unflatten)
            self.step_count += 1
        self._reset_step()
        self._synchronized = True

    def _bucket_final(self, index: int, values: torch.Tensor) -> None:
        """The exchange's word that bucket ``index``'s aggregate is final (its worker thread, while backward
        goes on): into ``.grad`` now, scaled as :meth:`synchronize` scales the whole."""
        self._write_bucket(self._buckets[index], values * self._scale if self._scale != 1.0 else values)
        self._written.add(index)

    @staticmethod
    def _write_bucket(bucket: _Bucket, values: torch.Tensor) -> None:
        """``values`` (the bucket's part of the aggregate) into its parameters' ``.grad``. Gradients that
        outlived the last step (:meth:`_Bucket.gradients_kept`) are then put into one buffer
        (:meth:`_Bucket.share_gradients`), so that the next step sends them with no copy; gradients
        set to None each step are written as they are, with no buffer kept beside them."""
        kept = bucket.gradients_kept()  # before the write: it keeps a dense gradient's tensor, replaces the rest
        offset = 0
        for p in bucket.params:
            piece = values[offset: offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += p.numel()
            if id(p) in bucket.sparse_dims:
                p.grad = piece.to_sparse(bucket.sparse_dims[id(p)])
            elif p.grad is None or p.grad.is_sparse:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)
        if kept:
            bucket.share_gradients()
        elif not bucket.sends_shared():
            bucket.shared = None  # the gradients left the buffer (set to None, replaced): none kept beside them
        bucket.written = [weakref.ref(p.grad) for p in bucket.params]

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Inside, ``step()`` does not synchronize (call ``synchronize()`` yourself first)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(STEP_AFTER_SYNCHRONIZE)
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._handles:
            raise AssertionError(ZERO_GRAD_PENDING)
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def _reset_step(self) -> None:
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        for bucket in self._buckets:
            bucket.ready, bucket.started = 0, False
            bucket.sparse_dims.clear()
        self._next_ordered = 0
        self._step_started = False

    def _record_stats(self, waiting: float, unflatten: float) -> None:
        """``stats``: the last exchange's seconds (and bytes, if the transport counts them)."""
        timings = self._exchange.timings
        done = time.perf_counter()
        stats = {
            "step": self.step_count,
            "exchange_s": timings["arrived"] - self._marks.get("first_start", waiting),
            "wait_s": timings["arrived"] - waiting,  # >= 0: the exchange stamps arrived no earlier than finish()
            "aggregate_s": done - timings["arrived"],
            "flatten_s": self._marks.get("flatten_s", 0.0),
            "send_s": self._marks.get("send_s", 0.0),
            "unflatten_s": done - unflatten,
            "phases": stage_seconds(timings),
        }
        for key, value in _byte_counters(self._transport).items():
            stats[key] = value - self._marks.get(key, 0)
        stats.update(getattr(self._exchange, "stats", {}))  # the sharded exchange's peak_bytes
        stats.update(getattr(self._aggregator, "diagnostics", {}))  # nonfinite, dropped, weights
        self.stats = stats

    def _release(self, param) -> None:
        """A later optimizer took ``param`` over: its gradient is no longer this one's."""
        self._taken_over.add(self._parameter_names[param])

    # -- state ---------------------------------------------------------------------------
    @property
    def aggregator(self):
        return self._aggregator

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def exchange(self) -> GradientExchange:
        return self._exchange

    def state_dict(self):
        state = super(self.__class__, self).state_dict()
        if isinstance(self._aggregator, Aggregator):
            state["fa_hvd_aggregator"] = self._aggregator.state_dict()
        return state

    def load_state_dict(self, state_dict):
        """Load the state (and the aggregator's); as Horovod, drop what is in flight (and the deferred
        digest's last aggregate: the ranks restart its check alike). With worker momentum, a state
        whose parameter groups have SGD momentum is refused before anything changes."""
        if self.worker_momentum is not None:
            check_single_momentum(state_dict["param_groups"], self.worker_momentum.beta)
        state_dict = dict(state_dict)
        aggregator_state = state_dict.pop("fa_hvd_aggregator", None)
        self._exchange.abandon()
        if self.digest is not None:
            self.digest.reset()
        self._reset_step()
        self._synchronized = False
        self._should_synchronize = True
        super(self.__class__, self).load_state_dict(state_dict)
        if aggregator_state is not None and isinstance(self._aggregator, Aggregator):
            self._aggregator.load_state_dict(aggregator_state)


_HOOKS: dict[int, tuple] = {}  # id(param) -> (weakref to param, weakref to optimizer, hook handle)


def _claim(optimizer, param):
    """Hook ``param`` for ``optimizer``; an earlier fa_hvd optimizer's hook on it is removed.

    The hook holds the optimizer weakly, so an optimizer that is dropped stops
    counting gradients once it is collected.
    """
    previous = _HOOKS.pop(id(param), None)
    if previous is not None and previous[0]() is param:
        previous[2].remove()
        owner = previous[1]()
        if owner is not None and owner is not optimizer:
            owner._release(param)
    ref = weakref.ref(optimizer)

    def hook(p):
        owner = ref()
        if owner is not None:
            owner._on_grad(p)

    handle = param.register_post_accumulate_grad_hook(hook)
    key = id(param)
    _HOOKS[key] = (weakref.ref(param, lambda _, key=key: _HOOKS.pop(key, None)), ref, handle)
    return handle


def stage_seconds(timings: dict, first: str = "arrived") -> dict[str, float]:
    """Seconds between consecutive ``timings`` stamps from ``first`` on (the exchange's after
    ``arrived``), each named after the stamp that ends it (e.g. ``assembled``, ``aggregated``)."""
    stamps = list(timings.items())
    start = [name for name, _ in stamps].index(first) if first in timings else len(stamps)
    return {name: at - before for (_, before), (name, at) in zip(stamps[start:], stamps[start + 1:])}


def _byte_counters(transport: Transport) -> dict[str, int]:
    """The transport's cumulative ``bytes_sent``/``bytes_received``, where it counts them."""
    return {key: getattr(transport, key) for key in ("bytes_sent", "bytes_received") if hasattr(transport, key)}


def _parameter_names(param_groups, named_parameters) -> dict:
    """Horovod's ``_parameter_names``: parameter -> name, with Horovod's checks and default names."""
    if named_parameters is None:
        return {p: f"allreduce.noname.{g}.{i}"
                for g, group in enumerate(param_groups) for i, p in enumerate(group["params"])}
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced by "
                         "model.named_parameters().")
    duplicates = _DistributedOptimizer.find_duplicates([name for name, _ in named])
    if duplicates:
        raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: "
                         f"{', '.join(sorted(duplicates))}")
    by_id = {id(p): name for name, p in named}
    params = [p for group in param_groups for p in group["params"]]
    unnamed = [i for i, p in enumerate(params) if id(p) not in by_id]
    if unnamed:
        raise ValueError(f"named_parameters was specified, but one or more model parameters were not named "
                         f"(fa_hvd: {len(unnamed)} of the optimizer's {len(params)} parameters)")
    return {p: by_id[id(p)] for p in params}


def _check_same_model(transport: Transport, param_groups, names: dict, tag: str) -> None:
    """Every rank must train the same parameters, in the same order, with the same shapes."""
    signature = [[names[p], list(p.shape), str(p.dtype), bool(p.requires_grad)]
                 for group in param_groups for p in group["params"]]
    everyone = transport.allgather_json(signature, name=tag, schema=[(str, [int], str, bool)])
    reference = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs == reference:
            continue
        if len(theirs) != len(reference):
            raise ValueError(f"fa_hvd: rank {rank} has {len(theirs)} parameters, rank 0 has {len(reference)}: "
                             f"the model differs across ranks")
        for mine, other in zip(reference, theirs):
            if mine != other:
                raise ValueError(f"fa_hvd: the model differs across ranks: parameter {mine[0]!r} is "
                                 f"{_describe(mine)} on rank 0 but {other[0]!r} {_describe(other)} on rank {rank}")


def _describe(entry) -> str:
    _, shape, dtype, requires_grad = entry
    return f"shape {list(shape)} {dtype}{'' if requires_grad else ' (frozen)'}"


def _check_groups(groups, param_groups) -> None:
    """Horovod's checks on ``groups``, and one more: every listed parameter is the optimizer's."""
    if groups is None:
        return
    if isinstance(groups, bool) or not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
        raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
    if isinstance(groups, int):
        return
    owned = {id(p) for group in param_groups for p in group["params"]}
    seen = set()
    for group in groups:
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise ValueError("groups must consist of torch.Tensor.")
            if id(p) in seen:
                raise ValueError("A parameter can only appear once in groups.")
            if id(p) not in owned:
                raise ValueError(f"groups: a tensor of shape {list(p.shape)} is not a parameter of the optimizer")
            seen.add(id(p))


def _make_buckets(param_groups, groups, bucket_bytes: int | None) -> list[_Bucket]:
    """The buckets, each on one device.

    ``groups`` as in Horovod: a list of parameter lists (one bucket each; every
    other parameter a bucket of its own) or a number of buckets of about equal
    parameter counts. Otherwise parameters are taken in reverse order (the order
    backward produces their gradients) into buckets of about ``bucket_bytes``
    (default: the model's size / 8, within 1 MiB .. 25 MiB, so that even a small
    model's communication overlaps its backward pass).
    """
    trainable = [p for group in param_groups for p in group["params"] if p.requires_grad]
    if isinstance(groups, list):
        listed = {id(p) for group in groups for p in group}
        wanted = {id(p) for p in trainable}
        layout = [[p for p in group if id(p) in wanted] for group in groups]
        layout += [[p] for p in trainable if id(p) not in listed]
    elif isinstance(groups, int) and groups > 0:
        size, extra = divmod(len(trainable), groups)
        bounds = [i * size + min(i, extra) for i in range(groups + 1)]
        layout = [trainable[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        total = sum(p.numel() * p.element_size() for p in trainable)
        limit = bucket_bytes or min(MAX_BUCKET_BYTES, max(MIN_BUCKET_BYTES, total // TARGET_BUCKETS))
        layout, current, current_bytes = [], [], 0
        for p in reversed(trainable):
            nbytes = p.numel() * p.element_size()
            if current and current_bytes + nbytes > limit:
                layout.append(current)
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += nbytes
        layout.append(current)
    by_device = []
    for params in layout:
        for device in dict.fromkeys(p.device for p in params):
            by_device.append([p for p in params if p.device == device])
    return [_Bucket(i, params) for i, params in enumerate(b for b in by_device if b)]


def _sent_dtype(buckets: list[_Bucket]) -> torch.dtype:
    """The dtype every bucket fits: the parameters' dtypes promoted, bf16 sent as fp32 (:meth:`_start_bucket`)."""
    dtypes = (torch.float32 if p.dtype == torch.bfloat16 else p.dtype for b in buckets for p in b.params)
    return functools.reduce(torch.promote_types, dtypes)


def _aggregation_device(buckets: list[_Bucket]) -> torch.device:
    """Where the gathered matrix is aggregated: the first accelerator holding parameters, else the CPU."""
    for bucket in buckets:
        if bucket.device.type != "cpu":
            return bucket.device
    return torch.device("cpu")


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    compression=None,
    backward_passes_per_step: int = 1,
    op=None,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups=None,
    sparse_as_dense: bool = False,
    process_set=None,
    *,
    aggregator: str | Callable[[torch.Tensor], torch.Tensor] = "flag",
    aggregator_params: dict | None = None,
    transport: str | Transport = "horovod",
    exchange: str | Callable[..., GradientExchange] = "allgather",
    bucket_bytes: int | None = None,
    gradient_transform: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    digest: bool | str = False,
    worker_momentum: float = 0.0,
    worker_nesterov: bool = False,
):
    """Wrap ``optimizer`` so that gradients are all-gathered and robustly aggregated.

    Takes every argument of ``hvd.DistributedOptimizer``, in its order:

    * ``compression``: Horovod's ``hvd.Compression.none`` / ``.fp16`` (or any object
      with ``compress``/``decompress``): the wire format of the exchange.
    * ``backward_passes_per_step``: local accumulation, as in Horovod.
    * ``op``: ``hvd.Average`` (default) gives the aggregate; ``hvd.Sum`` gives the
      aggregate times the world size; ``hvd.Adasum`` is refused.
    * ``gradient_predivide_factor``: allowed only with ``op=hvd.Average`` (as in
      Horovod); it divides before and multiplies after, so the result is unchanged.
    * ``num_groups`` (deprecated, as in Horovod) / ``groups``: the bucket layout (a
      number of buckets, or lists of parameters), validated as Horovod does, plus:
      every listed parameter must belong to the optimizer.
    * ``sparse_as_dense``: accepted; sparse gradients are always densified for the
      rule and written back sparse, with or without it.
    * ``process_set``: the Horovod process set whose ranks take part; ranks
      outside it step on their own gradients, as in Horovod.

    fa_hvd's own keywords: ``aggregator`` (a name for
    :func:`fa_hvd.aggregators.get`, or a callable ``(p, n) -> (n,)``),
    ``aggregator_params`` (e.g. ``{"f": 3}``), ``transport`` (``"horovod"``,
    ``"mpi"``, ``"torch"`` (torch.distributed; ``process_set`` is then a process
    group) or a :class:`~fa_hvd.comm.Transport`), ``exchange`` (a name in
    :data:`fa_hvd.exchange.EXCHANGES`: ``"allgather"``, or ``"sharded"`` for allreduce traffic and O(n)
    memory, :mod:`fa_hvd.exchange`; or a factory ``(transport, aggregator, compression,
    prefix) -> GradientExchange`` such as ``fa_hvd.exchange.replicated(3)``),
    ``bucket_bytes`` (default: automatic, see
    :func:`_make_buckets`), ``gradient_transform`` (``(flat_grad, bucket_index,
    step) -> tensor``, applied to what this rank sends; fault injection uses it; an
    object whose ``uses_collectives`` is true gets buckets in index order),
    ``digest`` (compare every rank's aggregate, :mod:`fa_hvd.exchange.digest`; off by
    default here): ``True`` stops the step on a difference with one more allgather
    and a SHA-256 of the aggregate (tens of percent of a CPU step; an ``exchange``
    factory then gets ``digest=True``); ``"deferred"`` keeps each aggregate in
    ``optimizer.digest`` (a :class:`~fa_hvd.exchange.digest.DeferredDigest`) for the
    caller's per-step control row to check one step later, with no collective of its
    own (:func:`fa_hvd.train.control.agree`; the trainer's default), ``worker_momentum``
    (``beta``, 0 by default: each rank sends ``m_t = beta m_(t-1) + g_t`` instead of its gradient,
    before ``gradient_transform``, :mod:`fa_hvd.worker_momentum`; the wrapped optimizer must have
    no SGD momentum of its own, here and in a state it loads: ``ValueError`` otherwise;
    ``worker_nesterov=True`` sends Nesterov's ``g_t + beta m_t``; ``optimizer.worker_momentum``
    holds this rank's buffers, whose
    ``state_dict()`` a per-rank checkpoint saves: they are not in the optimizer's). An
    aggregator that cannot work with the world size fails here, before training
    starts.

    ``optimizer.stats`` describes the last gradient exchange: ``step`` (its index),
    ``exchange_s`` (first bucket sent to last bucket received: communication,
    overlapping the backward pass), ``wait_s`` (how long ``synchronize()`` blocked
    for it), ``aggregate_s`` (the rule and the write-back), its parts ``phases`` (the
    exchange's own stages after the last bucket arrived, in seconds, e.g. ``assembled``
    and ``aggregated``) and ``unflatten_s`` (the write-back into ``.grad``, of the buckets the exchange did not
    hand over as they were taken: the mean's are written on its worker thread), ``flatten_s``
    (copying gradients into buckets) and ``send_s`` (handing them to the exchange),
    both inside the backward pass, the exchange's ``stats`` (allgather: ``worker_s``, its
    worker thread's seconds of bucket work beside backward, or ``overlapped_s``
    without one, :mod:`fa_hvd.exchange.allgather`; sharded: ``peak_bytes``) and, when the transport
    counts them, ``bytes_sent``/``bytes_received`` during that step; and the
    aggregator's diagnostics (:func:`fa_hvd.aggregators.base.describe`): ``nonfinite``
    and ``dropped`` (ranks), and ``weights`` (each rank's coefficient in the
    aggregate, for rules that combine rows: FA's default mode, Krum, geomed, ...);
    from the sharded exchange, when they happened, ``disputes`` and ``blamed``
    (:mod:`fa_hvd.exchange.evidence`) and, with replicas, ``repaired`` (the holders
    outvoted, per shard).
    ``optimizer.step_count`` counts completed exchanges (Horovod's state-initialising
    step in ``broadcast_optimizer_state`` is not one).
    """
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
            or backward_passes_per_step <= 0:
        raise ValueError(f"backward_passes_per_step must be > 0 (fa_hvd: got {backward_passes_per_step!r})")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning)
        if groups is None:
            groups = num_groups
    _check_groups(groups, optimizer.param_groups)
    if not isinstance(transport, Transport):
        transport = get_transport(transport, process_set)
    elif process_set is not None:
        raise ValueError("fa_hvd: pass process_set only with transport='horovod' "
                         "(a transport object carries its own process set)")
    if digest not in (False, True, "deferred"):
        raise ValueError(f"fa_hvd: digest must be False, True or 'deferred', got {digest!r}")
    momentum = WorkerMomentum(worker_momentum, worker_nesterov)
    check_single_momentum(optimizer.param_groups, momentum.beta)
    if isinstance(exchange, str) and exchange not in EXCHANGES:
        raise ValueError(f"fa_hvd: unknown exchange {exchange!r}; known: {', '.join(EXCHANGES)}")
    op, op_name = _resolve_op(op, gradient_predivide_factor)
    compression = wire_format(compression)
    if isinstance(aggregator, str):
        aggregator = get_aggregator(aggregator, **(aggregator_params or {}))
    elif aggregator_params:
        raise ValueError("fa_hvd: aggregator_params is only used with an aggregator name")
    if isinstance(aggregator, Aggregator) and transport.included:
        aggregator.check(transport.size)
    if transport.name == "horovod":
        _register_elastic_state_handler()
    cls = type(optimizer.__class__.__name__, (optimizer.__class__, RobustOptimizer),
               dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters,
               compression, backward_passes_per_step, op, op_name,
               gradient_predivide_factor, groups, sparse_as_dense, getattr(transport, "process_set", None),
               aggregator, transport, exchange, bucket_bytes, gradient_transform, digest,
               momentum if momentum.beta else None)


def _register_elastic_state_handler() -> None:
    """Make ``hvd.elastic.TorchState`` sync an fa_hvd optimizer with
    :func:`fa_hvd.broadcast_optimizer_state`, so the aggregator's state reaches workers
    that join (Horovod's registry of state handlers is its extension point)."""
    from horovod.torch.elastic import state as elastic_state

    registry = elastic_state.get_handler_registry()
    if any(kind is RobustOptimizer for kind, _ in registry):
        return

    class RobustOptimizerStateHandler(elastic_state.OptimizerStateHandler):
        def sync(self):
            from . import broadcast_optimizer_state

            self.value._follow_world()  # the new rank 0 must know it is the root
            broadcast_optimizer_state(self.value, root_rank=0)

    elastic_state.set_handler_registry([(RobustOptimizer, RobustOptimizerStateHandler), *registry])


def _resolve_op(op, gradient_predivide_factor: float):
    """Horovod's ``op`` (default ``hvd.Average`` when Horovod is there) and its name:
    ``"Average"`` (the aggregate) or ``"Sum"`` (the aggregate times the world size)."""
    try:
        import horovod.torch as hvd
    except ImportError:
        hvd = None
    if op is None:
        op = hvd.Average if hvd is not None else "Average"
    names = {"Average": "Average", "Sum": "Sum"}
    if hvd is not None:
        names.update({hvd.Average: "Average", hvd.Sum: "Sum", hvd.Adasum: "Adasum"})
    name = names.get(op)
    if name is None:
        raise ValueError(f"fa_hvd: op must be hvd.Average or hvd.Sum, got {op!r}")
    if name == "Adasum":
        raise ValueError("fa_hvd: op=hvd.Adasum is not supported: fa_hvd replaces the reduction with "
                         "a robust aggregator; use op=hvd.Average")
    if gradient_predivide_factor != 1.0 and name != "Average":
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    return op, name


def checksum(tensors: Iterable[torch.Tensor]) -> int:
    """CRC32 of the tensors' bytes, to compare parameters across ranks."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc
