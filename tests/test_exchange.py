"""The sharded exchange against one-process aggregation (what allgather mode computes), on an in-process
world of p ranks (tests/local_world.py)."""

import collections
import threading

import pytest
import torch
from horovod.torch import Compression

import local_world
from fa_hvd.aggregators import get, native
from fa_hvd.aggregators.geometry import gram
from fa_hvd.exchange import ShardedExchange, ShardMismatch, agree_on_compiled_kernels, replicated
from fa_hvd.exchange import sharded as sharded_module
from fa_hvd.exchange.cost import exchange_cost
from local_world import LocalTransport, run_ranks

SIZES = [37, 50, 13]  # buckets whose sizes are no multiple of p = 7
P = 7
RULES = ["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geomed", "cclip", "mda", "nmean",
         "flag", "nnm+krum", "bucketing+median", "arc+trimmed_mean", "nnm+cclip", "clip+geomed", "nnm+bulyan"]


@pytest.fixture(autouse=True)
def gather_in_pieces(monkeypatch):
    """The aggregate's allgather in pieces of columns (a real model's width gives 4), cut across
    the buckets' and the shards' boundaries alike at these small sizes (16 columns at p = 7)."""
    monkeypatch.setattr(sharded_module, "MIN_GATHER_PIECE", 3)


def honest(p=P, n=sum(SIZES), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) + 0.5 * torch.randn(p, n, generator=gen)


def faulty(kind, p=P):
    """p rows, rows 1 and 4 faulty: NaN in one coordinate (one shard sees it) and Inf, huge rows, or ALIE."""
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


