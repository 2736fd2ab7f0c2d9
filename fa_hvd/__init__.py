"""fa_hvd: Byzantine-robust data-parallel PyTorch training on Horovod.

Horovod's gradient allreduce is replaced by an allgather and a robust aggregation
computed identically on every rank, by default the Flag Aggregator.
"""

__version__ = "0.1.0"

from .optimizer import DistributedOptimizer, RobustOptimizer  # noqa: E402


def broadcast_parameters(params, root_rank):
    """Horovod's ``broadcast_parameters(params, root_rank)``, the same signature (Horovod 0.28.1).

    ``params``: a ``state_dict``, ``named_parameters()`` or ``parameters()`` list.
    """
    from horovod.torch.functions import broadcast_parameters as horovod_broadcast_parameters

    return horovod_broadcast_parameters(params, root_rank)


def broadcast_optimizer_state(optimizer, root_rank, model=None):
    """Horovod's ``broadcast_optimizer_state(optimizer, root_rank, model=None)``, plus fa_hvd's state.

    For an fa_hvd optimizer this also broadcasts the aggregator's state (the
    centred-clipping centre, bucketing's generator, ...), which is part of its
    ``state_dict()`` but not of what Horovod broadcasts: after the usual "load the
    checkpoint on rank 0, broadcast" every rank aggregates alike. Over Horovod the
    optimizer's own state goes through Horovod's function (its state-initialising
    step makes no gradient exchange); over the mpi4py and torch.distributed transports
    the whole ``state_dict()`` travels as one message, of at most 1 GiB plus three fp64 copies of
    the parameters (room for Adam with amsgrad, three fp32 tensors per parameter, and the aggregator's
    state inside it; over Horovod the aggregator's state goes alone, within 1 GiB plus one copy).
    fa_hvd's messages are read back
    weights-only (:meth:`~fa_hvd.comm.base.Transport.broadcast_state`): the root is
    trusted for the values, but cannot run code on the others. Any other optimizer:
    Horovod's function.
    """
    import torch

    from .comm import messages

    if not isinstance(optimizer, RobustOptimizer):
        from horovod.torch.functions import broadcast_optimizer_state as horovod_broadcast_optimizer_state

        return horovod_broadcast_optimizer_state(optimizer, root_rank, model)
    transport = optimizer.transport
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if transport.name != "horovod":
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("cannot broadcast torch.optim.LBFGS state")  # as Horovod
        state = transport.broadcast_state(optimizer.state_dict() if transport.rank == root_rank else None,
                                          root_rank, name="fa_hvd.optimizer_state",
                                          limit=messages.model_state_limit(parameters, copies=3))
        if transport.rank != root_rank:
            optimizer.load_state_dict(state)
        return None
    from horovod.torch.functions import broadcast_optimizer_state as horovod_broadcast_optimizer_state

    horovod_broadcast_optimizer_state(optimizer, root_rank, model)
    aggregator = optimizer.aggregator
    if hasattr(aggregator, "state_dict"):
        state = transport.broadcast_state(aggregator.state_dict(), root_rank, name="fa_hvd.aggregator_state",
                                          limit=messages.model_state_limit(parameters, copies=1))  # cclip's centre
        aggregator.load_state_dict(state)
    return None


__all__ = ["DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "__version__"]
