"""fa_hvd.DistributedOptimizer in one process, over a loopback transport: the bookkeeping
that needs no second rank (elastic world changes, Horovod's errors and warnings, layouts)."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fa_hvd
from fa_hvd.aggregators import get as get_aggregator
from fa_hvd.comm import NoCompression
from fa_hvd.exchange import EXCHANGES
from loopback import LoopbackTransport


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    return model, torch.randn(8, 4), torch.randint(0, 2, (8,))


def one_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("rule", ["median", "flag"])
def test_an_elastic_shrink_rechecks_the_rules_preconditions(rule):
    model, x, y = model_and_batch()
    link = LoopbackTransport(size=3)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator=rule,
                                      aggregator_params={"f": 1}, transport=link)
    one_step(model, opt, x, y)
    link.resize(2)
    with pytest.raises(ValueError, match=rf"{rule}: needs at least 3 workers for f=1 .*got p=2"):
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


def test_op_sum_gives_the_aggregate_times_the_world_size_also_after_an_elastic_change():
    import horovod.torch as hvd

    model, x, y = model_and_batch()
    link = LoopbackTransport(size=2)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      transport=link, op=hvd.Sum)
    for size in (2, 3):  # rows g, 2g, ..., size g: their mean is (size + 1) g / 2, their sum size (size + 1) g / 2
        link.resize(size)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        local = [p.grad.clone() for p in model.parameters()]
        opt.synchronize()
        for p, g in zip(model.parameters(), local):
            torch.testing.assert_close(p.grad, size * (size + 1) / 2 * g)
        with opt.skip_synchronize():
            opt.step()


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
    assert "fa_hvd: rank 0: the gradient exchange failed at step 0" in caught.value.__notes__[0]


def test_broadcast_functions_have_horovods_exact_signatures():
    import inspect

    import horovod.torch as hvd

    assert inspect.signature(fa_hvd.broadcast_parameters) == inspect.signature(hvd.broadcast_parameters)
    assert inspect.signature(fa_hvd.broadcast_optimizer_state) == inspect.signature(hvd.broadcast_optimizer_state)


def test_stats_report_the_last_exchange():
    class Counting(LoopbackTransport):
        bytes_sent = bytes_received = 0

        def allgather_async(self, tensor, name, out=None):
            self.bytes_sent += tensor.numel() * tensor.element_size()
            self.bytes_received += (self.size - 1) * tensor.numel() * tensor.element_size()
            return super().allgather_async(tensor, name)

    model, x, y = model_and_batch()
    n = sum(p.numel() for p in model.parameters())
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      transport=Counting(size=3))
    assert opt.stats == {}
    for step in range(2):
        one_step(model, opt, x, y)
        assert opt.stats["step"] == step
        assert (opt.stats["bytes_sent"], opt.stats["bytes_received"]) == (4 * n, 2 * 4 * n)  # this step's only
        assert 0 <= opt.stats["wait_s"] <= opt.stats["exchange_s"] and opt.stats["aggregate_s"] >= 0
        # The profile's parts: the exchange's stages after the last bucket, then the write-back, within aggregate_s.
        assert list(opt.stats["phases"]) == ["assembled", "aggregated"]
        parts = [*opt.stats["phases"].values(), opt.stats["unflatten_s"]]
        assert min(parts) >= 0 and sum(parts) <= opt.stats["aggregate_s"] + 1e-9
        assert opt.stats["flatten_s"] > 0 and opt.stats["send_s"] > 0
    plain = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                        transport=LoopbackTransport(size=3))
    one_step(model, plain, x, y)
    # Every transport counts the TCP bytes its process moved (fa_hvd.comm.traffic): in-process, none.
    assert set(plain.stats) == {"step", "exchange_s", "wait_s", "aggregate_s", "flatten_s", "send_s",
                                "unflatten_s", "phases", "overlapped_s", "bytes_sent", "bytes_received", "nonfinite",
                                "dropped"}
    assert plain.stats["bytes_sent"] == plain.stats["bytes_received"] == 0


def local_grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_a_skipped_step_after_synchronize_does_not_leak_local_gradients():
    """GradScaler's pattern (Horovod's AMP example): synchronize, unscale, step under
    skip_synchronize; on overflow the step is skipped. The next iteration must exchange
    its new gradients again, not apply this rank's own."""
    model, x, y = model_and_batch()
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      transport=LoopbackTransport(size=3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for overflow in (True, False):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        local = local_grads(model)
        opt.synchronize()
        for p, g in zip(model.parameters(), local):  # rows g, 2g, 3g: the mean is 2g
            torch.testing.assert_close(p.grad, 2 * g, equal_nan=True)
        scaler.unscale_(opt)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
    assert opt.step_count == 2


def test_step_after_synchronize_warns_and_exchanges_again_as_horovod():
    model, x, y = model_and_batch()
    link = LoopbackTransport(size=2, others=lambda row, r: torch.zeros_like(row))  # mean = row / 2
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean", transport=link)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    local = local_grads(model)
    opt.synchronize()
    with pytest.warns(UserWarning) as caught:
        opt.step()
    assert [str(w.message) for w in caught] == [
        "optimizer.step() called without optimizer.skip_synchronize() context after optimizer.synchronize(). "
        "This can cause training slowdown. You may want to consider using optimizer.skip_synchronize() context "
        "if you use optimizer.synchronize() in your code."]
    for p, g in zip(model.parameters(), local):  # exchanged twice, as Horovod: g / 4
        torch.testing.assert_close(p.grad, g / 4)


def test_zero_grad_with_a_partial_accumulation_raises_as_horovod_and_load_state_dict_resets():
    model, x, y = model_and_batch()
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      backward_passes_per_step=2, transport=LoopbackTransport(size=2))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # 1 of 2 passes: nothing sent yet
    assert opt._handles
    with pytest.raises(AssertionError, match=r"optimizer.zero_grad\(\) was called after loss.backward\(\) but "
                                             r"before optimizer.step\(\) or optimizer.synchronize\(\)"):
        opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
    assert not opt._handles and set(opt._allreduce_delay.values()) == {2}
    opt.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        F.cross_entropy(model(x[half]), y[half]).backward()
    opt.step()
    assert opt.step_count == 1
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(AssertionError, match="Gradients were computed more than backward_passes_per_step times"):
        F.cross_entropy(model(x), y).backward()


