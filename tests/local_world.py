"""An in-process world of ``p`` ranks (one thread each) with the Transport interface, for fast tests.

Every collective runs at once: each rank posts its part, all meet at a barrier,
each takes what it receives, and all meet again before the slot is reused. Ranks
must call collectives in the same order, as with a real transport.
"""

from __future__ import annotations

import threading

import torch

from fa_hvd.comm.base import Handle, Transport


class _Done(Handle):
    def __init__(self, value):
        self.value = value


class LocalWorld:
    def __init__(self, p: int):
        self.p = p
        self.barrier = threading.Barrier(p)
        self.posted: list = [None] * p

    def exchange(self, rank: int, item):
        """Every rank's ``item``, in rank order."""
        self.posted[rank] = item
        self.barrier.wait()
        everyone = list(self.posted)
        self.barrier.wait()
        return everyone


class LocalTransport(Transport):
    name = "local"

    def __init__(self, world: LocalWorld, rank: int):
        self.world, self.rank, self.size, self.local_rank = world, rank, world.p, rank
        self.calls: list[tuple[str, str]] = []  # (collective, name), in order

    def allgather_async(self, tensor, name):
        self.calls.append(("allgather", name))
        return _Done(torch.cat([t.clone() for t in self.world.exchange(self.rank, tensor)]))

    def alltoall_async(self, tensor, splits, name, received=None):
        self.calls.append(("alltoall", name))
        everyone = self.world.exchange(self.rank, (tensor, list(splits)))
        parts = []
        for sent, their_splits in everyone:
            start = sum(their_splits[: self.rank])
            parts.append(sent[start : start + their_splits[self.rank]].clone())
        out = torch.cat(parts)
        assert received is None or [len(part) for part in parts] == received
        return _Done(out)

    def wait(self, handle):
        return handle.value

    def allreduce_sum(self, tensor, name):
        self.calls.append(("allreduce", name))
        return sum(t.clone() for t in self.world.exchange(self.rank, tensor))

    def allgather_object(self, obj, name):
        return self.world.exchange(self.rank, obj)


def run_ranks(p: int, fn):
    """``[fn(transport_r) for r in range(p)]``, each in its own thread; re-raises the first error."""
    world = LocalWorld(p)
    results, errors = [None] * p, [None] * p

    def body(rank):
        try:
            results[rank] = fn(LocalTransport(world, rank))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller
            errors[rank] = exc
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(p)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is None:
        first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
