"""CUDA tensors end to end: the rules and the sharded exchange on a GPU against the CPU.

Run where a GPU is (benchmarks/gpu_check.sh runs this file first); without one every
test here is skipped with that reason.
"""

import warnings

import pytest
import torch

from fa_hvd.aggregators import get
from fa_hvd.exchange import ShardedExchange
from local_world import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no GPU: these CUDA checks need a CUDA device (benchmarks/gpu_check.sh)")

RULES = ["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geomed", "cclip", "nmean", "flag",
         "nnm+krum", "bucketing+median"]


def gradients(p=15, n=50_000, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, generator=gen) + 0.5 * torch.randn(p, n, generator=gen)
    G[3] = 1e6  # an outlier
    G[5, 7] = float("nan")  # a faulty row
    return G.to(dtype)


@pytest.mark.parametrize("name", RULES)
def test_rules_on_cuda_match_the_cpu(name):
    G = gradients()
    expected = get(name, f=3)(G)
    out = get(name, f=3)(G.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    top = float(expected[expected.isfinite()].abs().max())  # mean keeps the faulty row's NaN
    assert torch.allclose(out.cpu(), expected, rtol=1e-4, atol=1e-4 * top, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["median", "flag", "multikrum"])
def test_half_gradients_are_aggregated_in_fp32(name, dtype):
    G = gradients(n=4096, dtype=dtype)
    out = get(name, f=3)(G.cuda())
    assert out.dtype == dtype
    expected = get(name, f=3)(G.float()).to(dtype)  # fp32 arithmetic on the same half inputs
    assert torch.allclose(out.cpu().float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["flag", "geomed", "cclip"])
def test_iterative_rules_do_not_synchronise_per_iteration(name):
    """The p x p iterations run on the host: a handful of device syncs per call, however many iterations."""
    G = gradients(n=8192).cuda()
    agg = get(name, f=3, **({"iterations": 50} if name != "flag" else {}))
    agg(G)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            agg(G)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 6, [str(w.message) for w in syncs]


@pytest.mark.parametrize("name", ["median", "flag", "cclip", "bulyan"])
def test_sharded_exchange_with_cuda_tensors(name):
    G = gradients(p=7, n=3000)
    def body(transport):
        exchange = ShardedExchange(transport, get(name, f=1))
        row = G[transport.rank].cuda()
        exchange.start(1, row[1000:].clone())
        exchange.start(0, row[:1000].clone())
        return exchange.finish(2, row.device, 0)

    outs = run_ranks(7, body)
    expected = get(name, f=1)(G)
    for out in outs:
        assert out.device.type == "cuda"
        assert torch.equal(out, outs[0])
        assert torch.allclose(out.cpu(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_digest_fingerprints_a_cuda_aggregate_where_it_is_as_the_cpu_does(dtype):
    from fa_hvd.exchange.digest import ROW_WORDS, fingerprint, key_for

    aggregate = torch.randn(5 * ROW_WORDS + 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    key = key_for(3, torch.tensor([1.0, 2.0]))
    assert fingerprint(aggregate.cuda(), key) == fingerprint(aggregate, key)
