"""The sharded exchange against one-process aggregation, on an in-process world of p ranks."""

import pytest
import torch

from fa_hvd.aggregators import get
from fa_hvd.aggregators.geometry import gram
from fa_hvd.exchange import ShardedExchange, ShardMismatch, make_exchange
from fa_hvd.exchange.cost import exchange_cost
from local_world import LocalTransport, run_ranks

SIZES = [37, 50, 13]  # buckets crossing shard boundaries; n = 100 is no multiple of p = 7
P = 7
RULES = ["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geomed", "cclip", "mda", "nmean",
         "flag", "nnm+krum", "bucketing+median", "arc+trimmed_mean", "nnm+cclip", "clip+geomed", "nnm+bulyan"]


def honest(p=P, n=sum(SIZES), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) + 0.5 * torch.randn(p, n, generator=gen)


def faulty(kind, p=P):
    """p rows, rows 1 and 4 faulty: a NaN in one coordinate (one shard sees it), Inf, a huge row, ALIE."""
    G = honest(p)
    if kind == "nan":
        G[1, 60] = float("nan")
        G[4, 3] = float("inf")
    elif kind == "huge":
        G[1] = 1e38
        G[4, :50] = -1e38
    elif kind == "alie":
        good = torch.cat([G[:1], G[2:4], G[5:]])
        G[1] = G[4] = good.mean(0) - 1.0 * good.std(0)
    return G


def sharded(name, G, sizes=SIZES, steps=1, scale=None, **options):
    """Run the sharded exchange on len(G) ranks; per rank, the list of step results."""
    p = G.shape[0]

    def body(transport):
        exchange = make_exchange("sharded", transport, get(name, f=1), sizes, **options)
        out = []
        for step in range(steps):
            row = G[transport.rank] * (1 if scale is None else scale[step])
            offset = 0
            for index, size in enumerate(sizes):
                exchange.submit(index, row[offset : offset + size].clone())
                offset += size
            out.append(exchange.result())
        return out, exchange

    return run_ranks(p, body)


def bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("kind", ["clean", "nan", "huge", "alie"])
@pytest.mark.parametrize("name", RULES)
def test_sharded_equals_one_process_aggregation(name, kind):
    G = faulty(kind)
    ranks = sharded(name, G, steps=2, scale=[1.0, -0.5])
    reference = get(name, f=1)
    for step, scale in enumerate([1.0, -0.5]):
        expected = reference(G * scale)
        first = ranks[0][0][step]
        assert all(torch.equal(bits(out[step]), bits(first)) for out, _ in ranks)  # ranks agree bit for bit
        # Where the reference itself is not finite (mean; huge rows until geometry.gram takes them), same there.
        scale = float(expected[expected.isfinite()].abs().max()) if expected.isfinite().any() else 1.0
        assert first.dtype == expected.dtype
        assert torch.allclose(first, expected, rtol=1e-5, atol=1e-5 * scale + 1e-6, equal_nan=True), \
            (first - expected).abs().max()


def test_mean_propagates_non_finite_values_like_allgather():
    G = faulty("nan")
    [(out, _), *_] = sharded("mean", G)
    expected = G.mean(0)
    assert torch.equal(out[0].isnan(), expected.isnan()) and torch.equal(out[0].isinf(), expected.isinf())
    finite = expected.isfinite()
    assert torch.allclose(out[0][finite], expected[finite], atol=1e-6)


def test_every_row_non_finite_gives_zero_on_every_rank():
    G = torch.full((5, 20), float("nan"))
    for out, _ in sharded("krum", G, sizes=[20]):
        assert torch.equal(out[0], torch.zeros(20))


