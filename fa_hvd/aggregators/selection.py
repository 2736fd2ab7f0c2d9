"""Coordinate-wise order statistics at memory speed: sorting networks over column blocks.

The coordinate-wise rules (median, trimmed mean, Bulyan's second phase) need, for
every column ``j`` of a ``(p, n)`` matrix ``G``, a few values of the sorted column
(``S_kj``, the ``k``-th smallest). ``torch.sort(dim=0)`` sorts each short column
on its own (a scalar sort per column, about 20x the time of one pass over ``G``).

A sorting network on ``p`` wires is a fixed list of comparators ``(a, b)``,
``a < b``, each replacing ``(x_a, x_b)`` by ``(min, max)``; after the last one the
wires hold the sorted values. Applied to whole rows it sorts every column at
once with elementwise ``minimum``/``maximum``, vectorised across columns:

* the network is Batcher's odd-even merge sort for the next power of two
  ``P >= p``, with every comparator that touches a wire ``>= p`` removed (those
  wires stand for ``+inf`` padding, which such comparators never move);
* it is pruned to the outputs wanted: walking backwards, a comparator is kept
  only if one of its outputs is still needed, and it computes only the outputs
  that are (often just the min or just the max, one operation instead of two);
* it runs one block of columns at a time, sized to stay in cache
  (:data:`BLOCK_ELEMENTS` elements), reading the block straight from ``G`` and
  writing into ``p + 1`` reusable row buffers: the extra memory is O(block),
  never O(p n), and the input is never modified.

On the CPU the network is compiled to C (:mod:`.native`): each column's values
stay in registers through the whole network and ``G`` is read once. Min and max
are exact, so the values are exactly those of a sort (up to the sign of a zero). Above
:data:`MAX_NETWORK_ROWS` rows the network (``O(p log^2 p)`` comparators) loses to
``torch.sort``, which is used instead, on the same column blocks; so it is on an
accelerator at every ``p`` (:func:`sorts`), where each comparator of the eager network
is a kernel launch and a pass over the block (on an H200 the network took 10x to 110x
mean's time), and one ``torch.sort`` kernel sorts the whole block.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import torch

from . import native

BLOCK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 26}
"""Elements of ``G`` per column block, by device type (CPU: about 2 MB of fp32, an L2 cache)."""
MAX_NETWORK_ROWS = 64
"""Largest ``p`` sorted by a network (543 comparators at 64); larger ``p`` falls back to ``torch.sort``."""


class Comparator(NamedTuple):
    low: int  # wire receiving the min
    high: int  # wire receiving the max
    min_needed: bool
    max_needed: bool


def batcher(p: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort on ``p`` wires (padded to a power of two)."""
    size = 1
    while size < p:
        size *= 2
    pairs = []
    span = 1
    while span < size:
        step = span
        while step >= 1:
            for j in range(step % span, size - step, 2 * step):
                for i in range(min(step, size - j - step)):
                    if (i + j) // (2 * span) == (i + j + step) // (2 * span):
                        pairs.append((i + j, i + j + step))
            step //= 2
        span *= 2
    return [(a, b) for a, b in pairs if b < p]


@functools.lru_cache(maxsize=None)
def network(p: int, outputs: tuple[int, ...]) -> tuple[Comparator, ...]:
    """Batcher's network on ``p`` wires pruned to the sorted ``outputs`` (positions ``0..p-1``)."""
    if any(not 0 <= k < p for k in outputs):
        raise ValueError(f"sorted positions must lie in [0, {p}), got {outputs}")
    needed = set(outputs)
    kept = []
    for a, b in reversed(batcher(p)):
        want_min, want_max = a in needed, b in needed
        if want_min or want_max:
            kept.append(Comparator(a, b, want_min, want_max))
            needed |= {a, b}
    return tuple(reversed(kept))


