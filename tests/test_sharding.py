"""Shards and sample order (fa_hvd.train.sharding), checked against direct recomputation."""

import pytest
import torch

from fa_hvd.faults.seeding import derive_seed
from fa_hvd.train.sharding import ShardStream, partition, steps_per_epoch

LABELS = torch.arange(1000) % 10


def test_iid_shards_are_equal_disjoint_and_seeded():
    shards = partition(LABELS, 4, seed=3)
    assert [len(s) for s in shards] == [250] * 4
    assert len(torch.cat(shards).unique()) == 1000
    assert all(torch.equal(a, b) for a, b in zip(shards, partition(LABELS, 4, seed=3)))
    assert not torch.equal(shards[0], partition(LABELS, 4, seed=4)[0])
    # Roughly balanced classes in every IID shard.
    assert all(int(torch.bincount(LABELS[s], minlength=10).min()) > 10 for s in shards)


def test_iid_drops_the_tail():
    shards = partition(torch.zeros(10, dtype=torch.long), 3, seed=0)
    assert [len(s) for s in shards] == [3, 3, 3] and len(torch.cat(shards).unique()) == 9


def _classes_per_shard(shards, share=0.05):
    """Classes that hold more than ``share`` of each shard, averaged over shards."""
    counts = [torch.bincount(LABELS[s], minlength=10).float() for s in shards]
    return sum(int((c / c.sum() > share).sum()) for c in counts) / len(counts)


def test_dirichlet_covers_every_sample_once_and_skews_with_alpha():
    skewed = partition(LABELS, 5, seed=1, alpha=0.1)
    mild = partition(LABELS, 5, seed=1, alpha=100.0)
    for shards in (skewed, mild):
        assert sorted(torch.cat(shards).tolist()) == list(range(1000))
    assert _classes_per_shard(skewed) < 5 < _classes_per_shard(mild)
    assert all(torch.equal(a, b) for a, b in zip(skewed, partition(LABELS, 5, seed=1, alpha=0.1)))


def test_dirichlet_honours_min_size_or_says_why():
    shards = partition(LABELS, 8, seed=0, alpha=0.3, min_size=32)
    assert min(len(s) for s in shards) >= 32
    with pytest.raises(ValueError, match="raise alpha"):
        partition(LABELS, 8, seed=0, alpha=1e-4, min_size=120)
    with pytest.raises(ValueError, match="too few"):
        partition(LABELS, 8, seed=0, min_size=200)


def test_stream_follows_seeded_permutations_across_passes():
    shard = torch.arange(100, 110)
    stream = ShardStream(shard, seed=7, rank=2)
    got = torch.cat([stream.take(4) for _ in range(6)])  # 24 samples: 2 passes and 4 more
    expected = torch.cat([shard[torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(7, 2, k)))]
                          for k in range(3)])[:24]
    assert torch.equal(got, expected)
    assert sorted(got[:10].tolist()) == list(range(100, 110))  # each pass is a permutation
    assert stream.position == 24


def test_stream_resumes_exactly_from_its_state():
    shard = torch.arange(37)
    whole = ShardStream(shard, seed=1, rank=0)
    first = [whole.take(5) for _ in range(20)]
    half = ShardStream(shard, seed=1, rank=0)
    for _ in range(9):
        half.take(5)
    resumed = ShardStream(shard, seed=1, rank=0)
    resumed.load_state_dict(half.state_dict())
    assert all(torch.equal(resumed.take(5), first[i]) for i in range(9, 20))
    with pytest.raises(ValueError, match="different data set"):
        ShardStream(torch.arange(36), seed=1, rank=0).load_state_dict(half.state_dict())


def test_ranks_draw_different_orders_and_steps_per_epoch():
    a = ShardStream(torch.arange(50), seed=0, rank=0).take(50)
    b = ShardStream(torch.arange(50), seed=0, rank=1).take(50)
    assert not torch.equal(a, b)
    assert steps_per_epoch(1437, 4, 32) == 11 and steps_per_epoch(10, 4, 32) == 1
