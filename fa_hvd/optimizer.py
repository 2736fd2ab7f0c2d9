"""``fa_hvd.DistributedOptimizer``: Horovod's optimizer wrapper with robust aggregation.

Where ``hvd.DistributedOptimizer`` all-reduces gradients, this wrapper
all-gathers them and every rank computes the same robust aggregate:

1. Gradient hooks (``register_post_accumulate_grad_hook``) count the backward
   passes of each parameter. When every parameter of a bucket has seen
   ``backward_passes_per_step`` passes, the bucket is flattened (in the wire dtype:
   fp32 for bf16, or what ``compression`` makes of it) and its allgather starts,
   so communication overlaps the rest of the backward pass. Buckets start in a
   fixed order on every rank (bucket ``i`` only after ``0..i-1``), which plain MPI
   needs.
2. ``synchronize()`` starts any bucket still waiting (parameters that got no
   gradient send zeros), waits, concatenates the buckets into one ``(p, n)``
   matrix, runs the aggregator once over the whole gradient (FA needs the whole
   vector) and writes the ``(n,)`` result back into each ``.grad``.
3. ``step()`` synchronizes unless inside ``skip_synchronize()``, then steps.

Every rank aggregates the same gathered matrix with the same deterministic
kernels, so honest ranks hold bit-identical parameters (on identical hardware
and thread counts).

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
import itertools
import logging
import os
import zlib
from typing import Callable, Iterable

import torch

from .aggregators import Aggregator, get as get_aggregator
from .comm import Transport, get_transport

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024  # Horovod's default fusion threshold
_instances = itertools.count()  # same creation order on every rank -> same collective names
_log = logging.getLogger("fa_hvd")


class _Bucket:
    """A group of parameters whose gradients travel in one allgather."""

    def __init__(self, index: int, params: list[torch.nn.Parameter]):
        self.index = index
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.handle = None
        self.ctx = None


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class at run time (as Horovod does)."""

    def __init__(
        self,
        params,
        named_parameters,
        aggregator: Callable[[torch.Tensor], torch.Tensor],
        transport: Transport,
        compression,
        backward_passes_per_step: int,
        op_name: str,
        groups,
        sparse_as_dense: bool,
        bucket_bytes: int,
        gradient_transform: Callable[[torch.Tensor, int, int], torch.Tensor] | None,
    ):
        super(self.__class__, self).__init__(params)
        self._op_name = op_name
        self._transport = transport
        self._prefix = f"fa_hvd.opt{next(_instances)}"
        self._aggregator = aggregator
        self._compression = compression
        self._passes = backward_passes_per_step
        self._scale = float(transport.size) if op_name == "Sum" else 1.0
        self._sparse_as_dense = sparse_as_dense
        self._gradient_transform = gradient_transform
        self._names = _parameter_names(self.param_groups, named_parameters)
        if os.environ.get("HOROVOD_ELASTIC") != "1":
            _check_same_model(self._transport, self.param_groups, self._names, f"{self._prefix}.model")
        self._buckets = _make_buckets(self.param_groups, groups, bucket_bytes)
        self._bucket_of = {id(p): b for b in self._buckets for p in b.params}
        self._pass_count = {id(p): 0 for b in self._buckets for p in b.params}
        self._ready = [0] * len(self._buckets)
        self._next_bucket = 0
        self._step_started = False
        self._synchronized = False
        self._skip_synchronize = False
        self.step_count = 0
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad) for b in self._buckets for p in b.params
        ]
        # Horovod's broadcast_optimizer_state initialises an empty optimizer state by
        # stepping the inner optimizer of its own DistributedOptimizer (recognised by
        # ``optimizer.__module__``), with no gradient exchange. This optimizer answers
        # that test too, so that zero step (also run by elastic's TorchState.sync) never
        # exchanges or counts as a step.
        self.__module__ = "horovod.torch.optimizer"

    # -- hooks and buckets -----------------------------------------------------------
    def _start_step(self) -> None:
        """Once per step, before its first collective: follow an elastic change of the world."""
        if self._step_started:
            return
        self._step_started = True
        before = self._transport.size
        if self._transport.refresh():
            if isinstance(self._aggregator, Aggregator):
                self._aggregator.check(self._transport.size)
            if self._op_name == "Sum":
                self._scale = float(self._transport.size)
            name = getattr(self._aggregator, "name", getattr(self._aggregator, "__name__", repr(self._aggregator)))
            _log.warning("fa_hvd: rank %d: now %d rank%s (was %d): aggregating with %s", self._transport.rank,
                         self._transport.size, "" if self._transport.size == 1 else "s", before, name)

    def _on_grad(self, param: torch.Tensor) -> None:
        self._start_step()
        key = id(param)
        self._pass_count[key] += 1
        if self._pass_count[key] > self._passes:
            raise RuntimeError(
                f"fa_hvd: gradient of {self._names[key]!r} computed {self._pass_count[key]} times "
                f"before step(); increase backward_passes_per_step (now {self._passes}) or call "
                f"step()/synchronize() in between"
            )
        if self._pass_count[key] == self._passes:
            bucket = self._bucket_of[key]
            self._ready[bucket.index] += 1
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next_bucket < len(self._buckets):
            bucket = self._buckets[self._next_bucket]
            if not force and self._ready[bucket.index] < len(bucket.params):
                return
            self._launch(bucket)
            self._next_bucket += 1

    def _launch(self, bucket: _Bucket) -> None:
        flat = torch.cat([self._dense_grad(p).reshape(-1) for p in bucket.params])
        if flat.dtype == torch.bfloat16:
            flat = flat.float()  # Horovod's allgather has no bf16
        if self._gradient_transform is not None:
            flat = self._gradient_transform(flat, bucket.index, self.step_count)
        wire, bucket.ctx = self._compression.compress(flat)
        bucket.handle = self._transport.allgather_async(
            wire.reshape(1, -1), name=f"{self._prefix}.bucket{bucket.index}"
        )

    def _dense_grad(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p)
        if p.grad.is_sparse:
            if not self._sparse_as_dense:
                raise ValueError(
                    f"fa_hvd: parameter {self._names[id(p)]!r} has a sparse gradient; robust "
                    f"aggregation needs dense gradients, pass sparse_as_dense=True"
                )
            return p.grad.to_dense()
        return p.grad

    # -- synchronize / step ------------------------------------------------------------
    def synchronize(self) -> None:
        """Gather every bucket, aggregate, and write the aggregate into ``.grad``."""
        if self._synchronized:
            return
        self._start_step()
        self._launch_ready(force=True)
        gathered = []
        for bucket in self._buckets:
            try:
                rows = self._transport.wait(bucket.handle)
            except self._transport.passthrough_errors as exc:
                exc.add_note(f"fa_hvd: rank {self._transport.rank}: in the gradient exchange at step "
                             f"{self.step_count} (bucket {bucket.index})")
                raise
            except Exception as exc:
                raise RuntimeError(
                    f"fa_hvd: rank {self._transport.rank}: the gradient exchange failed at step "
                    f"{self.step_count} (bucket {bucket.index}): {exc}"
                ) from exc
            gathered.append(self._compression.decompress(rows, bucket.ctx))
            bucket.handle = bucket.ctx = None
        if gathered:
            G = torch.cat(gathered, dim=1) if len(gathered) > 1 else gathered[0]
            update = self._aggregator(G)
            if self._scale != 1.0:
                update = update * self._scale
            offset = 0
            for bucket in self._buckets:
                for p in bucket.params:
                    piece = update[offset : offset + p.numel()].view_as(p).to(p.dtype)
                    offset += p.numel()
                    if p.grad is None or p.grad.is_sparse:
                        p.grad = piece.clone()
                    else:
                        p.grad.copy_(piece)
        self._reset_counts()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Inside, ``step()`` does not synchronize (call ``synchronize()`` yourself first)."""
        self._skip_synchronize = True
        try:
            yield
        finally:
            self._skip_synchronize = False

    def step(self, closure=None):
        if not self._skip_synchronize:
            self.synchronize()
        self._synchronized = False
        self.step_count += 1
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._next_bucket and not self._synchronized:
            raise RuntimeError(
                "fa_hvd: zero_grad() called after backward() but before step() or synchronize(); "
                "gradients are in flight"
            )
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def _reset_counts(self) -> None:
        for key in self._pass_count:
            self._pass_count[key] = 0
        self._ready = [0] * len(self._buckets)
        self._next_bucket = 0
        self._step_started = False
        for bucket in self._buckets:
            bucket.handle = bucket.ctx = None

    # -- state ---------------------------------------------------------------------------
    @property
    def aggregator(self):
        return self._aggregator

    def state_dict(self):
        state = super(self.__class__, self).state_dict()
        if isinstance(self._aggregator, Aggregator):
            state["fa_hvd_aggregator"] = self._aggregator.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        aggregator_state = state_dict.pop("fa_hvd_aggregator", None)
        self._reset_counts()  # as Horovod: what was in flight is dropped (elastic restore does this)
        self._synchronized = False
        super(self.__class__, self).load_state_dict(state_dict)
        if aggregator_state is not None and isinstance(self._aggregator, Aggregator):
            self._aggregator.load_state_dict(aggregator_state)


class _NoCompression:
    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


def _parameter_names(param_groups, named_parameters) -> dict[int, str]:
    params = [p for group in param_groups for p in group["params"]]
    if named_parameters is None:
        return {
            id(p): f"param.{g}.{i}" for g, group in enumerate(param_groups) for i, p in enumerate(group["params"])
        }
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError("fa_hvd: named_parameters must be a sequence of (name, parameter) tuples")
    names = [name for name, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"fa_hvd: named_parameters has duplicate names: {duplicates}")
    by_id = {id(p): name for name, p in named}
    unnamed = [i for i, p in enumerate(params) if id(p) not in by_id]
    if unnamed:
        raise ValueError(
            f"fa_hvd: named_parameters was given but {len(unnamed)} optimizer parameter(s) are not in it"
        )
    return {id(p): by_id[id(p)] for p in params}


def _check_same_model(transport: Transport, param_groups, names: dict[int, str], tag: str) -> None:
    """Every rank must train the same parameters, in the same order, with the same shapes."""
    signature = [
        (names[id(p)], tuple(p.shape), str(p.dtype), bool(p.requires_grad))
        for group in param_groups
        for p in group["params"]
    ]
    everyone = transport.allgather_object(signature, name=tag)
    reference = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs == reference:
            continue
        if len(theirs) != len(reference):
            raise ValueError(
                f"fa_hvd: rank {rank} has {len(theirs)} parameters, rank 0 has {len(reference)}: "
                f"the model differs across ranks"
            )
        for mine, other in zip(reference, theirs):
            if mine != other:
                raise ValueError(
                    f"fa_hvd: the model differs across ranks: parameter {mine[0]!r} is "
                    f"{_describe(mine)} on rank 0 but {other[0]!r} {_describe(other)} on rank {rank}"
                )


def _describe(entry) -> str:
    _, shape, dtype, requires_grad = entry
    return f"shape {list(shape)} {dtype}{'' if requires_grad else ' (frozen)'}"


def _make_buckets(param_groups, groups, bucket_bytes: int) -> list[_Bucket]:
    """Buckets in reverse parameter order (the order gradients become ready)."""
    trainable = [p for group in param_groups for p in group["params"] if p.requires_grad]
    if isinstance(groups, (list, tuple)):
        listed = {id(p) for group in groups for p in group}
        layout = [[p for p in group if p.requires_grad] for group in groups]
        layout += [[p] for p in trainable if id(p) not in listed]
        layout = [group for group in reversed(layout) if group]
    elif isinstance(groups, int) and groups > 0:
        size = -(-len(trainable) // groups)
        ordered = list(reversed(trainable))
        layout = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    else:
        layout, current, current_bytes = [], [], 0
        for p in reversed(trainable):
            nbytes = p.numel() * p.element_size()
            if current and current_bytes + nbytes > bucket_bytes:
                layout.append(current)
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += nbytes
        if current:
            layout.append(current)
    return [_Bucket(i, params) for i, params in enumerate(layout)]


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
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    gradient_transform: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
):
    """Wrap ``optimizer`` so that gradients are all-gathered and robustly aggregated.

    Takes every keyword of ``hvd.DistributedOptimizer``:

    * ``compression``: Horovod's ``hvd.Compression.none`` / ``.fp16`` (or any object
      with ``compress``/``decompress``): the wire format of the allgather.
    * ``backward_passes_per_step``: local accumulation, as in Horovod.
    * ``op``: ``hvd.Average`` (default) gives the aggregate; ``hvd.Sum`` gives the
      aggregate times the world size; ``hvd.Adasum`` is refused.
    * ``gradient_predivide_factor``: allowed only with ``op=hvd.Average`` (as in
      Horovod); it divides before and multiplies after, so the result is unchanged.
    * ``num_groups`` / ``groups``: the bucket layout (a number of buckets, or lists
      of parameters); otherwise buckets of ``bucket_bytes``.
    * ``sparse_as_dense``: sparse gradients are densified (required for them).
    * ``process_set``: the Horovod process set whose ranks take part.

    fa_hvd's own keywords: ``aggregator`` (a name for
    :func:`fa_hvd.aggregators.get`, or a callable ``(p, n) -> (n,)``),
    ``aggregator_params`` (e.g. ``{"f": 3}``), ``transport`` (``"horovod"``,
    ``"mpi"`` or a :class:`~fa_hvd.comm.Transport`), ``gradient_transform``
    (``(flat_grad, bucket_index, step) -> tensor``, applied to what this rank
    sends; fault injection uses it). An aggregator that cannot work with the world size
    fails here, before training starts.
    """
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
            or backward_passes_per_step < 1:
        raise ValueError(f"fa_hvd: backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
    if not isinstance(transport, Transport):
        transport = get_transport(transport, process_set)
    elif process_set is not None:
        raise ValueError("fa_hvd: pass process_set only with transport='horovod' "
                         "(a transport object carries its own process set)")
    op_name = _op_name(op, gradient_predivide_factor)
    if isinstance(aggregator, str):
        aggregator = get_aggregator(aggregator, **(aggregator_params or {}))
    elif aggregator_params:
        raise ValueError("fa_hvd: aggregator_params is only used with an aggregator name")
    if isinstance(aggregator, Aggregator):
        aggregator.check(transport.size)
    if num_groups and groups is None:
        groups = num_groups
    cls = type(
        optimizer.__class__.__name__,
        (optimizer.__class__,),
        dict(_DistributedOptimizer.__dict__),
    )
    return cls(
        optimizer.param_groups,
        named_parameters,
        aggregator,
        transport,
        compression if compression is not None else _NoCompression,
        backward_passes_per_step,
        op_name,
        groups,
        sparse_as_dense,
        bucket_bytes,
        gradient_transform,
    )


def _op_name(op, gradient_predivide_factor: float) -> str:
    """Horovod's ``op``: ``"Average"`` (the aggregate) or ``"Sum"`` (the aggregate times the world size)."""
    if op is None:
        name = "Average"
    else:
        import horovod.torch as hvd

        names = {hvd.Average: "Average", hvd.Sum: "Sum", hvd.Adasum: "Adasum"}
        name = names.get(op)
        if name is None:
            raise ValueError(f"fa_hvd: op must be hvd.Average or hvd.Sum, got {op!r}")
    if name == "Adasum":
        raise ValueError("fa_hvd: op=hvd.Adasum is not supported: fa_hvd replaces the reduction with "
                         "a robust aggregator; use op=hvd.Average")
    if gradient_predivide_factor != 1.0 and name != "Average":
        raise ValueError("fa_hvd: gradient_predivide_factor not supported with op != Average")
    return name


def checksum(tensors: Iterable[torch.Tensor]) -> int:
    """CRC32 of the tensors' bytes, to compare parameters across ranks."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc
