"""Transport over ``torch.distributed`` (``torchrun``, DDP): Gloo on the CPU, NCCL on GPUs.

The process group is the one the launcher set up (``init_process_group`` from
``torchrun``'s environment if nobody did yet; backend NCCL when CUDA is available,
else Gloo), or any group passed in: a ``dist.new_group(ranks)`` plays the part of a
Horovod process set (ranks outside it have ``included = False`` and ``rank == -1``).

Collectives are the native ones: ``all_gather_into_tensor`` (``all_gather_single``
from torch 2.14 on, its new name; every rank gathers a
tensor of the same shape, as with the mpi4py transport: the optimizer checks the
model's shapes across ranks first), ``all_to_all_single``, ``all_reduce`` and
``broadcast``. Tensors travel on the backend's device (the CPU for Gloo, this
rank's GPU for NCCL) and come back on the caller's.

Gloo and NCCL match collectives by their order on a group, not by name. So
:meth:`TorchDistTransport.prepare` gives each named collective (each gradient
bucket) a group of its own, and buckets may start in any order; unprepared names
share the main group, in program order.

Object messages are the base class's (:mod:`.messages`: bounded, schema-checked JSON and
weights-only tensor state over the tensor collectives): no rank unpickles another's bytes.

Byte counts are the kernel's TCP counts (:mod:`.traffic`): all of Gloo's traffic;
NCCL's shared-memory, NVLink and InfiniBand transfers are not seen.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .base import Handle, Transport, channel_of, collective_timeout, fits

_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class _TorchHandle(Handle):
    def __init__(self, work, output, device, name):
        # ``output`` is held (and returned) once the backend is done with it.
        self.work, self.output, self.device, self.name = work, output, device, name


class TorchDistTransport(Transport):
    name = "torch"
    # A Work may be waited for on any thread, and collectives started on any thread: each prepared
    # name has a group of its own, so the order of its collectives is the order of the one thread
    # that starts them (an exchange's worker starts only such names).
    waits_from_any_thread = True

    def __init__(self, group=None):
        self.owns_process_group = not dist.is_initialized()
        if self.owns_process_group:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        self.group = self.process_set = group if group is not None else dist.group.WORLD
        self.included = self.group != dist.GroupMember.NON_GROUP_MEMBER
        self.ranks = dist.get_process_group_ranks(self.group) if self.included else []
        self.rank = dist.get_rank(self.group) if self.included else -1
        self.size = len(self.ranks)
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.backend = dist.get_backend(self.group) if self.included else dist.get_backend()
        self.device = (torch.device("cuda", self.local_rank % torch.cuda.device_count()) if self.backend == "nccl"
                       else torch.device("cpu"))
        self.timeout = collective_timeout()
        self._channels: dict[str, object] = {}

    def close(self) -> None:
        """Destroy the process groups when this transport started them. A process that exits with
        Gloo's groups alive can abort at interpreter teardown ("terminate called without an active
        exception": Gloo's threads still hold work whose tensors need the interpreter)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._channels.clear()

    def prepare(self, names: list[str]) -> None:
        for name in names:
            if name not in self._channels:
                self._channels[name] = dist.new_group(self.ranks, use_local_synchronization=True)

    def has_channel(self, name: str) -> bool:
        return channel_of(name) in self._channels

    def _group(self, name: str):
        return self._channels.get(channel_of(name), self.group)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.device).contiguous()

    def allgather_async(self, tensor: torch.Tensor, name: str, out: torch.Tensor | None = None) -> Handle:
        send = self._on_device(tensor)
        shape = (self.size * send.shape[0],) + tuple(send.shape[1:])
        output = out if fits(out, shape, send.dtype, self.device) else torch.empty(shape, dtype=send.dtype,
                                                                                     device=self.device)
        work = _ALL_GATHER(output, send, group=self._group(name), async_op=True)
        return _TorchHandle(work, output, tensor.device, name)

    def wait(self, handle: Handle) -> torch.Tensor:
        self.wait_for(handle.work.is_completed, handle.name)
        handle.work.wait()
        return handle.output.to(handle.device)

    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str,
                       received: list[int] | None = None) -> Handle:
        group = self._group(name)
        send = self._on_device(tensor)
        if received is None:
            counts = torch.tensor(splits, dtype=torch.int64, device=self.device)
            theirs = torch.empty_like(counts)
            dist.all_to_all_single(theirs, counts, group=group)
            received = theirs.tolist()
        output = torch.empty((sum(received),) + tuple(send.shape[1:]), dtype=send.dtype, device=self.device)
        work = dist.all_to_all_single(output, send, output_split_sizes=list(received),
                                      input_split_sizes=list(splits), group=group, async_op=True)
        return _TorchHandle(work, output, tensor.device, name)

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        buffer = self._on_device(tensor)
        dist.broadcast(buffer, src=self.ranks[root], group=self.group)
        if buffer is not tensor:
            with torch.no_grad():
                tensor.copy_(buffer)
        return tensor

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        total = tensor.detach().to(self.device, copy=True).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.to(tensor.device)
