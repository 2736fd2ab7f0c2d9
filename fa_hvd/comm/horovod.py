"""Transport over Horovod (``horovodrun``, Gloo or MPI controller).

Waiting is Horovod's: its stall inspector warns on rank 0 after
``HOROVOD_STALL_CHECK_TIME_SECONDS`` (60), naming the ranks that did not submit,
and shuts the job down only when ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` is set
(under MPI); see :func:`fa_hvd.comm.base.collective_timeout` for fa_hvd's own bound.
When Horovod gives up on a peer (``HorovodInternalError``), each rank logs who does not
answer its roll call (:mod:`fa_hvd.comm.rollcall`) before the error goes on.
"""

from __future__ import annotations

import horovod.torch as hvd
from horovod.torch import mpi_ops
import torch
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

from .base import Handle, Transport, collective_timeout


class _HorovodHandle(Handle):
    def __init__(self, handle, name):
        self.handle, self.name = handle, name


class HorovodTransport(Transport):
    name = "horovod"
    passthrough_errors = (HorovodInternalError, HostsUpdatedInterrupt)
    waits_from_any_thread = True  # Horovod's handle table is locked; its background thread does the work
    # allgathers started together gain nothing here (p = 2, 5.6M fp32 values per rank into kept outputs: 4 pieces
    # 32-36 ms, one 24-34; the sharded FA step 250-273 ms with one against 271-290 with 4, three pairs)
    gather_pieces = 1

    def __init__(self, process_set=None):
        if not hvd.is_initialized():
            hvd.init()
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        self.included = bool(self.process_set.included())
        self.rank = self.process_set.rank() if self.included else -1
        self.size = self.process_set.size()
        self.local_rank = hvd.local_rank()
        self.timeout = collective_timeout()

    def refresh(self) -> bool:
        """Re-read rank and size from the process set (they change on an elastic reset)."""
        if not self.included:
            return False
        rank, size = self.process_set.rank(), self.process_set.size()
        changed = (rank, size) != (self.rank, self.size)
        self.rank, self.size = rank, size
        return changed

    def allgather_async(self, tensor: torch.Tensor, name: str, out: torch.Tensor | None = None) -> Handle:
        if out is None:
            return _HorovodHandle(hvd.allgather_async(tensor, name=name, process_set=self.process_set), name)
        # hvd.allgather_async is this call with a fresh output (tensor.new()); Horovod resizes it to fit
        return _HorovodHandle(mpi_ops._allgather_async(tensor, out, name, self.process_set), name)

    def wait(self, handle: Handle) -> torch.Tensor:
        self.wait_for(lambda: hvd.poll(handle.handle), handle.name)
        try:
            result = hvd.synchronize(handle.handle)
        except HorovodInternalError:  # Gloo or MPI gave up on a peer (its timeout, a reset connection)
            self.report_failure(handle.name)
            raise
        return result[0] if isinstance(result, tuple) else result  # alltoall: (rows, received splits)

    def _global_rank(self, rank: int) -> int:
        """Horovod's roots are global ranks, even within a process set."""
        return self.process_set.ranks[rank] if self.process_set.ranks else rank

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        return hvd.broadcast_(tensor, root_rank=self._global_rank(root), name=name, process_set=self.process_set)

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return hvd.allreduce(tensor, op=hvd.Sum, name=name, process_set=self.process_set)

    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str,
                       received: list[int] | None = None) -> Handle:
        splits = torch.tensor(splits, dtype=torch.int32)
        return _HorovodHandle(hvd.alltoall_async(tensor, splits=splits, name=name, process_set=self.process_set), name)
