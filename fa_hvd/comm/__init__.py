"""Transports: the collectives fa_hvd needs, over Horovod or plain MPI.

``get_transport("horovod")`` (default; Gloo or MPI underneath, as Horovod was
launched) or ``get_transport("mpi")`` (mpi4py, launched with ``mpirun``). Both
implement :class:`~fa_hvd.comm.base.Transport`.
"""

from __future__ import annotations

from .base import Handle, Transport

TRANSPORTS = ("horovod", "mpi")


def get_transport(name: str = "horovod", **kwargs) -> Transport:
    """Initialise (if needed) and return the transport ``name``."""
    if name == "horovod":
        from .horovod import HorovodTransport

        return HorovodTransport(**kwargs)
    if name == "mpi":
        from .mpi import MPITransport

        return MPITransport(**kwargs)
    raise ValueError(f"unknown transport {name!r}; known: {', '.join(TRANSPORTS)}")


__all__ = ["Transport", "Handle", "get_transport", "TRANSPORTS"]