def test_partial_grams_sum_to_the_gram_bit_for_bit_on_every_rank(monkeypatch):
    G = faulty("clean")
    grams = {}
    original = ShardedExchange._gram

    def spy(self, *args):
        K, finite = original(self, *args)
        grams[self.rank] = K
        return K, finite

    monkeypatch.setattr(ShardedExchange, "_gram", spy)
    sharded("krum", G)
    assert all(torch.equal(bits(K), bits(grams[0])) for K in grams.values())
    assert torch.allclose(grams[0], gram(G.double()), rtol=1e-6)


def test_fewer_coordinates_than_ranks_and_fp16():
    G = honest(p=5, n=3).half()
    for name in ("median", "flag"):
        [(out, _), *_] = sharded(name, G, sizes=[1, 2])
        assert out[0].dtype == torch.float16
        assert torch.allclose(out[0].float(), get(name, f=1)(G).float(), atol=1e-3)


def test_cclip_centre_matches_allgather_mode_across_steps():
    G = faulty("alie")
    ranks = sharded("cclip", G, steps=3, scale=[1.0, 1.0, 1.0])
    reference = get("cclip", f=1)
    for step in range(3):
        assert torch.allclose(ranks[0][0][step], reference(G), atol=1e-5)
    for _, exchange in ranks:
        assert torch.allclose(exchange.aggregator.state_dict()["center"], reference.state_dict()["center"],
                              atol=1e-5)


class Fp16:
    @staticmethod
    def compress(tensor):
        return tensor.half(), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx)


def test_compression_applies_to_both_collectives():
    G = honest()
    [(out, _), *_] = sharded("multikrum", G, compression=Fp16)
    expected = get("multikrum", f=1)(G.half().float()).half().float()  # as Horovod's fp16 allreduce
    assert torch.allclose(out[0], expected, atol=2e-3)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("name", ["geomed", "cclip"])
def test_traffic_and_memory_are_the_cost_model(name, replicas, monkeypatch):
    """What each rank receives from the others in every collective, and the exchange's own buffers."""
    got = {}

    class Counting(LocalTransport):
        def alltoall_async(self, tensor, splits, name, received=None):
            handle = super().alltoall_async(tensor, splits, name, received)
            mine = handle.value.numel() * handle.value.element_size()
            got[self.rank] = got.get(self.rank, 0) + mine * (self.size - 1) // self.size
            return handle

        def allgather_async(self, tensor, name):
            handle = super().allgather_async(tensor, name)
            others = handle.value.numel() * handle.value.element_size() * (self.size - 1) // self.size
            got[self.rank] = got.get(self.rank, 0) + others
            return handle

    import local_world
    monkeypatch.setattr(local_world, "LocalTransport", Counting)
    n, p = 4000, 4
    ranks = sharded(name, honest(p=p, n=n), sizes=[1000, 3000], replicas=replicas)
    model = exchange_cost("sharded", n, p, replicas=replicas, anchors=1 if name == "cclip" else 0)
    for rank, (_, exchange) in enumerate(ranks):
        assert got[rank] == model["bytes_received"] == model["bytes_sent"]
        assert exchange.stats["peak_bytes"] == model["memory_bytes"]
    assert [call for call, _ in ranks[0][1].transport.calls] == ["alltoall", "alltoall", "allgather", "allgather"]
    allreduce = exchange_cost("allreduce", n, p)["bytes_received"]
    assert model["bytes_received"] <= 1.1 * replicas * allreduce  # the bar, even at n = 4000


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_agree_with_the_plain_sharded_exchange(replicas):
    G = faulty("nan", p=5)
    plain = sharded("multikrum", G)[0][0][0]
    for out, _ in sharded("multikrum", G, replicas=replicas):
        assert torch.equal(out[0], plain)


class LyingGram(ShardedExchange):
    def _gram(self, pieces, *args):
        if self.rank == 2:
            pieces[0][0][1][0, 0] += 1.0  # its first shard's first value, as if miscomputed
        return super()._gram(pieces, *args)


class LyingShard(ShardedExchange):
    def _gather(self, out):
        if self.rank == 3:
            out[0, 0] += 1.0
        return super()._gather(out)


