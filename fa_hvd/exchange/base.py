"""The seam between the optimizer and the gradient exchange.

The optimizer hands the exchange each bucket's flat gradient as it becomes ready
(:meth:`Exchange.submit`, buckets ``0, 1, ...`` in order, every step) and asks for
the aggregate in ``synchronize()`` (:meth:`Exchange.result`: the ``(n,)`` robust
aggregate of every rank's whole gradient, buckets concatenated in order,
identical on every rank). What travels and where the rule runs is the
exchange's business: :class:`~fa_hvd.exchange.allgather.AllgatherExchange`
gathers every gradient everywhere, :class:`~fa_hvd.exchange.sharded.ShardedExchange`
aggregates one shard of the coordinates per rank at the traffic of an allreduce.

Errors from the transport leave :meth:`Exchange.result` with their own type
(Horovod's ``HorovodInternalError`` included) and a note naming the stage that
failed (``exc.__notes__``).
"""

from __future__ import annotations

import torch

from ..comm import Transport


class Identity:
    """No compression: what Horovod's ``Compression.none`` does."""

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class Exchange:
    """Turns each rank's bucketed gradient into the aggregate, on every rank.

    ``sizes``: elements of each bucket, in order; ``compression``: an object with
    Horovod's ``compress(t) -> (t', ctx)`` / ``decompress(t', ctx)``; ``name``: a
    prefix for collective names, the same on every rank and unique per exchange.
    ``stats`` holds the last step's figures (``peak_bytes``: the most bytes of
    tensors the exchange itself held at once).
    """

    kind = "exchange"

    def __init__(self, transport: Transport, aggregator, sizes: list[int], compression=None, name: str = "fa_hvd"):
        self.transport = transport
        self.aggregator = aggregator
        self.sizes = [int(s) for s in sizes]
        self.compression = compression if compression is not None else Identity
        self.name = name
        self.stats: dict = {}
        transport.traffic  # noqa: B018 -- the byte counters start with the exchange

    def submit(self, index: int, flat: torch.Tensor) -> None:
        """Bucket ``index``'s flat gradient (``(sizes[index],)``), in bucket order."""
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        """Wait for every bucket; the ``(n,)`` aggregate. Ready for the next step after."""
        raise NotImplementedError

    def _check_submit(self, index: int, flat: torch.Tensor, expected: int) -> torch.Tensor:
        if index != expected:
            raise RuntimeError(f"fa_hvd exchange: bucket {index} submitted, expected bucket {expected}")
        if flat.dim() != 1 or flat.numel() != self.sizes[index]:
            raise ValueError(f"fa_hvd exchange: bucket {index} must be a flat tensor of {self.sizes[index]} "
                             f"elements, got shape {tuple(flat.shape)}")
        return flat.float() if flat.dtype == torch.bfloat16 else flat  # no bf16 on Horovod's wire


def noted(exc: BaseException, stage: str) -> BaseException:
    """``exc`` with a note naming the exchange stage that failed."""
    exc.add_note(f"fa_hvd exchange: {stage}")
    return exc