def block_columns(p: int, device: torch.device) -> int:
    """Columns per block for ``p`` rows on ``device``."""
    return max(1, BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cuda"]) // max(p, 1))


def sorts(p: int, device: torch.device) -> bool:
    """True when :func:`order_statistics` sorts blocks with ``torch.sort``: above
    :data:`MAX_NETWORK_ROWS` rows, or off the CPU (one kernel instead of one per comparator)."""
    return p > MAX_NETWORK_ROWS or device.type != "cpu"


def order_statistics(
    G: torch.Tensor, positions: Sequence[int], rows: Sequence[int] | None = None
) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """Per column block ``cols``: ``(cols, [S[k, cols] for k in positions])`` with ``S = G[rows].sort(dim=0)``.

    ``rows`` (default: all) selects the rows to sort without copying them. The
    yielded rows are buffers reused for the next block: use them before advancing.
    ``G`` (``(p, n)``) is not modified.
    """
    n = G.shape[1]
    rows = list(range(G.shape[0])) if rows is None else list(rows)
    p = len(rows)
    positions = tuple(positions)
    width = block_columns(p, G.device)
    if sorts(p, G.device):
        for start in range(0, n, width):
            cols = slice(start, min(n, start + width))
            S = G[rows, cols].sort(dim=0).values
            yield cols, [S[k] for k in positions]
        return
    wanted = tuple(sorted(set(positions)))
    ops, result = program(p, wanted)
    pool = [torch.empty(min(width, n), dtype=G.dtype, device=G.device) for _ in range(p + 1)]
    for start in range(0, n, width):
        cols = slice(start, min(n, start + width))
        slots = [G[i, cols] for i in rows] + [b[: cols.stop - start] for b in pool]
        for fn, a, b, out in ops:
            fn(slots[a], slots[b], out=slots[out])
        yield cols, [slots[result[k]] for k in positions]


@functools.lru_cache(maxsize=None)
def program(p: int, outputs: tuple[int, ...]) -> tuple[tuple, dict[int, int]]:
    """:func:`network` as straight-line code over slots: ``(ops, result)``.

    Slots ``0..p-1`` are the input rows (read only), ``p..2p`` reusable buffers;
    each op is ``(torch.minimum or torch.maximum, slot a, slot b, output slot)`` and
    ``result[k]`` is the slot holding sorted position ``k`` at the end. A result goes
    into its wire's own buffer when it has one, else into a free buffer, and a buffer
    whose wire moved on is freed: at most one buffer per wire plus one in flight are
    in use, so ``p + 1`` buffers suffice.
    """
    wire = list(range(p))  # slot of each wire
    free = list(range(2 * p, p - 1, -1))
    ops = []

    def owned(slot: int) -> bool:
        return slot >= p

    for c in network(p, outputs):
        x, y = wire[c.low], wire[c.high]
        if c.min_needed and c.max_needed:
            low = free.pop()
            ops.append((torch.minimum, x, y, low))
            high = y if owned(y) else free.pop()
            ops.append((torch.maximum, x, y, high))
            if owned(x):
                free.append(x)
            wire[c.low], wire[c.high] = low, high
        elif c.min_needed:
            wire[c.low] = x if owned(x) else free.pop()
            ops.append((torch.minimum, x, y, wire[c.low]))
        else:
            wire[c.high] = y if owned(y) else free.pop()
            ops.append((torch.maximum, x, y, wire[c.high]))
    return tuple(ops), {k: wire[k] for k in outputs}


class Reduction:
    """What a coordinate-wise rule makes of each column's sorted values, in two equal forms.

    ``positions``: the sorted positions it reads. :meth:`torch` writes the result
    of a block into ``out`` from the rows at ``positions`` (the eager path);
    :meth:`c` gives C statements that compute ``result`` from the C expressions of
    those values (the compiled path, :mod:`.native`). Both must do the same
    floating-point operations in the same order, so the two paths agree bit for bit.
    """

    positions: tuple[int, ...]

    def torch(self, values: list[torch.Tensor], out: torch.Tensor) -> None:
        raise NotImplementedError

    def c(self, values: list[str], ctype: str) -> list[str]:
        raise NotImplementedError


def coordinatewise(G: torch.Tensor, reduction: Reduction, rows: Sequence[int] | None = None,
                   checked: bool = False) -> torch.Tensor | None:
    """``reduction`` of the sorted columns of ``G[rows]`` (default: all rows): the ``(n,)`` result.

    Compiled (:mod:`.native`) on the CPU for ``p <= MAX_NETWORK_ROWS``, where a C
    compiler is at hand; otherwise the eager torch path by column blocks. With
    ``checked`` (for rows not yet known finite) the result only when the compiled pass
    also found every column's sum finite, so every value finite; None when it did not,
    and at once off the compiled path: the caller then checks the rows itself.
    """
    n = G.shape[1]
    rows = list(range(G.shape[0])) if rows is None else list(rows)
    compiled = len(rows) <= MAX_NETWORK_ROWS and native.supports(G)
    if checked and not compiled:
        return None
    out = torch.empty(n, dtype=G.dtype, device=G.device)
    if compiled:
        comparators = network(len(rows), tuple(sorted(set(reduction.positions))))
        finite = native.run(comparators, len(rows), reduction, [G[i] for i in rows], out, checked)
        return out if finite else None
    for cols, values in order_statistics(G, reduction.positions, rows):
        reduction.torch(values, out[cols])
    return out
