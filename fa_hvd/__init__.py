"""fa_hvd: Byzantine-robust data-parallel PyTorch training on Horovod.

Horovod's gradient allreduce is replaced by an allgather and a robust aggregation
computed identically on every rank, by default the Flag Aggregator.
"""

__version__ = "0.1.0"

from .optimizer import DistributedOptimizer  # noqa: E402


def broadcast_parameters(params, root_rank: int = 0, process_set=None):
    """Horovod's ``broadcast_parameters`` (a ``state_dict`` or ``named_parameters``)."""
    from horovod.torch.functions import broadcast_parameters as horovod_broadcast_parameters

    kwargs = {"process_set": process_set} if process_set is not None else {}
    return horovod_broadcast_parameters(params, root_rank, **kwargs)


def broadcast_optimizer_state(optimizer, root_rank: int = 0, process_set=None):
    """Horovod's ``broadcast_optimizer_state``, without a gradient exchange.

    Horovod initialises an empty optimizer state by a ``step()`` on zero
    gradients; for an fa_hvd optimizer that step skips the allgather.
    """
    import contextlib

    from horovod.torch.functions import broadcast_optimizer_state as horovod_broadcast_optimizer_state

    kwargs = {"process_set": process_set} if process_set is not None else {}
    skip = getattr(optimizer, "skip_synchronize", contextlib.nullcontext)
    with skip():
        return horovod_broadcast_optimizer_state(optimizer, root_rank, **kwargs)


__all__ = ["DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "__version__"]