def step(exchange, row, sizes=SIZES, order=None, index=0):
    """One step: every bucket started (in ``order``; default last first, as backward makes them), then finish
    (its aggregate copied: the exchange writes the step after next into the same buffer)."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for bucket in order if order is not None else reversed(range(len(sizes))):
        exchange.start(bucket, row[offsets[bucket] : offsets[bucket] + sizes[bucket]].clone())
    return exchange.finish(len(sizes), row.device, index).clone()


def sharded(name, G, sizes=SIZES, steps=1, scale=None, f=1, **options):
    """The sharded exchange on len(G) ranks (odd ranks start their buckets in another order).

    Per rank: (the step results, the exchange)."""

    def body(transport):
        exchange = ShardedExchange(transport, get(name, f=f), prefix="test", **options)
        buckets = list(range(len(sizes)))
        order = buckets[transport.rank % 2 :] + buckets[: transport.rank % 2]
        outs = [step(exchange, G[transport.rank] * (1 if scale is None else scale[i]), sizes, order, i)
                for i in range(steps)]
        return outs, exchange

    return run_ranks(G.shape[0], body)


def bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("kind", ["clean", "nan", "huge", "alie"])
@pytest.mark.parametrize("name", RULES)
def test_sharded_equals_one_process_aggregation(name, kind):
    G = faulty(kind)
    ranks = sharded(name, G, steps=2, scale=[1.0, -0.5])
    reference = get(name, f=1)
    for index, scale in enumerate([1.0, -0.5]):
        expected = reference(G * scale)
        first = ranks[0][0][index]
        assert all(torch.equal(bits(out[index]), bits(first)) for out, _ in ranks)  # ranks agree bit for bit
        # Where the reference itself is not finite (mean; huge rows until geometry.gram takes them), same there.
        top = float(expected[expected.isfinite()].abs().max()) if expected.isfinite().any() else 1.0
        assert first.dtype == expected.dtype
        assert torch.allclose(first, expected, rtol=1e-5, atol=1e-5 * top + 1e-6, equal_nan=True), \
            (first - expected).abs().max()


def test_a_senders_squared_norm_sums_every_piece_of_a_long_chunk(monkeypatch):
    """The sender's word on a chunk longer than CLAIM_PIECE (here 8 values) is the fp64 sum of squares of all of
    it, to fp64 rounding (any order of summing 21 positive terms, and each piece's sqrt and square, stay within a
    few dozen ulps; a missing piece is off by a quarter or more), and a non-finite value in its last piece makes the word
    non-finite."""
    monkeypatch.setattr(sharded_module, "CLAIM_PIECE", 8)
    x = torch.randn(21, generator=torch.Generator().manual_seed(3)) * 1e20  # fp32 squares would overflow
    exact = float((x.double() ** 2).sum())
    assert float(sharded_module.squared_norm(x)) == pytest.approx(exact, rel=1e-13)
    assert float(sharded_module.squared_norm(x[:0])) == 0.0
    for bad in (float("inf"), float("nan")):
        y = x.clone()
        y[-1] = bad
        assert not torch.isfinite(sharded_module.squared_norm(y))


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
        K, rows, evidence = original(self, *args)
        grams[self.rank] = K
        return K, rows, evidence

    monkeypatch.setattr(ShardedExchange, "_gram", spy)
    sharded("krum", G)
    assert len(grams) == P and all(torch.equal(bits(K), bits(grams[0])) for K in grams.values())
    assert torch.allclose(grams[0], gram(G.double()), rtol=1e-6)


def test_buckets_smaller_than_the_world_and_fp16():
    G = honest(p=5, n=9).half()
    for name in ("median", "flag"):
        [(out, _), *_] = sharded(name, G, sizes=[1, 2, 6])
        assert out[0].dtype == torch.float16
        assert torch.allclose(out[0].float(), get(name, f=1)(G).float(), atol=1e-3)


def test_bf16_buckets_travel_and_aggregate_as_fp32():
    G = honest(p=5, n=40).bfloat16()
    [(out, _), *_] = sharded("trimmed_mean", G, sizes=[15, 25])
    assert out[0].dtype == torch.float32  # as the optimizer sends bf16 in allgather mode
    assert torch.equal(out[0], get("trimmed_mean", f=1)(G.float()))


@pytest.mark.parametrize("name", ["mean", "flag"])  # the mean's shards gathered early, FA's after the solve
def test_sharded_last_aggregate_outlives_the_next_step_in_two_reused_buffers(name):
    """As the allgather exchange (test_overlap.py): the aggregate is written into one of two buffers kept
    across steps, never into the one that holds the last step's aggregate."""
    G = honest()
    scale = [1.0, -0.5, 2.0, 0.25]

    def body(transport):
        exchange = ShardedExchange(transport, get(name, f=1), prefix="test")
        offsets = [sum(SIZES[:i]) for i in range(len(SIZES))]
        kept, held = [], []
        for index, factor in enumerate(scale):
            row = G[transport.rank] * factor
            for bucket in reversed(range(len(SIZES))):
                exchange.start(bucket, row[offsets[bucket]: offsets[bucket] + SIZES[bucket]].clone())
            held.append(exchange.finish(len(SIZES), row.device, index))
            kept.append(held[-1].clone())
            if index:
                assert torch.equal(held[-2], kept[-2])  # the last step's aggregate, untouched
        return kept, {t.data_ptr() for t in held}

    for kept, buffers in run_ranks(G.shape[0], body):
        assert len(buffers) == 2
        for aggregate, factor in zip(kept, scale):
            torch.testing.assert_close(aggregate, get(name, f=1)(G * factor), rtol=1e-5, atol=1e-6)


def test_cclip_centre_matches_allgather_mode_across_steps():
    G = faulty("alie")
    ranks = sharded("cclip", G, steps=3, scale=[1.0, 1.0, 1.0])
    reference = get("cclip", f=1)
    for index in range(3):
        assert torch.allclose(ranks[0][0][index], reference(G), atol=1e-5)
    for _, exchange in ranks:
        assert torch.allclose(exchange.aggregator.state_dict()["center"], reference.state_dict()["center"],
                              atol=1e-5)


def test_compression_applies_to_both_collectives():
    G = honest()
    [(out, _), *_] = sharded("multikrum", G, compression=Compression.fp16)
    expected = get("multikrum", f=1)(G.half().float()).half().float()  # as Horovod's fp16 allreduce
    assert torch.allclose(out[0], expected, atol=2e-3)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("name", ["geomed", "cclip"])
