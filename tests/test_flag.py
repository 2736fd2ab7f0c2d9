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


@pytest.mark.filterwarnings("ignore:flag. r=8 >= p=5")  # the r > p case, on purpose
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


@pytest.mark.filterwarnings("ignore:flag. r=8 >= p=4")
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


# -- default mode: r, the fit to the honest majority, no votes for copies, the scale -----------

def default_direct(G, f, r, lambda_=0.0, iterations=100, tol=1e-6, eps=1e-7):
    """Default mode written out in n-space (fp64): explicit Y from SVDs, explicit unit vectors."""
    p = G.shape[0]
    norms = G.norm(dim=1)
    H = (G / norms[:, None]).T  # (n, p)
    median = norms.sort().values[(p - 1) // 2: p // 2 + 1].mean()
    excess = norms / (5 * median)

    def kept_of(Y):
        P = Y.T @ H
        agreement = torch.where(excess > 1, -excess, torch.sign(P.sum(1) @ P) * (P * P).sum(0))
        kept = torch.ones(p, dtype=torch.bool)
        kept[torch.argsort(agreement, stable=True)[:f]] = False
        return kept

    def objective(Y, kept):
        P = Y.T @ H[:, kept]
        E = float((1 - (P * P).sum(0)).clamp_min(0).sqrt().sum())
        if lambda_ > 0:
            D = P[:, :, None] - P[:, None, :]
            pair = (1 - (D * D).sum(0)).abs().sqrt()
            E += (lambda_ / (p * (p - 1))) ** 2 * float(pair.sum() - pair.diagonal().sum())
        return E

    def step(Y, kept):
        P = Y.T @ H
        w = ((1 - (P * P).sum(0)).abs() + eps) ** -0.25
        columns = [w[i] * H[:, i] for i in range(p) if kept[i]]
        for i in range(p):
            for j in range(p):
                if lambda_ > 0 and i != j and kept[i] and kept[j]:
                    d = H[:, i] - H[:, j]
                    v = ((1 - ((Y.T @ d) ** 2).sum()).abs() + eps) ** -0.25 * lambda_ / (p * (p - 1))
                    columns.append(v * d)
        return torch.linalg.svd(torch.stack(columns, 1), full_matrices=False)[0][:, :r]

    Y = torch.linalg.svd(H, full_matrices=False)[0][:, :r]
    kept = kept_of(Y)
    E = objective(Y, kept)
    for _ in range(iterations):
        Y_new = step(Y, kept)
        kept_new = kept_of(Y_new)
        E_new = objective(Y_new, kept_new)
        if E_new < E:
            Y, kept = Y_new, kept_new
        if not E - E_new > tol * (1 + E_new):
            break
        E = E_new
    C = H.T @ H
    k = int(kept.sum())
    distance = (1 - C[kept][:, kept]).clamp_min(0)
    spread = distance[torch.triu(torch.ones(k, k, dtype=torch.bool), 1)].median()
    m = torch.exp(-distance / max(0.1 * float(spread), 1e3 * 2.2e-16)).sum(1)
    copied = (m <= f + 1.5) & (m >= 1.5)  # groups the Byzantine could form alone
    votes = torch.ones_like(m) if bool(copied.all()) else (~copied).double()
    kept_norms = norms[kept].sort().values
    scale = kept_norms[(k - 1) // 2: k // 2 + 1].mean()
    return scale * (H[:, kept] @ votes) / votes.sum(), kept, Y


def attacked(seed, p=15, f=3, n=400, kind="alie"):
    G = honest_like(p, n, seed=seed, spread=2.0)
    honest = G[: p - f]
    if kind == "alie":  # f identical rows below the mean by one standard deviation
        G[p - f:] = honest.mean(0) - honest.std(0)
    elif kind == "loud":  # f rows of ten times the norm, another direction
        G[p - f:] = 10 * honest_like(f, n, seed=seed + 100, spread=2.0)
    return G


@pytest.mark.parametrize("kind,lambda_", [("alie", 0.0), ("loud", 0.0), ("alie", 4.0)])
def test_default_mode_matches_a_direct_n_space_computation(kind, lambda_):
    G = attacked(seed=3, kind=kind)
    expected, _, _ = default_direct(G, f=3, r=8, lambda_=lambda_)
    got = get("flag", f=3, lambda_=lambda_)(G)
    assert float((got - expected).norm() / expected.norm()) < 1e-8


def test_default_r_follows_p_and_f_and_stays_below_p():
    from fa_hvd.aggregators.flag import default_rank

    assert [default_rank(p, f) for p, f in [(15, 3), (13, 3), (8, 1), (7, 1), (30, 5), (60, 5)]] == [8, 7, 4, 4, 15, 30]
    assert [default_rank(p, f) for p, f in [(4, 1), (3, 1), (2, 0), (5, 3)]] == [2, 1, 1, 1]
    assert all(default_rank(p, f) < p for p in range(2, 70) for f in range(0, p))
    assert get("flag", f=1).rank(8, 1) == 4 and get("flag", f=1, r=3).rank(8, 1) == 3


def test_a_given_r_that_fills_the_space_warns_once_and_the_default_never_does():
    import warnings

    G = honest_like(8, 100, seed=1)
    agg = get("flag", f=1, r=8)
    with pytest.warns(UserWarning, match=r"flag: r=8 >= p=8 rows: the subspace holds every gradient"):
        agg(G)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agg(G)  # once per aggregator
        get("flag", f=1)(G)
        get("flag", f=1, mode="reference")(G)


def test_lambda_is_in_the_stop_test():
    # With lambda_ = 64 the first step from the flag mean lowers E_lambda but raises the data
    # term: a test on the data term alone would stop at the start.
    from fa_hvd.aggregators.flag import _gram_basis

    G = honest_like(9, 60, seed=12, spread=3.0)
    agg = get("flag", f=2, lambda_=64.0)
    fit = agg.fit(_gram_basis(G @ G.T, 1e-12), G.norm(dim=1), 2)
    _, _, Y0 = default_direct(G, f=2, r=fit.r, lambda_=64.0, iterations=0)  # the start
    H = (G / G.norm(dim=1, keepdim=True)).T

    def e_lambda(Y):
        P = Y.T @ H
        data = (1 - (P * P).sum(0)).clamp_min(0).sqrt()
        D = P[:, :, None] - P[:, None, :]
        pair = (1 - (D * D).sum(0)).abs().sqrt()
        agreement = torch.sign(P.sum(1) @ P) * (P * P).sum(0)
        kept = torch.ones(9, dtype=torch.bool)
        kept[torch.argsort(agreement, stable=True)[:2]] = False
        pair = pair[kept][:, kept]
        return float(data[kept].sum()) + (64.0 / 72) ** 2 * float(pair.sum() - pair.diagonal().sum())

    basis = _gram_basis(G @ G.T, 1e-12)
    Y = H @ basis.evecs @ torch.diag(basis.evals.rsqrt()) @ fit.W  # Y = Q W
    assert e_lambda(Y) < e_lambda(Y0) - 1.0


def test_identical_rows_the_byzantine_could_form_are_left_out():
    G = attacked(seed=5)  # rows 12..14 identical
    norms = G.norm(dim=1)
    agg = get("flag", f=3)
    c = agg.coefficients(G @ G.T, 3)
    votes = c * norms  # the weight of each unit vector
    honest_kept = votes[:12][votes[:12] > 0]
    assert len(honest_kept) >= 9
    assert torch.allclose(honest_kept, honest_kept.mean().expand(len(honest_kept)), rtol=1e-9)
    assert torch.equal(votes[12:], torch.zeros(3, dtype=torch.float64))
    # f = 0 (no Byzantine) and a group larger than f + 1 (two honest rows agree) keep full votes.
    c0 = get("flag", f=0).coefficients(G @ G.T, 0) * norms
    assert torch.allclose(c0, c0.mean().expand(15), rtol=1e-9)
    crowd = G.clone()
    crowd[8:] = crowd[8]  # 7 identical rows, f = 3
    votes = get("flag", f=3).coefficients(crowd @ crowd.T, 3) * crowd.norm(dim=1)
    assert float(votes[8:].min()) > 0.9 * float(votes[:8][votes[:8] > 0].min())


def test_rows_of_outlying_norm_are_left_out():
    G = attacked(seed=7, kind="loud")
    c = get("flag", f=3).coefficients(G @ G.T, 3)
    assert torch.equal(c[12:], torch.zeros(3, dtype=torch.float64))
    kept = c[:12] > 0
    assert int(kept.sum()) == 12
    # The scale is the median norm of the kept rows.
    out = c @ G
    assert float(out.norm()) <= float(G[:12].norm(dim=1).median()) + 1e-9


def test_rows_that_all_have_twins_keep_their_votes():
    """p = 3, f = 1: the two kept rows coincide; nothing tells them apart, so they are averaged."""
    g = torch.randn(50, dtype=torch.float64)
    G = torch.stack([g, g, -g])
    c = get("flag", f=1).coefficients(G @ G.T, 1)
    assert torch.allclose(c @ G, g, rtol=1e-12)
