"""Transports: the collectives fa_hvd needs, over Horovod, plain MPI or torch.distributed.

``get_transport("horovod")`` (default; Gloo or MPI underneath, as Horovod was
launched), ``get_transport("mpi")`` (mpi4py, launched with ``mpirun``) or
``get_transport("torch")`` (``torch.distributed``: ``torchrun``, DDP; Gloo or NCCL).
All implement :class:`~fa_hvd.comm.base.Transport`.
"""

from __future__ import annotations

from .base import Handle, NoCompression, Transport, wire_format

TRANSPORTS = ("horovod", "mpi", "torch")


def get_transport(name: str = "horovod", process_set=None) -> Transport:
    """Initialise (if needed) and return the transport ``name``.

    ``process_set``: a Horovod process set for ``"horovod"``, a process group
    (``dist.new_group``) for ``"torch"``; the mpi4py transport always spans the whole
    MPI world.
    """
    if name == "horovod":
        from .horovod import HorovodTransport

        return HorovodTransport(process_set)
    if name == "torch":
        from .torchdist import TorchDistTransport

        return TorchDistTransport(process_set)
    if name == "mpi":
        if process_set is not None:
            raise ValueError("fa_hvd: pass process_set only with transport='horovod' or 'torch' "
                             "(the mpi transport spans the whole MPI world)")
        from .mpi import MPITransport

        return MPITransport()
    raise ValueError(f"unknown transport {name!r}; known: {', '.join(TRANSPORTS)}")


__all__ = ["Transport", "Handle", "NoCompression", "get_transport", "wire_format", "TRANSPORTS"]