def test_traffic_and_memory_are_the_cost_model(name, replicas, monkeypatch):
    """What each rank receives from the others in every collective, and the exchange's own buffers."""
    got = {}

    class Counting(LocalTransport):
        def wait(self, handle):  # alltoall and allgather: equal parts from every rank
            out = super().wait(handle)
            got[self.rank] = got.get(self.rank, 0) + out.numel() * out.element_size() * (self.size - 1) // self.size
            return out

    monkeypatch.setattr(local_world, "LocalTransport", Counting)
    sizes, p = [1000, 3000], 4
    ranks = sharded(name, honest(p=p, n=4000), sizes=sizes, replicas=replicas)
    model = exchange_cost("sharded", sizes, p, replicas=replicas, anchors=1 if name == "cclip" else 0)
    for rank, (_, exchange) in enumerate(ranks):
        assert got[rank] == model["bytes_received"] == model["bytes_sent"]
        assert exchange.stats["peak_bytes"] == model["memory_bytes"]
    calls = ranks[0][1].transport.calls
    assert [call for call, _ in calls] == ["alltoall", "alltoall", "allgather"] + ["allgather"] * 4
    assert [name for _, name in calls[3:]] == [f"test.out#piece{k}" for k in range(4)]  # the aggregate's pieces
    allreduce = exchange_cost("allreduce", sizes, p)["bytes_received"]
    assert model["bytes_received"] <= 1.1 * replicas * allreduce  # the bar, even at n = 4000


def test_a_failed_piece_of_the_aggregates_allgather_abandons_the_rest_and_drops_the_kept_buffers(monkeypatch):
    """Step 5's pieces are all in flight when piece 1's wait fails: pieces 2 and 3 are abandoned and
    the kept receive buffers dropped (the collectives may still write there); the next step gathers
    into new ones and gives the rule's aggregate."""

    class FailingPiece(LocalTransport):
        fail = True

        def __init__(self, *args):
            super().__init__(*args)
            self.abandoned = []

        def wait(self, handle):
            result = super().wait(handle)
            if self.fail and handle.key[0] == "test.out#piece1":
                raise ConnectionError("peer gone")
            return result

        def abandon(self, handle):
            self.abandoned.append(handle.key[0])
            super().abandon(handle)

    monkeypatch.setattr(local_world, "LocalTransport", FailingPiece)
    G = honest()

    def body(transport):
        exchange = ShardedExchange(transport, get("krum", f=1), prefix="test")
        with pytest.raises(RuntimeError, match="peer gone"):
            step(exchange, G[transport.rank])
        failed = list(exchange._gathered)
        transport.fail = False
        out = step(exchange, G[transport.rank], index=1)
        return out, failed, exchange._gathered, transport.abandoned

    monkeypatch.setattr(FailingPiece, "fail", False)
    expected = sharded("krum", G)[0][0][0]  # the same exchange without the failure: the same bits
    monkeypatch.setattr(FailingPiece, "fail", True)
    for out, failed, gathered, abandoned in run_ranks(P, body):
        assert abandoned == ["test.out#piece2", "test.out#piece3"]
        assert failed == [] and len(gathered) == 4
        assert torch.equal(out, expected)


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_agree_with_the_plain_sharded_exchange(replicas):
    G = faulty("nan", p=5)
    plain = sharded("multikrum", G)[0][0][0]
    for out, _ in sharded("multikrum", G, replicas=replicas):
        assert torch.equal(out[0], plain)


class LyingGram(ShardedExchange):
    def _gram(self, work, *args):
        if self.rank == 2:
            work.partial.K[0][0, 0] += 1.0  # its first shard's partial Gram, as if miscomputed
        return super()._gram(work, *args)


class LyingShard(ShardedExchange):
    def _gather(self, out, *args):
        if self.rank == 3:
            out[0, 0] += 1.0
        return super()._gather(out, *args)


