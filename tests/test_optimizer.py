"""fa_hvd.DistributedOptimizer in one process, over a loopback transport: the bookkeeping
that needs no second rank (elastic world changes, Horovod's errors and warnings, layouts)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fa_hvd
from loopback import LoopbackTransport


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    return model, torch.randn(8, 4), torch.randint(0, 2, (8,))


def one_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_an_elastic_shrink_rechecks_the_rules_preconditions():
    model, x, y = model_and_batch()
    link = LoopbackTransport(size=3)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="median",
                                      aggregator_params={"f": 1}, transport=link)
    one_step(model, opt, x, y)
    link.resize(2)
    with pytest.raises(ValueError, match=r"median: needs at least 3 workers for f=1 .*got p=2"):
        one_step(model, opt, x, y)


def test_after_an_elastic_change_the_aggregate_uses_the_new_world():
    model, x, y = model_and_batch()
    link = LoopbackTransport(size=2)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      transport=link)
    one_step(model, opt, x, y)
    link.resize(3)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    local = [p.grad.clone() for p in model.parameters()]
    opt.synchronize()
    for p, g in zip(model.parameters(), local):  # rows g, 2g, 3g: their mean is 2g
        torch.testing.assert_close(p.grad, 2 * g)


@pytest.mark.parametrize("error", ["HorovodInternalError", "HostsUpdatedInterrupt"])
def test_horovods_elastic_errors_leave_step_as_themselves(error):
    from horovod.common import exceptions

    raised = getattr(exceptions, error)(False) if error == "HostsUpdatedInterrupt" \
        else exceptions.HorovodInternalError("peer gone")

    class Failing(LoopbackTransport):
        passthrough_errors = (exceptions.HorovodInternalError, exceptions.HostsUpdatedInterrupt)

        def wait(self, handle):
            raise raised

    model, x, y = model_and_batch()
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      transport=Failing(size=2))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(getattr(exceptions, error)) as caught:
        opt.step()
    assert caught.value is raised and type(caught.value) is type(raised)
    assert "fa_hvd: rank 0: in the gradient exchange at step 0" in caught.value.__notes__[0]