def test_horovods_attributes_with_horovods_meaning():
    model, x, y = model_and_batch()
    inner = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    opt = fa_hvd.DistributedOptimizer(inner, aggregator="mean", backward_passes_per_step=3,
                                      transport=LoopbackTransport(size=2))
    params = list(model.parameters())
    assert opt._parameter_names == {params[0]: "allreduce.noname.0.0", params[1]: "allreduce.noname.0.1",
                                    params[2]: "allreduce.noname.1.0", params[3]: "allreduce.noname.1.1"}
    named = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(), aggregator="mean",
                                        transport=LoopbackTransport(size=2))
    assert named._parameter_names == {p: n for n, p in model.named_parameters()}
    assert opt.backward_passes_per_step == 3 and opt._allreduce_delay == {p: 3 for p in params}
    opt.set_backward_passes_per_step(2)
    assert opt.backward_passes_per_step == 2 and set(opt._allreduce_delay.values()) == {2}
    assert opt._requires_update == set(params) and opt.gradient_predivide_factor == 1.0
    assert opt.sparse_as_dense is False and opt._synchronized is False and opt._should_synchronize is True
    with opt.skip_synchronize():
        assert opt._should_synchronize is False
    import horovod.torch as hvd

    assert opt.op == hvd.Average
    assert opt.find_duplicates(["a", "b", "a"]) == {"a"}


@pytest.mark.parametrize("groups,message", [
    ("both_twice", "A parameter can only appear once in groups."),
    ("not_tensor", "groups must consist of torch.Tensor."),
    ("outside", "is not a parameter of the optimizer"),
    (0, "groups should be a non-negative integer or a list of list of torch.Tensor."),
    (-2, "groups should be a non-negative integer or a list of list of torch.Tensor."),
])
def test_groups_are_validated(groups, message):
    model, _, _ = model_and_batch()
    w, b = model[0].weight, model[0].bias
    groups = {"both_twice": [[w, b], [w]], "not_tensor": [[w, "b"]], "outside": [[w, nn.Linear(2, 2).weight]]}.get(
        groups, groups)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean", groups=groups,
                                    transport=LoopbackTransport(size=2))


def test_groups_and_num_groups_make_the_buckets():
    model, x, y = model_and_batch()
    params = list(model.parameters())
    link = LoopbackTransport(size=2)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      groups=[[params[0], params[3]]], transport=link)
    assert [b.params for b in opt._buckets] == [[params[0], params[3]], [params[1]], [params[2]]]
    with pytest.warns(DeprecationWarning, match="`num_groups` has been replaced by `groups`"):
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                          num_groups=2, transport=link)
    assert [b.params for b in opt._buckets] == [params[:2], params[2:]]