class Equivocating(LocalTransport):
    """Rank 1 sends rank 4 a different chunk than the other replicas of the same shard get."""

    def alltoall_async(self, tensor, splits, name, received=None):
        if self.rank == 1:
            tensor = tensor.clone()
            tensor[sum(splits[:4])] += 1.0
        return super().alltoall_async(tensor, splits, name, received)


def run_replicated(exchange_cls, monkeypatch, replicas=3, transport_cls=LocalTransport):
    """Five ranks, krum with f = 1; per rank: (the aggregate, the exchange's diagnostics)."""
    monkeypatch.setattr(local_world, "LocalTransport", transport_cls)
    G = honest(p=5, n=60)

    def body(t):
        exchange = exchange_cls(t, get("krum", f=1), replicas=replicas)
        return step(exchange, G[t.rank], [60]), exchange.aggregator.diagnostics

    return run_ranks(5, body)


def honest_krum(monkeypatch):
    return run_replicated(ShardedExchange, monkeypatch, replicas=1)[0][0]


@pytest.mark.parametrize("liar,what,shard,odd", [
    (LyingGram, "the partial Gram and row flags", 2, [2]),
    (LyingShard, "the aggregate", 3, [3]),
])
def test_with_2f_plus_1_replicas_a_lying_holder_is_outvoted_and_named(monkeypatch, liar, what, shard, odd):
    expected = honest_krum(monkeypatch)
    for out, diagnostics in run_replicated(liar, monkeypatch):
        assert torch.equal(out, expected)
        assert diagnostics["repaired"][what] == {shard: odd}


def test_with_f_plus_1_replicas_a_lie_is_detected_blaming_no_one(monkeypatch):
    with pytest.raises(ShardMismatch, match=r"partial Gram and row flags of shard 2: ranks \[2, 3\] disagree and no "
                                            r"one copy is held by more than f=1 of them"):
        run_replicated(LyingGram, monkeypatch, replicas=2)
    with pytest.raises(ShardMismatch, match=r"the aggregate of shard 3: ranks \[3, 4\] disagree"):
        run_replicated(LyingShard, monkeypatch, replicas=2)


def test_a_rank_that_sends_replicas_different_chunks_is_outvoted_or_detected(monkeypatch):
    expected = honest_krum(monkeypatch)
    for out, diagnostics in run_replicated(ShardedExchange, monkeypatch, transport_cls=Equivocating):
        assert torch.equal(out, expected)  # holders 0 and 1 got rank 1's true chunk of shard 4; rank 4 did not
        assert diagnostics["repaired"]["the partial Gram and row flags"] == {4: [4]}
    with pytest.raises(ShardMismatch, match=r"received different data from rank 1 for shard 4"):
        run_replicated(ShardedExchange, monkeypatch, replicas=2, transport_cls=Equivocating)


def test_fewer_replicas_than_f_plus_1_are_refused_naming_k_and_f():
    with pytest.raises(ValueError, match=r"replicas=2 cannot keep the promise for f=2.*>= f \+ 1 = 3.*>= 2f \+ 1 = 5"):
        ShardedExchange(None, get("krum", f=2), replicas=2)


def test_rules_that_need_whole_rows_are_refused():
    with pytest.raises(ValueError, match="flag.*exchange='allgather'"):
        ShardedExchange(None, get("flag", mode="reference"))
    with pytest.raises(ValueError, match="<lambda>.*exchange='allgather'"):
        ShardedExchange(None, lambda G: G.mean(0))
    with pytest.raises(ValueError, match="replicas must be a positive integer"):
        ShardedExchange(None, get("mean"), replicas=0)
    with pytest.raises(ValueError, match=r"replicas=3 needs at least as many ranks, got 2"):
        run_ranks(2, lambda t: step(replicated(3)(t, get("mean"), None, "x"), torch.ones(4), [4]))


