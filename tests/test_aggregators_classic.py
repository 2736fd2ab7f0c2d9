"""The classic robust rules and pre-aggregators (everything but Flag)."""

import re

import pytest
import torch

from fa_hvd.aggregators import get
from fa_hvd.aggregators.pre.arc import ARC
from fa_hvd.aggregators.pre.bucketing import Bucketing
from fa_hvd.aggregators.pre.clip import Clip
from fa_hvd.aggregators.pre.nnm import NNM

CLASSIC = ["median", "trimmed_mean", "krum", "multikrum", "bulyan", "geomed", "cclip", "mda", "nmean"]
COMPOSED = ["nnm+krum", "bucketing+median", "clip+mean", "arc+trimmed_mean", "nnm+bucketing+geomed"]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device, and this machine has none: run where one is")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# -- shape, dtype, device ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["mean"] + CLASSIC + COMPOSED)
def test_shape_dtype_device(name, dtype, device):
    G = torch.randn(11, 13, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    out = get(name, f=2)(G)
    assert out.shape == (13,)
    assert out.dtype == dtype
    assert out.device == G.device
    assert torch.isfinite(out).all()


# -- hand-checkable values ------------------------------------------------------------


def test_median_odd_and_even():
    G = t([[1, 5], [2, 4], [10, -3]])
    assert torch.equal(get("median", f=1)(G), t([2, 4]))
    G = t([[1], [2], [3], [100]])  # even p: mean of the two middle values
    assert torch.equal(get("median", f=1)(G), t([2.5]))


def test_trimmed_mean_drops_extremes():
    G = t([[1, -100], [2, 0], [3, 1], [4, 2], [100, 3]])
    assert torch.allclose(get("trimmed_mean", f=1)(G), t([3, 1]))
    assert torch.allclose(get("trimmed_mean", f=0)(G), G.mean(dim=0))


# Honest rows around the origin (the centre one, index 3, has the smallest Krum
# score) and f = 2 far outliers.
KRUM_G = t([[1, 0], [100, 100], [-1, 0], [0, 0], [0, 1], [101, 100], [0, -1]])


def test_krum_picks_the_centre_of_the_honest_cluster():
    # p - f - 2 = 3 neighbours: score 3 for row 3, 5 for the other honest rows.
    assert torch.equal(get("krum", f=2)(KRUM_G), KRUM_G[3])


def test_krum_ties_go_to_the_lowest_index():
    G = t([[5], [4], [3]])  # f = 0, one neighbour each: every score is 1
    assert torch.equal(get("krum")(G), t([5]))


def test_multikrum_averages_the_best_rows():
    honest = KRUM_G[[0, 2, 3, 4, 6]]
    assert torch.allclose(get("multikrum", f=2)(KRUM_G), honest.mean(dim=0))  # m = p - f
    assert torch.equal(get("multikrum", f=2, m=1)(KRUM_G), KRUM_G[3])
    # m = 3: row 3, then the tied honest rows 0 and 2 (lowest indices).
    assert torch.allclose(get("multikrum", f=2, m=3)(KRUM_G), KRUM_G[[3, 0, 2]].mean(dim=0))


@pytest.mark.parametrize("p", [3, 4, 9])
def test_multikrum_with_all_rows_is_the_mean(p):
    G = torch.randn(p, 17, dtype=torch.float64)
    assert torch.allclose(get("multikrum", f=0, m=p)(G), G.mean(dim=0))


def test_bulyan_ignores_one_huge_outlier():
    honest = 1 + 0.1 * torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = torch.cat([honest[:2], torch.full((1, 10), 1e6, dtype=torch.float64), honest[2:]])
    out = get("bulyan", f=1)(G)
    assert (out - honest.mean(dim=0)).norm() < 0.3
    # Selected rows stay within the honest range coordinate-wise.
    assert (out >= honest.min(dim=0).values).all() and (out <= honest.max(dim=0).values).all()


def test_geomed_of_symmetric_points_and_in_one_dimension():
    G = t([[3, 2], [1, 2], [2, 3], [2, 1]])
    assert torch.allclose(get("geomed")(G), t([2, 2]), atol=1e-6)
    assert torch.allclose(get("geomed")(t([[0], [1], [10]])), t([1]), atol=1e-4)


def test_mda_picks_the_tight_cluster():
    G = t([[0, 0], [0.1, 0], [5, 5], [0, 0.1], [0.1, 0.1]])
    assert torch.allclose(get("mda", f=1)(G), t([0.05, 0.05]))
    assert torch.allclose(get("mda", f=0)(G), G.mean(dim=0))


def test_nmean_values():
    # Norms 5 and 2: median 3.5 (even p), unit mean [0.3, 0.9].
    assert torch.allclose(get("nmean")(t([[3, 4], [0, 2]])), t([1.05, 3.15]))
    # A zero row contributes zero but still counts in p and in the median norm.
    assert torch.allclose(get("nmean")(t([[3, 4], [0, 0], [0, 2]])), t([0.4, 1.2]))


def test_cclip_with_a_huge_radius_is_the_mean():
    G = torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(get("cclip", tau=1e9, iterations=1)(G), G.mean(dim=0))


def test_cclip_state_round_trip():
    gen = torch.Generator().manual_seed(2)
    G1, G2, G3 = (torch.randn(7, 9, generator=gen) for _ in range(3))
    agg = get("cclip", f=1, tau=0.5)
    assert agg.state_dict() == {"center": None}
    first = agg(G1)
    state = agg.state_dict()
    assert torch.equal(state["center"], first) and state["center"].device.type == "cpu"
    second = agg(G2)
    assert not torch.equal(first, second)

    fresh = get("cclip", f=1, tau=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(G2), second)
    assert torch.equal(fresh(G3), agg(G3))

    with pytest.raises(ValueError, match="cclip"):
        agg(torch.randn(7, 10))
    with pytest.raises(ValueError, match="cclip"):
        fresh.load_state_dict({"centre": None})


def test_nnm_mixes_nearest_rows():
    G = t([[0], [1], [5]])
    # p - f = 2 rows each, itself included: {0, 1}, {1, 0}, {5, 1}.
    assert torch.allclose(NNM(f=1).transform(G, 1), t([[0.5], [0.5], [3]]))
    assert torch.allclose(NNM().transform(G, 0), G.mean(dim=0).expand(3, 1))


def test_clip_and_arc():
    G = t([[3, 4], [0, 0.5], [0, 0]])
    assert torch.allclose(Clip(tau=1).transform(G, 0), t([[0.6, 0.8], [0, 0.5], [0, 0]]))
    # p = 5, f = 1: k = floor(2 * 1/5 * 4) = 1, so the largest norm is cut to the 2nd.
    G = t([[1, 0], [0, 2], [-3, 0], [0, -4], [6, 8]])
    out = ARC().transform(G, 1)
    assert torch.allclose(out[:4], G[:4]) and torch.allclose(out[4], t([2.4, 3.2]))
    assert torch.equal(ARC().transform(G, 0), G)  # k = 0


def test_bucketing_means_and_state():
    G = torch.randn(5, 3, dtype=torch.float64)
    buckets = Bucketing(s=2, seed=3)
    out = buckets.transform(G, 0)
    assert out.shape == (3, 3) and buckets.out_workers(5) == 3
    # Two buckets of 2 and one of 1: the sizes-weighted sum is the sum of G.
    sizes = [2, 2, 1]
    assert torch.allclose(sum(s * row for s, row in zip(sizes, out)), G.sum(dim=0))
    # s = 1 is a permutation of the rows.
    perm = Bucketing(s=1).transform(G, 0)
    assert torch.equal(perm.sort(dim=0).values, G.sort(dim=0).values)

    state = buckets.state_dict()
    nxt = buckets.transform(G, 0)
    restored = Bucketing(s=2, seed=3)
    restored.load_state_dict(state)
    assert torch.equal(restored.transform(G, 0), nxt)


# -- robustness -------------------------------------------------------------------------


def outlier_matrix(p=15, f=3, n=20):
    mu = torch.linspace(-1, 1, n, dtype=torch.float64) + 0.5
    honest = mu + 0.1 * torch.randn(p - f, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    G = torch.cat([honest[:5], torch.full((f, n), 1e6, dtype=torch.float64), honest[5:]])
    return G.float(), mu.float()


@pytest.mark.parametrize("name", CLASSIC + ["nnm+krum", "bucketing+median", "arc+trimmed_mean"])
def test_robust_rules_resist_far_outliers(name):
    G, mu = outlier_matrix()
    agg = get(name, f=3)
    calls = 5 if name == "cclip" else 1  # cclip moves its centre by at most tau per iteration
    for _ in range(calls):
        out = agg(G)
    # nmean only bounds the norm: 3 of 15 unit directions point at the outliers.
    tolerance = 0.5 * mu.norm() if name == "nmean" else 1.0
    assert (out - mu).norm() < tolerance
    assert (get("mean")(G) - mu).norm() > 1e5


def test_non_finite_rows():
    G, _ = outlier_matrix()
    G[2, 4] = float("nan")
    G[7] = float("inf")
    G[9, 0] = -float("inf")
    assert not torch.isfinite(get("mean", f=3)(G)).all()
    for name in CLASSIC + COMPOSED:
        out = get(name, f=3)(G)
        assert torch.isfinite(out).all(), name
    every = torch.full((4, 3), float("nan"))
    assert torch.equal(get("krum", f=1)(every), torch.zeros(3))


# -- errors -----------------------------------------------------------------------------


def test_preconditions():
    with pytest.raises(ValueError, match=r"bulyan.*4f \+ 3"):
        get("bulyan", f=5)(torch.randn(8, 10))
    with pytest.raises(ValueError, match=r"krum.*2f \+ 3"):
        get("krum", f=2)(torch.randn(6, 10))
    with pytest.raises(ValueError, match="median"):
        get("median", f=2).check(4)
    with pytest.raises(ValueError, match="mda.*1000000"):
        get("mda", f=10).check(40)
    with pytest.raises(ValueError, match="nnm"):
        get("nnm+nmean", f=3)(torch.randn(3, 4))


@pytest.mark.parametrize("name", CLASSIC + ["nnm+krum"])
@pytest.mark.parametrize(
    "bad", [torch.empty(0, 5), torch.empty(5, 0), torch.randn(5), torch.ones(5, 3, dtype=torch.int64), [[1.0]]]
)
def test_bad_input(name, bad):
    with pytest.raises(ValueError, match=re.escape(name)):
        get(name)(bad)


@pytest.mark.parametrize(
    "name, params, words",
    [
        ("krum", {"f": -1}, "f"),
        ("multikrum", {"m": 0}, "m"),
        ("multikrum", {"m": 2.0}, "m"),
        ("geomed", {"iterations": 0}, "iterations"),
        ("geomed", {"nu": 0.0}, "nu"),
        ("geomed", {"tol": -1.0}, "tol"),
        ("cclip", {"tau": -1.0}, "tau"),
        ("cclip", {"iterations": True}, "iterations"),
        ("bucketing+median", {"s": 0}, "s"),
        ("bucketing+median", {"s": 1.5}, "s"),
        ("bucketing+median", {"seed": -1}, "seed"),
        ("clip+mean", {"tau": 0}, "tau"),
    ],
)
def test_bad_parameters(name, params, words):
    stage = name.split("+")[0]
    with pytest.raises(ValueError, match=rf"{stage}: {words} must"):
        get(name, **params)


def test_unknown_parameter():
    with pytest.raises(ValueError, match="unknown parameter"):
        get("nnm+krum", f=1, s=2)
