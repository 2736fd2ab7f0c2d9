"""Transport over Horovod (``horovodrun``, Gloo or MPI controller).

A rank that hangs would leave the others waiting in a collective forever. Unless
the environment (or ``horovodrun --stall-check-*``) says otherwise, fa_hvd turns on
Horovod's stall inspector before ``hvd.init()``: a warning after
``HOROVOD_STALL_CHECK_TIME_SECONDS`` (60) and a shutdown, naming the ranks that
did not submit, after ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` (300).
"""

from __future__ import annotations

import os
import pickle

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

from .base import Handle, Transport, collective_timeout, wait_until


def set_stall_defaults(environ=os.environ) -> None:
    """Turn on Horovod's stall shutdown unless already configured (call before ``hvd.init``).

    The warning time is capped at the shutdown time (Horovod ignores a shutdown
    time below it).
    """
    shutdown = environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "300")
    environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(min(60, int(shutdown))))


class _HorovodHandle(Handle):
    def __init__(self, handle, name):
        self.handle, self.name = handle, name


class HorovodTransport(Transport):
    name = "horovod"
    passthrough_errors = (HorovodInternalError, HostsUpdatedInterrupt)

    def __init__(self, process_set=None):
        if not hvd.is_initialized():
            set_stall_defaults()
            hvd.init()
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        self.rank = self.process_set.rank()
        self.size = self.process_set.size()
        self.local_rank = hvd.local_rank()
        self.timeout = collective_timeout()

    def refresh(self) -> bool:
        """Re-read rank and size from the process set (they change on an elastic reset)."""
        rank, size = self.process_set.rank(), self.process_set.size()
        changed = (rank, size) != (self.rank, self.size)
        self.rank, self.size = rank, size
        return changed

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Handle:
        return _HorovodHandle(hvd.allgather_async(tensor, name=name, process_set=self.process_set), name)

    def wait(self, handle: Handle) -> torch.Tensor:
        wait_until(lambda: hvd.poll(handle.handle), self.timeout, f"allgather {handle.name!r}")
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
