"""Every rank all-gathers its rank id; rank 0 prints what it got."""
import horovod.torch as hvd
import torch

hvd.init()
gathered = hvd.allgather(torch.full((1, 3), float(hvd.rank())), name="check")
if hvd.rank() == 0:
    print("GATHERED", gathered[:, 0].tolist(), "SIZE", hvd.size(), flush=True)