@pytest.mark.parametrize("named,message", [
    ("duplicate", "Parameter names in named_parameters must be unique. Found duplicates: weight"),
    ("missing", "named_parameters was specified, but one or more model parameters were not named"),
    ("not_tuples", "named_parameters should be a sequence of tuples"),
])
def test_named_parameters_are_checked_as_horovod(named, message):
    model, _, _ = model_and_batch()
    items = list(model.named_parameters())
    named = {"duplicate": [("weight", p) for _, p in items], "missing": items[:1],
             "not_tuples": [p for _, p in items]}[named]
    with pytest.raises(ValueError, match=message):
        fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named,
                                    aggregator="mean", transport=LoopbackTransport(size=2))


@pytest.mark.parametrize("exchange", ["allgather", "sharded"])
def test_a_compression_without_compress_and_decompress_is_refused_when_built(exchange):
    """A string such as "fp16" for hvd.Compression.fp16 was an AttributeError at the first step."""
    model, _, _ = model_and_batch()
    with pytest.raises(ValueError, match="compression must be hvd.Compression.none or hvd.Compression.fp16 .*'fp16'"):
        fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                    compression="fp16", exchange=exchange, transport=LoopbackTransport(size=2))
    with pytest.raises(ValueError, match="compression must be"):  # an exchange built on its own checks too
        EXCHANGES[exchange](LoopbackTransport(size=2), get_aggregator("mean"), "fp16", "x")
    import horovod.torch as hvd

    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      compression=hvd.Compression.fp16, exchange=exchange,
                                      transport=LoopbackTransport(size=2))
    assert opt._compression is hvd.Compression.fp16
    assert EXCHANGES[exchange](LoopbackTransport(size=2), get_aggregator("mean"), None, "x").compression is NoCompression


@pytest.mark.parametrize("sparse_as_dense", [False, True])
def test_sparse_gradients_are_aggregated_densely_and_given_back_sparse(sparse_as_dense):
    """nn.Embedding(sparse=True) with SparseAdam, as Horovod's test_sparse_embeddings: the rule
    sees the dense rows; SparseAdam gets a sparse gradient holding the aggregate."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    twin = nn.Embedding(10, 3, sparse=True)
    twin.load_state_dict(emb.state_dict())
    opt = fa_hvd.DistributedOptimizer(torch.optim.SparseAdam(list(emb.parameters()), lr=0.1), aggregator="median",
                                      aggregator_params={"f": 1}, sparse_as_dense=sparse_as_dense,
                                      transport=LoopbackTransport(size=3))
    reference = torch.optim.SparseAdam(list(twin.parameters()), lr=0.1)
    tokens = torch.tensor([[1, 2, 4, 5], [4, 3, 2, 9]])
    for _ in range(2):
        opt.zero_grad()
        emb(tokens).pow(2).sum().backward()
        local = emb.weight.grad.to_dense()
        opt.step()
        assert emb.weight.grad.is_sparse
        torch.testing.assert_close(emb.weight.grad.to_dense(), 2 * local)  # median of g, 2g, 3g
        reference.zero_grad()
        twin(tokens).pow(2).sum().backward()
        twin.weight.grad = (2 * twin.weight.grad.to_dense()).to_sparse(1)
        reference.step()
        torch.testing.assert_close(emb.weight, twin.weight)


def test_wrapping_the_same_model_again_removes_the_old_hooks():
    model, x, y = model_and_batch()
    first = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                        transport=LoopbackTransport(size=2))
    one_step(model, first, x, y)
    second = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                         transport=LoopbackTransport(size=2))
    for _ in range(3):  # the first optimizer's hooks would count these passes and raise
        one_step(model, second, x, y)
    assert (first.step_count, second.step_count) == (1, 3)
    with pytest.raises(RuntimeError, match="taken over by a later fa_hvd.DistributedOptimizer"):
        first.step()


def test_each_bucket_starts_as_soon_as_its_own_gradients_are_ready():
    """An unused parameter in the first bucket does not hold back the others: they start
    during backward; it starts (with zeros) at synchronize. With a gradient transform
    that runs collectives itself, buckets start in index order."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(64, 64), "head": nn.Linear(64, 64), "unused": nn.Linear(64, 64)})
    x = torch.randn(4, 64)

    def backward(opt):
        opt.zero_grad()
        model["head"](torch.tanh(model["body"](x))).sum().backward()

    link = LoopbackTransport(size=2)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      bucket_bytes=64 * 65 * 4, transport=link)
    assert [b.params[0] for b in opt._buckets] == [model["unused"].bias, model["head"].bias, model["body"].bias]
    backward(opt)
    assert link.gathered == [f"{opt._prefix}.bucket1", f"{opt._prefix}.bucket2"]  # during backward
    opt.step()
    assert link.gathered[2:] == [f"{opt._prefix}.bucket0"]

    class Colluding:
        uses_collectives = True

        def transform(self, flat, bucket, step):
            return flat

    link = LoopbackTransport(size=2)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      bucket_bytes=64 * 65 * 4, transport=link,
                                      gradient_transform=Colluding().transform)
    backward(opt)
    assert link.gathered == []  # bucket 0 (unused) holds the others back
    opt.step()
    assert link.gathered == [f"{opt._prefix}.bucket{i}" for i in range(3)]


