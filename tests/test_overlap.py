"""The allgather exchange works on each bucket as it arrives (the mean's columns; a Gram rule's
Gram blocks, whose diagonal then tells whether every row is finite), inside finish() or on its worker thread, and gives the same bits
as the rule on the whole matrix after the last bucket: the non-overlapped path."""

import threading

import pytest
import torch

from fa_hvd.aggregators import get
from fa_hvd.comm import Handle, NoCompression, Transport
from fa_hvd.exchange import AllgatherExchange
from fa_hvd.aggregators import geometry
from fa_hvd.exchange import allgather as allgather_module

P = 7
SIZES = [50_001, 3, 60_000, 12_345]  # bucket boundaries off the Gram's column blocks (2^18 / (p + 1) wide)


@pytest.fixture(autouse=True)
def several_gram_blocks(monkeypatch):
    """Blocks of 2^18 elements, so that these small matrices span several and buckets straddle them."""
    monkeypatch.setattr(geometry, "CPU_BLOCK", 1 << 18)
RULES = [("mean", {}), ("flag", {"f": 1}), ("krum", {"f": 1}), ("multikrum", {"f": 1}), ("geomed", {"f": 1}),
         ("mda", {"f": 1}), ("nmean", {"f": 1}),
         ("median", {"f": 1}), ("cclip", {"f": 1}), ("bulyan", {"f": 1}), ("nnm+krum", {"f": 1})]  # the rest: rule(G)


class _Rows(Handle):
    def __init__(self, index):
        self.index = index


class Buckets(Transport):
    """Every rank's rows of each bucket are columns of a fixed ``G``; ``events`` logs each wait."""

    def __init__(self, G, sizes, threaded=False):
        self.rank, self.size, self.local_rank = 0, G.shape[0], 0
        self.G, self.sizes, self.events = G, sizes, []
        self.waits_from_any_thread = threaded
        self.held = {}  # bucket index -> Event its wait waits for
        self.threads = []

    def allgather_async(self, tensor, name, out=None):
        return _Rows(int(name.rsplit("bucket", 1)[1]))

    def wait(self, handle):
        self.threads.append((threading.get_ident(), torch.get_num_threads()))
        if handle.index in self.held:
            self.events.append(("held", handle.index))
            assert self.held[handle.index].wait(60)
        self.events.append(("wait", handle.index))
        start = sum(self.sizes[: handle.index])
        return self.G[:, start: start + self.sizes[handle.index]].clone()


def rows(seed=0, p=P, n=sum(SIZES)):
    """Rows sharing a large mean (the centred product matters), one far row."""
    gen = torch.Generator().manual_seed(seed)
    G = 10 + 0.01 * torch.randn(p, n, generator=gen)
    G[-1] *= -3
    return G


def exchange_of(G, name, params, sizes=SIZES, threaded=False, held=()):
    """The exchange with every bucket started (``threaded``: planned, its worker thread on)."""
    transport = Buckets(G, sizes, threaded)
    transport.held = {index: threading.Event() for index in held}
    exchange = AllgatherExchange(transport, get(name, **params), NoCompression, "t")
    exchange.plan(sizes, torch.float32, torch.device("cpu"))
    for index, size in enumerate(sizes):
        exchange.start(index, torch.zeros(size))
    return exchange, transport


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("name, params", RULES)
@pytest.mark.parametrize("broken", [None, "nan", "inf", "huge"])
def test_bucket_by_bucket_gives_the_rules_bits_on_the_whole_matrix(name, params, broken, threaded):
    G = rows()
    if broken == "huge":  # finite, but its fp32 products overflow: the Gram redoes it in fp64
        G[1] *= 1e36
    elif broken:  # a non-finite row in the last bucket: the Gram rules fall back to rule(G), dropping it
        G[1, -5] = float(broken)
    for step in range(2):  # the matrix is reused across steps
        exchange, _ = exchange_of(G, name, params, threaded=threaded)
        update = exchange.finish(len(SIZES), torch.device("cpu"), step)
        reference = get(name, **params)
        expected = reference(G.clone())
        torch.testing.assert_close(update, expected, rtol=0, atol=0, equal_nan=True)  # bit for bit
        assert exchange.aggregator.diagnostics == reference.diagnostics
        assert (exchange._buffer is None) == (name == "mean")  # the mean needs no (p, n) matrix


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("name", ["mean", "flag"])
def test_one_bucket_and_several_give_the_same_bits(name, threaded):
    G = rows(seed=1)
    several, _ = exchange_of(G, name, {"f": 1} if name == "flag" else {}, threaded=threaded)
    one, _ = exchange_of(G, name, {"f": 1} if name == "flag" else {}, sizes=[G.shape[1]], threaded=threaded)
    assert torch.equal(several.finish(len(SIZES), torch.device("cpu"), 0), one.finish(1, torch.device("cpu"), 0))


