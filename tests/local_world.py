"""An in-process world of ``p`` ranks (one thread each) with the Transport interface, for fast tests.

Collectives are matched by name, as Horovod matches them: each rank posts its part
under ``(name, how many times this rank used the name)`` and returns a handle;
``wait`` blocks until every rank has posted under that key. So ranks may start
named collectives in different orders, as the optimizer does with its buckets.
"""

from __future__ import annotations

import re
import threading

import torch

from fa_hvd.comm.base import Handle, Transport


class _Pending(Handle):
    def __init__(self, key, result):
        self.key, self.result = key, result  # result(everyone's posts) -> this rank's output


class LocalWorld:
    def __init__(self, p: int):
        self.p = p
        self.cond = threading.Condition()
        self.posted: dict = {}
        self.collected: dict = {}
        self.broken = False

    def post(self, key, rank: int, item) -> None:
        with self.cond:
            self.posted.setdefault(key, {})[rank] = item
            self.cond.notify_all()

    def collect(self, key) -> list:
        """Every rank's post under ``key``, in rank order (blocks until all have posted)."""
        with self.cond:
            while len(self.posted.get(key, {})) < self.p:
                if self.broken or not self.cond.wait(timeout=60):
                    raise RuntimeError(f"local world: collective {key} never completed")
            posts = self.posted[key]
            everyone = [posts[r] for r in range(self.p)]
            self.collected[key] = self.collected.get(key, 0) + 1
            if self.collected[key] == self.p:
                del self.posted[key], self.collected[key]
            return everyone

    def abort(self) -> None:
        with self.cond:
            self.broken = True
            self.cond.notify_all()


class LocalTransport(Transport):
    name = "local"

    def __init__(self, world: LocalWorld, rank: int):
        self.world, self.rank, self.size, self.local_rank = world, rank, world.p, rank
        self.calls: list[tuple[str, str]] = []  # (collective, name), in order
        self._uses: dict[str, int] = {}
        self._optimizers: dict[str, str] = {}

    def _local(self, name: str) -> str:
        """Optimizers number themselves per process (``fa_hvd.opt<N>``); here the ranks share one process,
        so each rank's optimizers are renumbered in the order this rank made them."""
        match = re.match(r"fa_hvd\.opt\d+", name)
        if match is None:
            return name
        local = self._optimizers.setdefault(match.group(), f"opt#{len(self._optimizers)}")
        return local + name[match.end():]

    def _post(self, kind, name, item, result) -> _Pending:
        name = self._local(name)
        self.calls.append((kind, name))
        use = self._uses[name] = self._uses.get(name, 0) + 1
        key = (name, use)
        self.world.post(key, self.rank, item)
        return _Pending(key, result)

    def allgather_async(self, tensor, name, out=None):
        return self._post("allgather", name, tensor.clone(), lambda everyone: torch.cat(everyone))

    def alltoall_async(self, tensor, splits, name, received=None):
        rank = self.rank

        def result(everyone):
            parts = [sent[sum(theirs[:rank]) : sum(theirs[: rank + 1])] for sent, theirs in everyone]
            assert received is None or [len(part) for part in parts] == received
            return torch.cat(parts)

        return self._post("alltoall", name, (tensor.clone(), list(splits)), result)

    def wait(self, handle):
        return handle.result(self.world.collect(handle.key))

    def abandon(self, handle):
        self.world.collect(handle.key)

    def allreduce_sum(self, tensor, name):
        return self.wait(self._post("allreduce", name, tensor.clone(), lambda everyone: sum(everyone)))

    def broadcast_(self, tensor, root, name):
        tensor.copy_(self.wait(self._post("broadcast", name, tensor.clone(), lambda everyone: everyone[root])))
        return tensor


def run_ranks(p: int, fn):
    """``[fn(transport_r) for r in range(p)]``, each in its own thread; re-raises the first error."""
    world = LocalWorld(p)
    results, errors = [None] * p, [None] * p

    def body(rank):
        try:
            results[rank] = fn(LocalTransport(world, rank))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller
            errors[rank] = exc
            world.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(p)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = next((e for e in errors if e is not None and "never completed" not in str(e)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
