"""The allgather exchange works on each bucket as it arrives (the mean's columns; a Gram rule's
finiteness check and Gram blocks) and gives the same bits as the rule on the whole matrix after
the last bucket: the non-overlapped path."""

import pytest
import torch

from fa_hvd.aggregators import get
from fa_hvd.comm import Handle, NoCompression, Transport
from fa_hvd.exchange import AllgatherExchange
from fa_hvd.exchange import allgather as allgather_module

P = 7
SIZES = [50_001, 3, 60_000, 12_345]  # bucket boundaries off the Gram's column blocks (2^18 / p wide)
RULES = [("mean", {}), ("flag", {"f": 1}), ("krum", {"f": 1}), ("multikrum", {"f": 1}), ("geomed", {"f": 1}),
         ("mda", {"f": 1}), ("nmean", {"f": 1}),
         ("median", {"f": 1}), ("cclip", {"f": 1}), ("bulyan", {"f": 1}), ("nnm+krum", {"f": 1})]  # the rest: rule(G)


class _Rows(Handle):
    def __init__(self, index):
        self.index = index


class Buckets(Transport):
    """Every rank's rows of each bucket are columns of a fixed ``G``; ``events`` logs each wait."""

    def __init__(self, G, sizes):
        self.rank, self.size, self.local_rank = 0, G.shape[0], 0
        self.G, self.sizes, self.events = G, sizes, []

    def allgather_async(self, tensor, name):
        return _Rows(int(name.rsplit("bucket", 1)[1]))

    def wait(self, handle):
        self.events.append(("wait", handle.index))
        start = sum(self.sizes[: handle.index])
        return self.G[:, start: start + self.sizes[handle.index]].clone()


def rows(seed=0, p=P, n=sum(SIZES)):
    """Rows sharing a large mean (the centred product matters), one far row."""
    gen = torch.Generator().manual_seed(seed)
    G = 10 + 0.01 * torch.randn(p, n, generator=gen)
    G[-1] *= -3
    return G


def exchange_of(G, name, params, sizes=SIZES):
    transport = Buckets(G, sizes)
    exchange = AllgatherExchange(transport, get(name, **params), NoCompression, "t")
    for index, size in enumerate(sizes):
        exchange.start(index, torch.zeros(size))
    return exchange, transport


@pytest.mark.parametrize("name, params", RULES)
@pytest.mark.parametrize("broken", [None, "nan", "inf", "huge"])
def test_bucket_by_bucket_gives_the_rules_bits_on_the_whole_matrix(name, params, broken):
    G = rows()
    if broken == "huge":  # finite, but its fp32 products overflow: the Gram redoes it in fp64
        G[1] *= 1e36
    elif broken:  # a non-finite row in the last bucket: the Gram rules fall back to rule(G), dropping it
        G[1, -5] = float(broken)
    for step in range(2):  # the matrix is reused across steps
        exchange, _ = exchange_of(G, name, params)
        update = exchange.finish(len(SIZES), torch.device("cpu"), step)
        reference = get(name, **params)
        expected = reference(G.clone())
        torch.testing.assert_close(update, expected, rtol=0, atol=0, equal_nan=True)  # bit for bit
        assert exchange.aggregator.diagnostics == reference.diagnostics


@pytest.mark.parametrize("name", ["mean", "flag"])
def test_one_bucket_and_several_give_the_same_bits(name):
    G = rows(seed=1)
    several, _ = exchange_of(G, name, {"f": 1} if name == "flag" else {})
    one, _ = exchange_of(G, name, {"f": 1} if name == "flag" else {}, sizes=[G.shape[1]])
    assert torch.equal(several.finish(len(SIZES), torch.device("cpu"), 0), one.finish(1, torch.device("cpu"), 0))


def test_each_buckets_gram_blocks_are_added_before_the_next_bucket_is_waited_for(monkeypatch):
    """Overlap: the Gram blocks within the columns received so far are added before the next
    wait; only the blocks that straddle a bucket boundary wait for the bucket that completes them."""
    G = rows(seed=2)
    exchange, transport = exchange_of(G, "flag", {"f": 1})
    added = []
    advance = allgather_module.CentredGram.advance

    def logged(self, filled):
        advance(self, filled)
        added.append(self.done)
        transport.events.append(("blocks", self.done))

    monkeypatch.setattr(allgather_module.CentredGram, "advance", logged)
    exchange.finish(len(SIZES), torch.device("cpu"), 0)
    events = transport.events
    assert [e[0] for e in events] == ["wait", "blocks"] * len(SIZES)
    blocks = allgather_module.CentredGram(G).blocks
    ends = [sum(SIZES[: i + 1]) for i in range(len(SIZES))]
    for end, (_, done) in zip(ends, events[1::2]):
        assert done == sum(1 for b in blocks if b.stop <= end)  # every block within reach, no more
    assert 0 < added[0] < added[-1] == len(blocks)
    assert exchange.stats["overlapped_s"] > 0