@pytest.mark.parametrize("threaded", [False, True])
def test_each_buckets_gram_blocks_are_added_before_the_next_bucket_is_waited_for(monkeypatch, threaded):
    """Overlap: the Gram blocks within the columns received so far are added before the next
    wait; only the blocks that straddle a bucket boundary wait for the bucket that completes them."""
    G = rows(seed=2)
    exchange, transport = exchange_of(G, "flag", {"f": 1}, threaded=threaded, held=[0])  # no block added yet
    added = []
    advance = allgather_module.CentredGram.advance

    def logged(self, filled):
        advance(self, filled)
        added.append(self.done)
        transport.events.append(("blocks", self.done))

    monkeypatch.setattr(allgather_module.CentredGram, "advance", logged)
    transport.held[0].set()  # the first bucket's wait goes on, with every block's addition logged
    exchange.finish(len(SIZES), torch.device("cpu"), 0)
    events = [e for e in transport.events if e[0] != "held"]
    assert [e[0] for e in events] == ["wait", "blocks"] * len(SIZES)
    blocks = allgather_module.CentredGram(G).blocks
    ends = [sum(SIZES[: i + 1]) for i in range(len(SIZES))]
    for end, (_, done) in zip(ends, events[1::2]):
        assert done == sum(1 for b in blocks if b.stop <= end)  # every block within reach, no more
    assert 0 < added[0] < added[-1] == len(blocks)
    assert exchange.stats["worker_s" if threaded else "overlapped_s"] > 0



@pytest.mark.parametrize("name, params", [("mean", {}), ("flag", {"f": 1})])
def test_the_worker_works_on_the_buckets_before_finish_is_called(name, params):
    """As Horovod's background thread: with a plan, the buckets that arrived are copied and their
    blocks worked on while the training thread is elsewhere (here: before finish() is called),
    in bucket order, with the training thread's intra-op thread count."""
    sizes = [160_000, 3, 50_001, 1_000]
    G = rows(seed=3, n=sum(sizes))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        last = len(sizes) - 1
        exchange, transport = exchange_of(G, name, params, sizes=sizes, threaded=True, held=[last])
        for _ in range(600):  # until the worker waits for the held last bucket (a hang guard, not a timing)
            if ("held", last) in transport.events:
                break
            threading.Event().wait(0.1)
        assert transport.events == [("wait", i) for i in range(last)] + [("held", last)]
        work, received = exchange._step.work, sum(sizes[:last])
        if name == "mean":  # the columns received so far hold their mean already
            assert torch.equal(work.out[:received], get(name)(G.clone())[:received])
        else:  # the Gram's column blocks within them are added
            done = work.product.done
            assert done == sum(1 for b in work.product.blocks if b.stop <= received) > 0
        transport.held[last].set()
        update = exchange.finish(len(sizes), torch.device("cpu"), 0)
        expected = get(name, **params)(G.clone())  # under the same thread count: the same last bits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(update, expected)
    assert {ident for ident, _ in transport.threads} != {threading.get_ident()}
    assert {count for _, count in transport.threads} == {1}


@pytest.mark.parametrize("digest", [False, True])
def test_the_mean_hands_each_buckets_aggregate_over_as_it_is_taken(digest):
    """bucket_final: the worker hands each bucket's mean over (its index and its final values, for the
    optimizer to write into .grad as Horovod's in-place allreduce does) before finish() is called; not with
    the in-step digest, whose check of the whole aggregate comes first."""
    sizes = [1_000, 3, 5_001, 70]
    G = rows(seed=4, n=sum(sizes))
    last, handed = len(sizes) - 1, []
    transport = Buckets(G, sizes, threaded=True)
    transport.held = {last: threading.Event()}
    exchange = AllgatherExchange(transport, get("mean"), NoCompression, "t", digest=digest)
    exchange.bucket_final = lambda index, values: handed.append((index, values.clone()))
    exchange.plan(sizes, torch.float32, torch.device("cpu"))
    for index, size in enumerate(sizes):
        exchange.start(index, torch.zeros(size))
    for _ in range(600):  # until the worker waits for the held last bucket (a hang guard, not a timing)
        if ("held", last) in transport.events:
            break
        threading.Event().wait(0.1)
    assert [index for index, _ in handed] == ([] if digest else list(range(last)))
    transport.held[last].set()
    assert exchange._step.finished.wait(60)  # every bucket worked on (a hang guard)
    if digest:  # finish() checks the whole aggregate against the other ranks' first
        assert handed == []
        return
    update = exchange.finish(len(sizes), torch.device("cpu"), 0)
    assert [index for index, _ in handed] == list(range(len(sizes)))
    assert torch.equal(torch.cat([values for _, values in handed]), update)
    assert torch.equal(update, get("mean")(G.clone()))