def test_the_shards_follow_a_change_of_world_size():
    """After an elastic reset the transport reports the new rank and size; the next step re-shards."""
    G = faulty("alie", p=5)
    exchanges = run_ranks(5, lambda t: ShardedExchange(t, get("geomed", f=1)))

    def body(transport):  # the first three ranks carry on as a world of three
        exchange = exchanges[transport.rank]
        exchange.transport = transport
        return step(exchange, G[transport.rank])

    for out in run_ranks(3, body):
        assert torch.allclose(out, get("geomed", f=1)(G[:3]), atol=1e-5)


def test_a_failed_collective_names_the_rank_step_and_stage(monkeypatch):
    class Failing(LocalTransport):
        def wait(self, handle):
            raise OSError("connection reset")

    monkeypatch.setattr(local_world, "LocalTransport", Failing)
    with pytest.raises(RuntimeError, match=r"rank \d: the gradient exchange failed at step 0 \(bucket 0\): connection"):
        run_ranks(2, lambda t: step(ShardedExchange(t, get("mean")), torch.ones(10), [4, 6]))


# -- through the optimizer -------------------------------------------------------------------------


def train(exchange, rule, p=5, steps=3, byzantine=None, **params):
    """Each of ``p`` ranks trains the same small model on its own batch; rank ``byzantine`` sends -50 g.

    Per rank: (parameters after ``steps`` steps, the optimizer's last stats)."""
    import copy

    import torch.nn.functional as F
    from torch import nn

    import fa_hvd

    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))  # built once: the RNG is global

    def body(transport):
        model = copy.deepcopy(template)
        gen = torch.Generator().manual_seed(transport.rank)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        attack = (lambda flat, index, step: -50 * flat) if transport.rank == byzantine else None
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                          named_parameters=model.named_parameters(), aggregator=rule,
                                          aggregator_params=params, transport=transport, exchange=exchange,
                                          bucket_bytes=400, gradient_transform=attack)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return torch.cat([q.detach().reshape(-1) for q in model.parameters()]), opt.stats

    return run_ranks(p, body)


@pytest.mark.parametrize("rule, params", [("mean", {}), ("flag", {"f": 1, "r": 2}), ("median", {"f": 1}),
                                          ("cclip", {"f": 1}), ("nnm+bulyan", {"f": 0})])
def test_the_optimizer_trains_alike_with_either_exchange(rule, params):
    byzantine = None if rule in ("mean", "nnm+bulyan") else 3
    gathered = train("allgather", rule, byzantine=byzantine, **params)
    sharded = train("sharded", rule, byzantine=byzantine, **params)
    assert all(torch.equal(bits(w), bits(sharded[0][0])) for w, _ in sharded)  # ranks agree bit for bit
    torch.testing.assert_close(sharded[0][0], gathered[0][0], rtol=1e-5, atol=1e-6)
    assert sharded[0][1]["peak_bytes"] > 0 and "peak_bytes" not in gathered[0][1]


def test_the_optimizer_refuses_a_rule_the_sharded_exchange_cannot_run():
    with pytest.raises(ValueError, match="exchange='allgather'"):
        train("sharded", "flag", mode="reference", f=0)


def test_the_optimizer_takes_a_factory_with_replicas():
    from fa_hvd.exchange import replicated

    plain = train("sharded", "median", f=1)
    twice = train(replicated(2), "median", f=1)
    assert torch.equal(twice[0][0], plain[0][0])


def test_finite_rows_from_the_gram_only_where_its_squares_cannot_overflow(monkeypatch):
    """fp32 data: a row is finite iff its fp64 squared norm is; fp64 data: checked value by value."""
    flags = {}
    original = ShardedExchange._gram

    def spy(self, *args):
        K, rows, evidence = original(self, *args)
        kept = torch.ones(self.p, dtype=torch.bool) if rows.keep is None else torch.zeros(self.p, dtype=torch.bool)
        kept[rows.keep if rows.keep is not None else []] = True
        flags.setdefault(args[0].compute, kept)  # by compute dtype
        return K, rows, evidence

    monkeypatch.setattr(ShardedExchange, "_gram", spy)
    G = honest(p=5, n=30)
    G[1, 7], G[2] = float("nan"), 3e38  # a NaN, and a finite row whose square only fp64 holds
    sharded("geomed", G, sizes=[30])
    G64 = G.double()
    G64[2] = 1e200  # finite, but its square overflows fp64
    sharded("geomed", G64, sizes=[30])
    expected = torch.tensor([True, False, True, True, True])
    assert torch.equal(flags[torch.float32], expected) and torch.equal(flags[torch.float64], expected)