def test_the_means_buckets_reach_grad_during_backward_as_horovods_in_place_allreduce():
    """With the exchange's worker thread, each bucket's mean is written into its gradients as soon as it is
    taken (while backward could go on), not at synchronize(), which leaves them as they are."""

    class Threaded(LoopbackTransport):
        waits_from_any_thread = True

    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(64, 64), "head": nn.Linear(64, 64)})
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      bucket_bytes=64 * 65 * 4, transport=Threaded(size=2))
    assert len(opt._buckets) == 2
    x = torch.randn(4, 64)
    named = list(model.named_parameters())
    loss = model["head"](torch.tanh(model["body"](x))).sum()
    local = dict(zip((name for name, _ in named), torch.autograd.grad(loss, [p for _, p in named])))  # no hooks
    opt.zero_grad()
    model["head"](torch.tanh(model["body"](x))).sum().backward()

    def aggregated():  # rows g and 2g: their mean
        return all(torch.equal(p.grad, 1.5 * local[name]) for name, p in model.named_parameters())

    for _ in range(600):  # until the worker has written both buckets (a hang guard, not a timing)
        if aggregated():
            break
        threading.Event().wait(0.1)
    assert aggregated() and opt._written == {0, 1}
    opt.synchronize()
    assert aggregated()


def test_gradients_kept_by_zero_grad_share_their_buckets_buffer_and_are_sent_without_a_copy():
    """Gradients that outlive a step (``zero_grad(set_to_none=False)``) are put into one buffer per bucket
    at the next write-back (the same tensors, their storage moved, values kept); backward accumulates
    there and the step after sends that buffer itself. Gradients set to None each step get no buffer.
    The parameters are bit for bit those of the copying path (``set_to_none=True``)."""

    class Recording(LoopbackTransport):
        def allgather_async(self, tensor, name, out=None):
            self.sent.append(tensor.data_ptr())
            return super().allgather_async(tensor, name, out)

    def train(set_to_none: bool):
        model, x, y = model_and_batch()
        link = Recording(size=2)
        link.sent = []
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          aggregator="mean", bucket_bytes=48, transport=link)
        assert len(opt._buckets) == 3
        for step in range(4):
            before = [p.grad for p in model.parameters()]
            opt.zero_grad(set_to_none=set_to_none)
            if step > 1 and not set_to_none:  # kept through step 0, shared from step 1's write-back on
                assert [p.grad for p in model.parameters()] == before  # the same tensors
                assert all(b.sends_shared() and b.shared.eq(0).all() for b in opt._buckets)
                assert all(p.grad._base is None for p in model.parameters())
            sent = len(link.sent)
            F.cross_entropy(model(x), y).backward()
            shared = [b.shared.data_ptr() if b.sends_shared() else None for b in opt._buckets]
            opt.step()
            if step > 1 and not set_to_none:
                assert sorted(link.sent[sent:]) == sorted(shared) and None not in shared  # no copy sent
            assert all(b.shared is None for b in opt._buckets) or not set_to_none  # no buffer beside fresh ones
        return model, link

    kept, kept_link = train(set_to_none=False)
    fresh, fresh_link = train(set_to_none=True)
    model, x, y = model_and_batch()  # kept, then set to None: the buffers are let go
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      bucket_bytes=48, transport=LoopbackTransport(size=2))
    for set_to_none, buffered in ((False, False), (False, True), (False, True), (True, False)):
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert all((b.shared is not None) == buffered for b in opt._buckets)
    assert len(kept_link.sent) == len(fresh_link.sent) == 12
    for a, b in zip(kept.parameters(), fresh.parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)