def test_a_failed_wait_on_the_worker_fails_finish_and_the_next_step_runs():
    G = rows(seed=4)
    exchange, transport = exchange_of(G, "flag", {"f": 1}, threaded=True)
    exchange.finish(len(SIZES), torch.device("cpu"), 0)
    broken = transport.wait

    def wait(handle):
        if handle.index == 2:
            raise ConnectionError("peer went away")
        return broken(handle)

    transport.wait = wait
    for index, size in enumerate(SIZES):
        exchange.start(index, torch.zeros(size))
    with pytest.raises(RuntimeError, match=r"rank 0: the gradient exchange failed at step 1 \(bucket 2\): peer went"):
        exchange.finish(len(SIZES), torch.device("cpu"), 1)
    transport.wait = broken
    for index, size in enumerate(SIZES):
        exchange.start(index, torch.zeros(size))
    assert torch.equal(exchange.finish(len(SIZES), torch.device("cpu"), 2), get("flag", f=1)(G.clone()))


def test_a_step_abandoned_while_the_worker_waits_leaves_the_next_step_to_a_new_worker():
    G = rows(seed=5)
    exchange, transport = exchange_of(G, "mean", {}, threaded=True, held=[1])
    for _ in range(600):
        if ("held", 1) in transport.events:
            break
        threading.Event().wait(0.1)
    stuck = exchange._worker
    exchange.abandon()
    assert exchange._worker is None
    transport.held = {}
    for index, size in enumerate(SIZES):
        exchange.start(index, torch.zeros(size))
    assert exchange._worker is not stuck
    assert torch.equal(exchange.finish(len(SIZES), torch.device("cpu"), 1), get("mean")(G.clone()))


def test_a_bucket_off_the_plan_is_refused():
    G = rows(seed=6)
    exchange, _ = exchange_of(G, "mean", {}, sizes=SIZES, threaded=True)
    exchange.finish(len(SIZES), torch.device("cpu"), 0)
    with pytest.raises(ValueError, match="bucket 1 has 4 torch.float32 elements, planned 3"):
        exchange.start(1, torch.zeros(4))
    with pytest.raises(ValueError, match="bucket 0 has 50001 torch.float64 elements"):
        exchange.start(0, torch.zeros(SIZES[0], dtype=torch.float64))


@pytest.mark.parametrize("threaded", [False, True])
def test_bucket_work_that_fails_fails_finish_as_it_is(threaded):
    """A bucket whose rows do not fit the plan (here: a transport that returns too few columns)
    fails finish() with torch's error; the worker thread survives it for the next step."""
    G = rows(seed=7)
    exchange, transport = exchange_of(G, "flag", {"f": 1}, threaded=threaded, held=[0])
    good = transport.wait
    transport.wait = lambda handle: good(handle)[:, :2] if handle.index == 1 else good(handle)
    transport.held[0].set()
    if threaded:
        assert exchange._step.finished.wait(60)  # the worker stopped on it (a hang guard)
    with pytest.raises(RuntimeError, match="size"):
        exchange.finish(len(SIZES), torch.device("cpu"), 0)
    transport.wait = good
    for index, size in enumerate(SIZES):
        exchange.start(index, torch.zeros(size))
    assert torch.equal(exchange.finish(len(SIZES), torch.device("cpu"), 1), get("flag", f=1)(G.clone()))


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("name, params", [("mean", {}), ("flag", {"f": 1})])
def test_the_last_aggregate_outlives_the_next_step_in_two_reused_buffers(name, params, threaded):
    """The aggregate is written into one of two buffers kept across steps (a fresh one each step is
    paid in page faults): a step, finished or failed, never writes into the buffer that holds the last
    finished step's aggregate, which the deferred digest fingerprints during the next step."""
    exchange, transport = exchange_of(rows(seed=6), name, params, threaded=threaded)
    last = exchange.finish(len(SIZES), torch.device("cpu"), 0)
    seen = {last.data_ptr()}
    broken = transport.wait

    def failing(handle):
        if handle.index == 2:
            raise ConnectionError("peer went away")
        return broken(handle)

    for step in range(1, 6):
        kept = last.clone()
        transport.G = rows(seed=6 + step)
        transport.wait = failing if step == 3 else broken
        for index, size in enumerate(SIZES):
            exchange.start(index, torch.zeros(size))
        if step == 3:
            with pytest.raises(RuntimeError, match="step 3"):
                exchange.finish(len(SIZES), torch.device("cpu"), step)
            assert torch.equal(last, kept)
            continue
        update = exchange.finish(len(SIZES), torch.device("cpu"), step)
        assert torch.equal(last, kept) and update.data_ptr() != last.data_ptr()
        assert torch.equal(update, get(name, **params)(transport.G.clone()))
        seen.add(update.data_ptr())
        last = update
    assert len(seen) == 2