def test_each_buckets_partial_gram_is_added_as_it_arrives(monkeypatch):
    """Step 2 overlaps the later alltoalls: a bucket's piece of the partial Gram is added before
    the next bucket is waited for (per rank, in bucket order), not after the last one."""
    events = collections.defaultdict(list)
    waited, added = LocalTransport.wait, sharded_module._PartialGram.add

    def logged_wait(self, handle):
        events[threading.get_ident()].append(handle.key[0])
        return waited(self, handle)

    def logged_add(self, t, piece, cols):
        events[threading.get_ident()].append("add")
        added(self, t, piece, cols)

    monkeypatch.setattr(LocalTransport, "wait", logged_wait)
    monkeypatch.setattr(sharded_module._PartialGram, "add", logged_add)
    sharded("krum", honest(p=5, n=sum(SIZES)))
    buckets = [f"test.bucket{i}" for i in range(len(SIZES))]
    assert len(events) == 5
    for log in events.values():
        assert log[: 2 * len(SIZES)] == [e for b in buckets for e in (b, "add")]
        assert log[2 * len(SIZES)] == "test.gram"


# -- early rules: each bucket's shards of the aggregate gathered as its alltoall arrives ------------

class Threaded(LocalTransport):
    """The in-process world with the exchange's worker thread on (as Horovod and torch.distributed)."""

    waits_from_any_thread = True


EARLY = ["mean", "median", "trimmed_mean"]


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("kind", ["clean", "nan", "huge"])
@pytest.mark.parametrize("name", EARLY)
def test_early_rules_give_the_bits_of_the_aggregate_after_the_last_bucket(monkeypatch, name, kind, threaded):
    """Every coordinate-wise rule, with every row finite or with a NaN and an Inf in one bucket each
    (a robust rule then drops their rows: the shards gathered early go unused), gives on every rank
    the bits of the same exchange with the shards combined after the last bucket; the shards are
    gathered per bucket (plus once more where rows were dropped), on the worker when threaded."""
    G, scale = faulty(kind), [1.0, -0.5]
    if threaded:
        monkeypatch.setattr(local_world, "LocalTransport", Threaded)
    early = sharded(name, G, steps=2, scale=scale)
    with monkeypatch.context() as m:
        m.setattr(sharded_module, "_early", lambda aggregator, replicas: False)
        late = sharded(name, G, steps=2, scale=scale)
    dropped = kind == "nan" and name != "mean"
    for (outs, exchange), (expected, _) in zip(early, late):
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(outs, expected))
        gathers = [c for c in exchange.transport.calls if c[0] == "allgather" and c[1].startswith("test.out")]
        assert len(gathers) == 2 * (len(SIZES) + dropped * exchange.transport.gather_pieces)  # pieces after a drop
        assert (exchange._worker is not None) == threaded


@pytest.mark.parametrize("pieces", [1, 4])
def test_the_aggregate_is_gathered_in_the_transports_number_of_pieces(monkeypatch, pieces):
    """Step 5's allgather in the transport's ``gather_pieces`` (Horovod's 1, torch.distributed's 4),
    with the same bits either way."""
    G = faulty("clean")
    whole = sharded("krum", G)
    monkeypatch.setattr(local_world.LocalTransport, "gather_pieces", pieces)
    for (outs, exchange), (expected, _) in zip(sharded("krum", G), whole):
        gathers = [c for c in exchange.transport.calls if c[0] == "allgather" and c[1].startswith("test.out")]
        assert len(gathers) == pieces
        assert torch.equal(bits(outs[0]), bits(expected[0]))


