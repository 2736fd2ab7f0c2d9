"""Transport over plain MPI through mpi4py (``mpirun``), for clusters without Horovod.

Tensors travel as host buffers; CUDA tensors are staged through the CPU. Every
rank must gather tensors of the same shape (the optimizer checks the model's
shapes across ranks before the first step).

MPI requires collectives on one communicator to start in the same order on every
rank. :meth:`MPITransport.prepare` gives each named allgather (each gradient
bucket) a duplicate communicator of its own, so buckets may start in whatever
order their gradients become ready; unprepared names share the main one.
"""

from __future__ import annotations

import os

import torch

from .base import Handle, Transport, channel_of, collective_timeout, fits


class _MPIHandle(Handle):
    def __init__(self, request, send, recv, device, dtype, shape):
        # ``send`` is held so its buffer outlives the non-blocking call.
        self.request, self.send, self.recv = request, send, recv
        self.device, self.dtype, self.shape = device, dtype, shape


class MPITransport(Transport):
    name = "mpi"

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = collective_timeout()
        self.local_rank = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", 0)))
        self._channels: dict[str, object] = {}
        self._abandoned: list[_MPIHandle] = []  # kept alive until MPI is done with their buffers

    def prepare(self, names: list[str]) -> None:
        for name in names:
            if name not in self._channels:
                self._channels[name] = self.comm.Dup()

    def has_channel(self, name: str) -> bool:
        return channel_of(name) in self._channels

    def abandon(self, handle: Handle) -> None:
        self._abandoned.append(handle)

    def allgather_async(self, tensor: torch.Tensor, name: str, out: torch.Tensor | None = None) -> Handle:
        # Sent as raw bytes: MPI has no fp16/bf16 datatype, bytes need none.
        send = tensor.detach().to("cpu").contiguous().reshape(tensor.shape[0], -1).view(torch.uint8)
        shape = (self.size * tensor.shape[0],) + tuple(tensor.shape[1:])
        if fits(out, shape, tensor.dtype, torch.device("cpu")) and tensor.device.type == "cpu" and out.is_contiguous():
            recv = out.view(torch.uint8).reshape(self.size * send.shape[0], send.shape[1])
        else:
            recv = torch.empty((self.size * send.shape[0], send.shape[1]), dtype=torch.uint8)
        self._abandoned = [h for h in self._abandoned if not h.request.Test()]
        request = self._channels.get(channel_of(name), self.comm).Iallgather(send.numpy(), recv.numpy())
        return _MPIHandle(request, send, recv, tensor.device, tensor.dtype, shape)

    def wait(self, handle: Handle) -> torch.Tensor:
        self.wait_for(handle.request.Test, "allgather")
        return handle.recv.view(handle.dtype).reshape(handle.shape).to(handle.device)

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        buf = tensor.detach().to("cpu").contiguous()
        self.comm.Bcast(buf.numpy(), root=root)
        with torch.no_grad():
            tensor.copy_(buf)
        return tensor

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        from mpi4py import MPI

        send = tensor.detach().to("cpu").contiguous()
        recv = torch.empty_like(send)
        self.comm.Allreduce(send.numpy(), recv.numpy(), op=MPI.SUM)
        return recv.to(tensor.device)

    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str,
                       received: list[int] | None = None) -> Handle:
        from mpi4py import MPI

        # Raw bytes, as allgather; counted in rows (one MPI datatype of a row's bytes).
        rows = tensor.detach().to("cpu").contiguous().reshape(tensor.shape[0], -1)
        row = MPI.BYTE.Create_contiguous(max(1, rows.shape[1] * rows.element_size())).Commit()
        send = rows.view(torch.uint8).reshape(-1)
        channel = self._channels.get(channel_of(name), self.comm)  # prepared names may start in any order
        if received is None:
            counts = torch.tensor(splits, dtype=torch.int64)
            theirs = torch.empty_like(counts)
            channel.Alltoall([counts.numpy(), MPI.INT64_T], [theirs.numpy(), MPI.INT64_T])
            received = theirs.tolist()
        shape = (sum(received),) + tuple(tensor.shape[1:])
        recv = torch.empty(shape[0] * rows.shape[1] * rows.element_size(), dtype=torch.uint8)
        self._abandoned = [h for h in self._abandoned if not h.request.Test()]
        request = channel.Ialltoallv(
            [send.numpy(), (list(splits), _displacements(splits)), row],
            [recv.numpy(), (list(received), _displacements(received)), row],
        )
        row.Free()  # MPI keeps it alive until the operation completes
        return _MPIHandle(request, send, recv, tensor.device, tensor.dtype, shape)


def _displacements(counts: list[int]) -> list[int]:
    """Offsets of consecutive blocks of ``counts``."""
    offsets, total = [], 0
    for count in counts:
        offsets.append(total)
        total += count
    return offsets
