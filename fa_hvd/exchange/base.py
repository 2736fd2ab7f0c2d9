"""What every gradient exchange shares: the optimizer's plug-in interface, failure reports, the rule's name."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, NoReturn

import torch

from ..aggregators import native
from ..comm.base import fits

_log = logging.getLogger("fa_hvd")


class GradientExchange:
    """How the buckets' gradients travel and become one aggregate: the optimizer's plug-in point.

    The optimizer calls :meth:`start` once per bucket and step, as soon as the
    bucket's gradient is ready (in any order unless the optimizer was told
    otherwise), then :meth:`finish` once, which waits and returns the ``(n,)``
    aggregate of all buckets, concatenated in bucket-index order, on ``device``; the
    built-in exchanges write it into one of two buffers they reuse (:class:`Outputs`),
    so it holds its values until the step after next (copy it to keep it longer).
    :meth:`abandon` drops a step in flight (``load_state_dict``, elastic restore).
    ``timings`` holds the last :meth:`finish`'s ``time.perf_counter()`` stamps in the
    order they happened: ``arrived`` (the last bucket received), the exchange's own
    stages, and ``aggregated``.
    """

    timings: dict
    lies = None  # fault injection: fa_hvd.faults.roles.RoleLies (only the sharded exchange asks it)
    bucket_final: Callable[[int, torch.Tensor], None] | None = None
    """Set by the optimizer: called with a bucket's index and its values of the aggregate as soon as they are
    final, before :meth:`finish`, by an exchange that knows them bucket by bucket (the allgather exchange's
    mean on its worker thread; every call is made before :meth:`finish` returns). :meth:`finish` still
    returns the whole aggregate."""

    def plan(self, sizes: list[int], dtype: torch.dtype, device: torch.device) -> None:
        """Told once, before any step: every step's buckets have these sizes (elements), are of
        ``dtype`` or narrower and are aggregated on ``device``. An exchange may use it to work
        on buckets before :meth:`finish`; by default it is not used."""

    def channels(self) -> list[str]:
        """Names of collectives this exchange starts besides the buckets' that need an ordered channel
        of their own (:meth:`fa_hvd.comm.base.Transport.prepare`: it starts them on its worker thread);
        whoever prepares the buckets' names prepares these too."""
        return []

    def start(self, index: int, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, count: int, device: torch.device, step: int) -> torch.Tensor:
        raise NotImplementedError

    def finish_buckets(self, sizes: list[int], device: torch.device, step: int) -> list[torch.Tensor]:
        """:meth:`finish` for buckets of ``sizes``, the aggregate cut into each bucket's part (views, to be
        read before the next step's :meth:`finish`: the DDP hook's parts are copied out by DDP within the step)."""
        return list(self.finish(len(sizes), device, step).split(sizes))

    def abandon(self) -> None:
        raise NotImplementedError


def agree_on_compiled_kernels(transport, name: str) -> bool:
    """Collective over ``transport``'s ranks: every rank takes the compiled kernels (:mod:`fa_hvd.aggregators.native`)
    only if every rank can, so all compute the same aggregate bits. The ranks that have to give them up
    say so, each in its own log line. Returns the decision."""
    everyone = transport.allgather_json(native.usable_here(), name=name, schema=bool)
    was, agreed = native.enabled(), native.agree(everyone)
    if was and not agreed:
        without = [rank for rank, usable in enumerate(everyone) if not usable]
        _log.warning("fa_hvd: rank %d: compiled kernels off for this run: rank%s %s cannot use them (FA_HVD_NATIVE=0 "
                     "or no working C compiler), and the compiled Gram's last bits differ from the torch path's; "
                     "every rank takes the torch path", transport.rank, "" if len(without) == 1 else "s",
                     ", ".join(map(str, without)))
    return agreed


def check_planned(plan: tuple, index: int, flat: torch.Tensor) -> None:
    """Refuse bucket ``index`` unless ``plan`` (``(sizes, dtype, device)``, :meth:`GradientExchange.plan`)
    has its size and its dtype or a wider one."""
    sizes, dtype = plan[:2]
    if flat.numel() != sizes[index] or torch.promote_types(flat.dtype, dtype) != dtype:
        raise ValueError(f"fa_hvd: bucket {index} has {flat.numel()} {flat.dtype} elements, planned "
                         f"{sizes[index]} of {dtype} or narrower (a gradient_transform must keep "
                         f"the bucket's size and dtype)")


class Outputs:
    """The buffers an exchange writes its aggregates into: two kept across steps, and a step takes
    the one that does not hold the last finished step's aggregate (:meth:`finished`). A fresh ``(n,)``
    buffer each step costs more than the pass that fills it: its pages are touched anew (18 ms for
    11M fp32 on a 2-core CPU, where the pass takes 4). After its step an aggregate is read only by
    the deferred digest, which settles before the next step finishes."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None

    def take(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        kept = [b for b in self.buffers if fits(b, (n,), dtype, device)]
        spare = next((b for b in kept if b is not self.last), None)
        if spare is None:
            spare = torch.empty(n, dtype=dtype, device=device)
            kept = [b for b in kept if b is self.last] + [spare]
        self.buffers = kept
        return spare

    def finished(self, aggregate: torch.Tensor) -> torch.Tensor:
        """``aggregate`` is the last finished step's: the next step writes elsewhere."""
        self.last = aggregate
        return aggregate


def wait(transport, handle, step: int, stage: str) -> torch.Tensor:
    """The handle's result; a failure as :func:`raise_failure` says."""
    try:
        return transport.wait(handle)
    except Exception as exc:
        raise_failure(transport, exc, step, stage)


def raise_failure(transport, exc: Exception, step: int, stage: str) -> NoReturn:
    """Horovod's elastic errors (``transport.passthrough_errors``) leave unchanged, with a note naming
    this rank, the step and ``stage``; anything else becomes a ``RuntimeError`` saying the same."""
    failure = f"fa_hvd: rank {transport.rank}: the gradient exchange failed at step {step} ({stage})"
    if isinstance(exc, transport.passthrough_errors):
        exc.add_note(failure)
        raise exc
    raise RuntimeError(f"{failure}: {exc}") from exc


def rule_name(aggregator) -> str:
    """An aggregator's name for messages: its ``name``, a function's ``__name__``, else its repr."""
    return getattr(aggregator, "name", getattr(aggregator, "__name__", repr(aggregator)))


class Worker:
    """One daemon thread that runs an exchange's bucket work, one job at a time, in order. torch gives
    it the process's intra-op thread count (``torch.set_num_threads`` is process-wide): the same
    kernels as on the training thread, the same bits."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="fa_hvd-buckets", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.jobs.get()()
