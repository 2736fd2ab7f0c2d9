"""Transports: the collectives fa_hvd needs, over Horovod or plain MPI.

``get_transport("horovod")`` (default; Gloo or MPI underneath, as Horovod was
launched) or ``get_transport("mpi")`` (mpi4py, launched with ``mpirun``). Both
implement :class:`~fa_hvd.comm.base.Transport`.
"""

from __future__ import annotations

from .base import Handle, NoCompression, Transport

TRANSPORTS = ("horovod", "mpi")


def get_transport(name: str = "horovod", process_set=None) -> Transport:
    """Initialise (if needed) and return the transport ``name``.

    ``process_set`` (a Horovod process set) is only for ``"horovod"``; the mpi4py
    transport always spans the whole MPI world.
    """
    if name == "horovod":
        from .horovod import HorovodTransport

        return HorovodTransport(process_set)
    if name == "mpi":
        if process_set is not None:
            raise ValueError("fa_hvd: pass process_set only with transport='horovod' "
                             "(the mpi transport spans the whole MPI world)")
        from .mpi import MPITransport

        return MPITransport()
    raise ValueError(f"unknown transport {name!r}; known: {', '.join(TRANSPORTS)}")


__all__ = ["Transport", "Handle", "NoCompression", "get_transport", "TRANSPORTS"]