def test_early_shards_are_gathered_before_finish_on_the_worker(monkeypatch):
    """With the worker, each bucket's shards of the aggregate are on the wire before finish() is
    called (here: finish waits until every rank has started them all), in bucket order."""
    monkeypatch.setattr(local_world, "LocalTransport", Threaded)
    G = honest(p=5)

    def body(transport):
        exchange = ShardedExchange(transport, get("median", f=1), prefix="test")
        offsets = [sum(SIZES[:i]) for i in range(len(SIZES))]
        for index in range(len(SIZES)):
            exchange.start(index, G[transport.rank, offsets[index] : offsets[index] + SIZES[index]].clone())
        for _ in range(600):  # until the worker has started every bucket's allgather (a hang guard, not a timing)
            if len([c for c in transport.calls if c[1].startswith("test.out")]) == len(SIZES):
                break
            threading.Event().wait(0.1)
        started = list(transport.calls)
        return exchange.finish(len(SIZES), torch.device("cpu"), 0), started

    for out, started in run_ranks(5, body):
        assert sorted(started) == [("allgather", f"test.out#{i}") for i in range(len(SIZES))] + \
            [("alltoall", f"test.bucket{i}") for i in range(len(SIZES))]
        assert torch.equal(out, get("median", f=1)(G))


def test_a_failed_wait_on_the_worker_names_the_bucket_and_the_next_step_runs(monkeypatch):
    class Failing(Threaded):
        fail = True

        def wait(self, handle):
            if self.fail and handle.key[0] == "test.bucket1":
                super().wait(handle)
                raise OSError("connection reset")
            return super().wait(handle)

    monkeypatch.setattr(local_world, "LocalTransport", Failing)
    G = honest(p=3)

    def body(transport):
        exchange = ShardedExchange(transport, get("mean"), prefix="test")
        with pytest.raises(RuntimeError, match=rf"rank {transport.rank}: the gradient exchange failed at step 0 "
                                               r"\(bucket 1\): connection reset"):
            step(exchange, G[transport.rank])
        transport.fail = False
        return step(exchange, G[transport.rank], index=1)

    for out in run_ranks(3, body):
        assert torch.equal(out, get("mean")(G))


@pytest.mark.parametrize("kind", ["clean", "nan"])
@pytest.mark.parametrize("name", ["median", "krum"])
def test_each_buckets_part_is_the_aggregates_bits_cut_at_the_buckets(monkeypatch, name, kind):
    """finish_buckets (the DDP hook's): the aggregate's bits cut at the buckets (an early rule's
    straight from its allgather; otherwise views of the aggregate)."""
    monkeypatch.setattr(local_world, "LocalTransport", Threaded)
    G = faulty(kind)
    whole = sharded(name, G)
    offsets = [sum(SIZES[:i]) for i in range(len(SIZES))]

    def body(transport):
        exchange = ShardedExchange(transport, get(name, f=1), prefix="test")
        for index in range(len(SIZES)):
            exchange.start(index, G[transport.rank, offsets[index] : offsets[index] + SIZES[index]].clone())
        return exchange.finish_buckets(SIZES, torch.device("cpu"), 0)

    for parts, (expected, _) in zip(run_ranks(P, body), whole):
        assert [part.numel() for part in parts] == SIZES
        assert torch.equal(bits(torch.cat(parts)), bits(expected[0]))


