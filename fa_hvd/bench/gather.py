"""``fa-hvd-bench gather``: what a checkpoint's per-rank state exchange costs each rank's memory.

Run under ``horovodrun -np 4 fa-hvd-bench gather --mib 256`` (``mpirun`` with ``--transport
mpi``, ``torchrun --no-python`` with ``--transport torch``). Each rank holds a state of ``--mib``
MiB (one fp32 tensor, as a worker momentum buffer), reads its peak resident memory
(``ru_maxrss``), passes the state once through the transport and reads it again:

* ``gather`` (the trainer's checkpoint, :meth:`fa_hvd.comm.Transport.gather_state`): every
  state to rank 0 alone;
* ``allgather``: every state to every rank (:meth:`~fa_hvd.comm.Transport.allgather_bytes`,
  each decoded), what the checkpoint did before, for comparison.

The peak is a high-water mark, so one process measures one method: run the command once per
method. Rank 0 prints one JSON line: each rank's growth of its peak (MiB), the states each rank
holds after, and the exchange's wall time. The figures count buffers (the encoded state, the
rows it travels in, the decoded states), so they follow from the sizes, not from the machine's
speed; allocator rounding moves them by a few MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from fa_hvd.cli_types import integer_at_least

METHODS = ("gather", "allgather")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("gather", help="each rank's peak memory in a checkpoint's per-rank state "
                                                  "exchange (run under horovodrun)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=integer_at_least(1), default=256, help="each rank's state, MiB of fp32")
    parser.add_argument("--method", choices=METHODS, default="gather",
                        help="gather: to rank 0 alone (the checkpoint's); allgather: to every rank (before)")
    parser.add_argument("--transport", choices=("horovod", "mpi", "torch"), default="horovod")
    parser.set_defaults(run=run)


def peak_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exchange(transport, state: dict, method: str) -> list | None:
    """Every rank's ``state`` on rank 0 (``gather``; None elsewhere) or on every rank (``allgather``)."""
    from fa_hvd.comm import messages

    name, limit = "fa_hvd.bench.gather", 1 << 40
    if method == "gather":
        return transport.gather_state(state, 0, name, limit=limit)
    data = transport.allgather_bytes(messages.encode_state(state), name, limit=limit)
    return [messages.decode_state(item, sender, name) for sender, item in enumerate(data)]


def run(args: argparse.Namespace) -> int:
    from fa_hvd.comm import get_transport

    transport = get_transport(args.transport)
    state = {"worker_momentum": torch.full((args.mib << 18,), float(transport.rank))}
    transport.allreduce_sum(torch.zeros(1), name="fa_hvd.bench.gather.start")
    before, started = peak_mib(), time.perf_counter()
    states = exchange(transport, state, args.method)
    wall_s, growth = time.perf_counter() - started, peak_mib() - before
    held = 0 if states is None else len(states)
    if states is not None and [int(s["worker_momentum"][0]) for s in states] != list(range(transport.size)):
        raise RuntimeError(f"fa-hvd-bench gather: rank {transport.rank} received the states out of order")
    figures = transport.allgather(torch.tensor([[growth, held, wall_s]], dtype=torch.float64),
                                  name="fa_hvd.bench.gather.figures")
    if transport.rank == 0:
        print(json.dumps({
            "bench": "gather", "method": args.method, "transport": transport.name, "ranks": transport.size,
            "state_mib": args.mib,
            "peak_growth_mib": [round(float(g)) for g in figures[:, 0]],
            "states_held": [int(h) for h in figures[:, 1]],
            "wall_s": round(float(figures[:, 2].max()), 3),
        }), flush=True)
    return 0
