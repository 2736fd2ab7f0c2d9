"""Transport over Horovod (``horovodrun``, Gloo or MPI controller)."""

from __future__ import annotations

import pickle

import horovod.torch as hvd
import torch

from .base import Handle, Transport


class _HorovodHandle(Handle):
    def __init__(self, handle):
        self.handle = handle


class HorovodTransport(Transport):
    name = "horovod"

    def __init__(self, process_set=None):
        if not hvd.is_initialized():
            hvd.init()
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        self.rank = self.process_set.rank()
        self.size = self.process_set.size()
        self.local_rank = hvd.local_rank()

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Handle:
        return _HorovodHandle(hvd.allgather_async(tensor, name=name, process_set=self.process_set))

    def wait(self, handle: Handle) -> torch.Tensor:
        return hvd.synchronize(handle.handle)

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        return hvd.broadcast_(tensor, root_rank=root, name=name, process_set=self.process_set)

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return hvd.allreduce(tensor, op=hvd.Sum, name=name, process_set=self.process_set)

    def allgather_object(self, obj, name: str) -> list:
        # Horovod's own allgather_object takes no process set; pickle through allgather.
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = hvd.allgather(torch.tensor([payload.numel()]), name=f"{name}.sizes", process_set=self.process_set)
        data = hvd.allgather(payload, name=name, process_set=self.process_set)
        pieces = torch.split(data, sizes.tolist())
        return [pickle.loads(piece.numpy().tobytes()) for piece in pieces]
