"""The Flag Aggregator: Gram-space reference mode against the direct release, and the default mode."""

import pytest
import torch

from fa_hvd.aggregators import get
from flag_direct import flag_direct

CASES = [  # (n, p, r, lambda_, T)
    (200, 7, 4, 0.0, 1),
    (300, 11, 8, 0.0, 4),
    (500, 15, 8, 2.0, 4),
    (100, 5, 8, 1.0, 3),  # r > p: the subspace is all of span(H)
    (400, 13, 3, 8.0, 2),
    (64, 6, 2, 0.0, 10),
]


def honest_like(p, n, seed, spread=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=gen, dtype=dtype)
    return mu + spread * torch.randn(p, n, generator=gen, dtype=dtype)


@pytest.mark.parametrize("n,p,r,lambda_,T", CASES)
def test_reference_mode_matches_direct_release(n, p, r, lambda_, T):
    G = honest_like(p, n, seed=n + p)
    expected = flag_direct(G, r, lambda_, T)
    got = get("flag", mode="reference", r=r, lambda_=lambda_, iterations=T)(G)
    assert got.dtype == torch.float64
    assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_reference_mode_keeps_the_random_start_when_no_step_is_taken():
    # n == r: Y0 spans everything, E(Y0) = 0 and the loop never runs; the output
    # is Y0 Y0^T sum h / r, which lies outside span(H) only through rounding.
    G = honest_like(6, 4, seed=3)
    expected = flag_direct(G, 4, 0.0, 1)
    got = get("flag", mode="reference", r=4)(G)
    assert float((got - expected).norm() / expected.norm()) < 1e-10


def test_reference_mode_output_is_in_normalised_units():
    G = 1000 * honest_like(15, 300, seed=1)
    out = get("flag", mode="reference", r=8)(G)
    assert out.norm() <= 15 / 8 + 1e-9


def test_reference_mode_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    get("flag", mode="reference", r=2)(honest_like(5, 50, seed=0))
    assert torch.equal(torch.rand(3), before)


def test_default_mode_returns_g_for_identical_gradients():
    g = torch.randn(1000, dtype=torch.float64)
    out = get("flag", f=3)(g.repeat(15, 1))
    assert torch.allclose(out, g, rtol=1e-9, atol=1e-12)


def test_default_mode_scale_is_the_median_norm_along_the_consensus():
    g = torch.randn(500, dtype=torch.float64)
    scales = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    out = get("flag", f=1, r=2)(scales[:, None] * g)
    assert torch.allclose(out, 3.0 * g, rtol=1e-9)


def test_default_mode_drops_workers_opposed_to_the_consensus():
    # Inner-product manipulation: f workers send -eps * mu, on the honest line.
    G = honest_like(15, 2000, seed=7, spread=0.3)
    mu = G[:12].mean(0)
    G[12:] = -0.1 * mu
    out = get("flag", f=3, r=8)(G)
    no_sign_step = get("flag", f=0, r=8)(G)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    assert cos(out, mu) > cos(no_sign_step, mu)
    assert cos(out, mu) > 0.99


def test_default_mode_resists_large_outliers():
    G = honest_like(15, 1000, seed=5, spread=0.1)
    mu = G[:12].mean(0)
    G[12:] = 1e6 * torch.randn(3, 1000, dtype=torch.float64)
    out = get("flag", f=3)(G)
    assert float((out - mu).norm() / mu.norm()) < 0.3
    assert float((G.mean(0) - mu).norm() / mu.norm()) > 100


@pytest.mark.parametrize("mode", ["default", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_and_non_finite_rows(mode, dtype):
    G = honest_like(8, 256, seed=2, dtype=torch.float32).to(dtype)
    G[3, 5] = float("nan")
    G[6, 0] = float("inf")
    out = get("flag", f=2, mode=mode, r=4)(G)
    assert out.shape == (256,) and out.dtype == dtype
    assert torch.isfinite(out).all()


def test_fp32_agrees_with_fp64():
    G = honest_like(15, 5000, seed=11)
    for mode in ("default", "reference"):
        agg = get("flag", f=3, mode=mode, r=8, lambda_=1.0, iterations=4)
        a64, a32 = agg(G), agg(G.float()).double()
        assert float((a32 - a64).norm() / a64.norm()) < 1e-4


def test_zero_and_rank_deficient_gradients():
    g = torch.randn(100, dtype=torch.float64)
    G = torch.stack([g, 2 * g, torch.zeros(100, dtype=torch.float64), 3 * g])
    out = get("flag", f=1, r=8)(G)
    assert torch.isfinite(out).all()
    assert torch.allclose(out / out.norm(), g / g.norm(), atol=1e-9)
    assert torch.equal(get("flag")(torch.zeros(4, 10)), torch.zeros(10))


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"mode": "fast"}, "mode"),
        ({"r": 0}, "r must"),
        ({"lambda_": -1.0}, "lambda_"),
        ({"iterations": 0}, "iterations"),
        ({"f": -1}, "f must"),
    ],
)
def test_bad_parameters(params, needle):
    with pytest.raises(ValueError, match=needle):
        get("flag", **params)


def test_bad_input_shapes():
    agg = get("flag")
    for bad in (torch.zeros(0, 5), torch.zeros(5), torch.zeros(3, 4, dtype=torch.int64)):
        with pytest.raises(ValueError, match="flag"):
            agg(bad)