def test_a_bucket_whose_gradients_cannot_share_a_buffer_is_copied_as_before():
    """Gradients of mixed dtypes in a bucket keep their own storage: the bucket is flattened into a copy
    each step."""
    model = nn.Linear(3, 2)
    model.bias.data = model.bias.data.double()
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      transport=LoopbackTransport(size=2))
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        (model.weight.sum() + model.bias.sum()).backward()
        opt.step()
    assert opt._buckets[0].shared is None and not opt._buckets[0].sends_shared()
    assert model.bias.grad.dtype == torch.float64


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")  # torch's, on purpose
def test_a_gradient_that_is_part_of_a_graph_is_refused_naming_the_parameter_as_horovod_refuses_it():
    """backward(create_graph=True): Horovod's hook asserts ``not p.grad.requires_grad``; fa_hvd raises the
    same AssertionError, saying why and naming the parameter, before any bucket starts."""
    model, x, y = model_and_batch()
    link = LoopbackTransport(size=2)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      named_parameters=model.named_parameters(), aggregator="mean", transport=link)
    with pytest.raises(AssertionError, match=r"parameter '2.bias': its gradient is part of a graph"):
        F.cross_entropy(model(x), y).backward(create_graph=True)
    assert link.gathered == [] and not opt._handles


def test_default_buckets_split_a_small_model_so_communication_overlaps():
    from torchvision.models import resnet18

    model = resnet18()
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                      transport=LoopbackTransport(size=2))
    sizes = [sum(p.numel() * 4 for p in b.params) for b in opt._buckets]
    total = sum(p.numel() * 4 for p in model.parameters())
    assert sum(sizes) == total and len(sizes) >= 8
    assert all(size <= total // 8 or len(b.params) == 1 for size, b in zip(sizes, opt._buckets))
    assert opt._buckets[0].params[0] is model.fc.bias  # backward's first gradient goes first


@pytest.mark.parametrize("rule,params", [("cclip", {"f": 1, "tau": 0.05}), ("bucketing+mean", {"f": 0, "s": 2})])
def test_aggregator_state_round_trips_through_load_state_dict(rule, params):
    """Four steps in one go, or two steps, a checkpoint, a new optimizer, two steps:
    bit-identical parameters (the aggregator's state is part of the checkpoint)."""
    def run(steps, state=None):
        model, x, y = model_and_batch()
        others = lambda row, r: row * (1 + r) + 0.01 * r  # noqa: E731  distinct rows
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          aggregator=rule, aggregator_params=params,
                                          transport=LoopbackTransport(size=5, others=others))
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        for _ in range(steps):
            one_step(model, opt, x, y)
        return model, opt

    straight, _ = run(4)
    half, opt = run(2)
    resumed, _ = run(2, (half.state_dict(), opt.state_dict()))
    fresh, _ = run(2, (half.state_dict(), {k: v for k, v in opt.state_dict().items() if k != "fa_hvd_aggregator"}))
    for a, b, c in zip(straight.parameters(), resumed.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(straight.parameters(), fresh.parameters()))  # state matters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device, and this machine has none: "
                                                          "run where one is")
def test_parameters_on_several_devices():
    """One model on the CPU and a GPU (Horovod's test_model_parallelism, with one GPU): one
    bucket per device, the aggregate written back on each parameter's device."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 5), nn.Linear(5, 2).cuda()
    params = [*first.parameters(), *second.parameters()]
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(params, lr=0.1), aggregator="median",
                                      aggregator_params={"f": 1}, transport=LoopbackTransport(size=3))
    assert {b.device.type for b in opt._buckets} == {"cpu", "cuda"}
    x = torch.randn(8, 4)
    opt.zero_grad()
    second(torch.tanh(first(x)).cuda()).sum().backward()
    local = [p.grad.clone() for p in params]
    opt.step()
    for p, g in zip(params, local):
        assert p.grad.device == p.device
        torch.testing.assert_close(p.grad, 2 * g)  # median of g, 2g, 3g



def test_several_buckets_give_the_same_aggregate_as_one():
    """The buckets are copied into a matrix reused across steps as they arrive, and FA's Gram
    blocks are added as each arrives: FA over four buckets equals FA over one, bit for bit, step
    after step."""
    def run(bucket_bytes):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
        others = lambda row, r: row * (1 + r) + 0.01 * r  # noqa: E731  distinct rows
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="flag",
                                          aggregator_params={"f": 1, "r": 2}, bucket_bytes=bucket_bytes,
                                          transport=LoopbackTransport(size=5, others=others))
        for seed in range(3):
            opt.zero_grad()
            model(torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))).sum().backward()
            opt.step()
        return len(opt._buckets), list(model.parameters())

    (many, split), (one, whole) = run(64 * 4), run(1 << 30)
    assert (many, one) == (4, 1)
    for a, b in zip(split, whole):
        assert torch.equal(a, b)
