"""The transport interface: allgather (async), broadcast and small allreduces.

Tensors are gathered along dim 0, so gathering a ``(1, n)`` row from each of
``size`` ranks gives ``(size, n)`` in rank order on every rank. Horovod has no
bfloat16 allgather, so callers send bf16 as fp32 or fp16.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

TIMEOUT_ENV = "FA_HVD_COLLECTIVE_TIMEOUT_SECONDS"


def collective_timeout(environ=os.environ) -> float | None:
    """Seconds a rank waits for a collective before giving up (None: forever).

    ``FA_HVD_COLLECTIVE_TIMEOUT_SECONDS`` if set (0 = forever); otherwise Horovod's
    stall shutdown time plus 30 s, a backstop for controllers whose stall inspector
    does not shut the job down (Gloo in Horovod 0.28.1).
    """
    if TIMEOUT_ENV in environ:
        value = float(environ[TIMEOUT_ENV])
    else:
        value = float(environ.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "300")) + 30
    return value if value > 0 else None


def wait_until(done: Callable[[], bool], timeout: float | None, what: str) -> None:
    """Poll ``done`` with a growing sleep (up to 10 ms); raise ``TimeoutError`` past ``timeout``."""
    if timeout is None or done():
        return
    deadline = time.monotonic() + timeout
    pause = 1e-5
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no answer from every rank within {timeout:.0f} s "
                               f"(a rank is hung or dead; {TIMEOUT_ENV} sets the limit)")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)


class Handle:
    """An allgather in flight; :meth:`Transport.wait` returns its result."""


class Transport:
    """Collectives over a fixed group of ranks.

    ``passthrough_errors`` are the exception types that must leave the optimizer
    unchanged (Horovod's elastic mode resets on them). ``refresh()`` re-reads rank
    and size after the group changed (an elastic reset) and says whether they did.
    """

    name = "transport"
    rank: int
    size: int
    local_rank: int
    passthrough_errors: tuple[type[BaseException], ...] = ()

    def refresh(self) -> bool:
        return False

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Handle:
        raise NotImplementedError

    def wait(self, handle: Handle) -> torch.Tensor:
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.wait(self.allgather_async(tensor, name))

    def broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> torch.Tensor:
        """Overwrite ``tensor`` in place with ``root``'s copy."""
        raise NotImplementedError

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (small tensors: counters, checks)."""
        raise NotImplementedError

    def allgather_object(self, obj, name: str) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        raise NotImplementedError