def test_a_step_abandoned_while_the_worker_waits_leaves_the_next_step_to_a_new_worker(monkeypatch):
    """An elastic reset or load_state_dict mid-step: abandon() while the worker waits for a bucket;
    the stuck worker touches nothing after, and the next step runs on a new one, right."""
    release = threading.Event()

    class Held(Threaded):
        def wait(self, handle):
            if handle.key == ("test.bucket1", 1) and hasattr(self, "stuck"):  # the first world only
                self.stuck.set()
                release.wait(60)
                raise ConnectionError("abandoned")  # what the stuck worker meets, after the step is gone
            return super().wait(handle)

    monkeypatch.setattr(local_world, "LocalTransport", Held)
    G = honest(p=3)

    def body(transport):
        transport.stuck = threading.Event()
        exchange = ShardedExchange(transport, get("median", f=1), prefix="test")
        offsets = [sum(SIZES[:i]) for i in range(len(SIZES))]
        for index in range(len(SIZES)):
            exchange.start(index, G[transport.rank, offsets[index] : offsets[index] + SIZES[index]].clone())
        assert transport.stuck.wait(60)  # a hang guard, not a timing
        stuck = exchange._worker
        exchange.abandon()
        assert exchange._worker is None
        return exchange, stuck

    abandoned = run_ranks(3, body)
    release.set()

    def next_step(transport):
        exchange, stuck = abandoned[transport.rank]
        exchange.transport = transport
        out = step(exchange, G[transport.rank], order=range(len(SIZES)), index=1)
        return out, exchange._worker is not stuck

    for out, fresh in run_ranks(3, next_step):
        assert fresh and torch.equal(out, get("median", f=1)(G))


@pytest.mark.parametrize("kind", ["clean", "nan", "huge"])
@pytest.mark.parametrize("name", RULES)
def test_planned_buckets_worked_on_by_the_worker_give_the_same_bits(monkeypatch, name, kind):
    """Told the buckets (as the optimizer tells it), the exchange works on each bucket on its worker
    thread as its alltoall arrives (partial Gram, row flags, early shards): every rule gives the
    bits of the same exchange working on them inside finish()."""
    G = faulty(kind)
    inside = sharded(name, G, steps=2, scale=[1.0, -0.5])
    monkeypatch.setattr(local_world, "LocalTransport", Threaded)
    monkeypatch.setattr(ShardedExchange, "__init__", _planned_init(SIZES))
    threaded = sharded(name, G, steps=2, scale=[1.0, -0.5])
    for (outs, exchange), (expected, _) in zip(threaded, inside):
        assert exchange._plan is not None and exchange._worker is not None
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(outs, expected))


def _planned_init(sizes):
    init = ShardedExchange.__init__

    def planned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.plan(sizes, torch.float32, torch.device("cpu"))

    return planned


def test_a_bucket_off_the_plan_is_refused_by_the_sharded_exchange(monkeypatch):
    exchange = ShardedExchange(Threaded(local_world.LocalWorld(2), 0), get("flag", f=0), prefix="test")
    exchange.plan(SIZES, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="bucket 1 has 4 torch.float32 elements, planned 50"):
        exchange.start(1, torch.zeros(4))


class _Told:
    """A transport whose allgather_json hands back what every rank told (``usable``) and keeps what it was sent."""

    def __init__(self, rank, usable):
        self.rank, self.usable, self.sent = rank, usable, []

    def allgather_json(self, obj, name, schema):
        self.sent.append(obj)
        return list(self.usable)


def test_ranks_take_the_compiled_kernels_only_if_every_rank_can(monkeypatch, caplog):
    """One rank without them turns them off on every rank, with a line naming it; a later world where
    every rank can (the rank without a compiler left) turns them back on."""
    monkeypatch.setattr(native, "_everywhere", None)
    monkeypatch.setenv("FA_HVD_NATIVE", "1")
    monkeypatch.setattr(native, "_compiler_works", lambda: True)
    transport = _Told(0, [True, False, True])
    assert agree_on_compiled_kernels(transport, "t.kernels") is False
    assert transport.sent == [True] and not native.enabled()
    assert "rank 1 cannot use them" in caplog.text and "every rank takes the torch path" in caplog.text
    assert agree_on_compiled_kernels(_Told(0, [True, True]), "t.kernels") is True and native.enabled()
    monkeypatch.setenv("FA_HVD_NATIVE", "0")
    assert agree_on_compiled_kernels(_Told(0, [True, True]), "t.kernels") is True and not native.enabled()