def run_replicated(exchange_cls, p=5, replicas=3, transport_cls=LocalTransport):
    import local_world
    G = honest(p=p, n=60)

    def body(transport):
        exchange = exchange_cls(transport, get("krum", f=1), [60], replicas=replicas)
        exchange.submit(0, G[transport.rank].clone())
        return exchange.result()

    original = local_world.LocalTransport
    local_world.LocalTransport = transport_cls
    try:
        return run_ranks(p, body)
    finally:
        local_world.LocalTransport = original


def test_a_rank_that_miscomputes_its_partial_gram_is_named():
    with pytest.raises(ShardMismatch, match=r"partial Gram .* shard 2: rank\(s\) \[2\] disagree with the majority \[3, 4\]"):
        run_replicated(LyingGram)
    with pytest.raises(ShardMismatch, match=r"shard 2: ranks \[2, 3\] disagree with no majority"):
        run_replicated(LyingGram, replicas=2)


def test_a_rank_that_miscomputes_its_aggregate_shard_is_named():
    with pytest.raises(ShardMismatch, match=r"shard 3 of the aggregate: rank\(s\) \[3\] disagree"):
        run_replicated(LyingShard)


class Equivocating(LocalTransport):
    """Rank 1 sends rank 4 a different chunk than the other replicas of the same shard get."""

    def alltoall_async(self, tensor, splits, name, received=None):
        if self.rank == 1:
            tensor = tensor.clone()
            tensor[sum(splits[:4])] += 1.0
        return super().alltoall_async(tensor, splits, name, received)


def test_a_rank_that_sends_replicas_different_chunks_is_named():
    with pytest.raises(ShardMismatch, match=r"received different data from rank 1 for shard 4"):
        run_replicated(ShardedExchange, transport_cls=Equivocating)


def test_rules_that_need_whole_rows_are_refused():
    with pytest.raises(ValueError, match="flag.*exchange='allgather'"):
        run_ranks(2, lambda t: make_exchange("sharded", t, get("flag", mode="reference"), [4]))
    with pytest.raises(ValueError, match="exchange='allgather'"):
        run_ranks(2, lambda t: make_exchange("sharded", t, lambda G: G.mean(0), [4]))
    with pytest.raises(ValueError, match=r"replicas=3 needs at least as many ranks, got 2"):
        run_ranks(2, lambda t: make_exchange("sharded", t, get("mean"), [4], replicas=3))
    with pytest.raises(ValueError, match="exchange must be one of allgather, sharded"):
        run_ranks(2, lambda t: make_exchange("ring", t, get("mean"), [4]))


def test_allgather_exchange_is_the_aggregator_on_the_gathered_matrix():
    G = faulty("nan")

    def body(transport):
        exchange = make_exchange("allgather", transport, get("bulyan", f=1), SIZES)
        offset = 0
        for index, size in enumerate(SIZES):
            exchange.submit(index, G[transport.rank, offset : offset + size].clone())
            offset += size
        return exchange.result(), exchange.stats["peak_bytes"]

    for out, peak in run_ranks(P, body):
        assert torch.equal(out, get("bulyan", f=1)(G))
        assert peak == 2 * G.numel() * 4  # the buckets gathered, then concatenated


def test_the_shards_follow_a_change_of_world_size():
    """After an elastic reset the transport reports the new rank and size; the next step re-shards."""
    G = faulty("alie", p=5)
    exchanges = run_ranks(5, lambda t: make_exchange("sharded", t, get("geomed", f=1), SIZES))

    def body(transport):  # the first three ranks carry on as a world of three
        exchange = exchanges[transport.rank]
        exchange.transport = transport
        offset = 0
        for index, size in enumerate(SIZES):
            exchange.submit(index, G[transport.rank, offset : offset + size].clone())
            offset += size
        return exchange.result()

    for out in run_ranks(3, body):
        assert torch.allclose(out, get("geomed", f=1)(G[:3]), atol=1e-5)
