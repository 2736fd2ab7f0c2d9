"""Rules in Gram space: the aggregate is ``c^T G`` with ``c`` from ``K = G G^T`` alone."""

import pytest
import torch

from fa_hvd.aggregators import get
from fa_hvd.aggregators.geometry import combine, gram
from fa_hvd.aggregators.krum import Krum
from fa_hvd.aggregators.pre.nnm import NNM

GRAM_RULES = ["mean", "nmean", "krum", "multikrum", "geomed", "mda", "flag",
              "nnm+krum", "clip+geomed", "arc+multikrum", "nnm+flag", "bucketing+krum"]
OTHER_RULES = ["median", "trimmed_mean", "bulyan", "cclip", "nnm+median"]
# Rules whose coefficients sum to 1 (the aggregate is an affine combination of the rows).
AFFINE = ["mean", "krum", "multikrum", "geomed", "mda", "nnm+krum", "bucketing+krum"]


def sample(p=9, n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=gen, dtype=torch.float64)
    G = mu + 0.5 * torch.randn(p, n, generator=gen, dtype=torch.float64)
    G[-1] = 30 * torch.randn(n, generator=gen, dtype=torch.float64)  # one outlier
    return G


def orthogonal(n, seed=1):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return Q


@pytest.mark.parametrize("name", GRAM_RULES)
def test_gram_rules_see_only_the_gram_matrix(name):
    # A rotation of every row keeps K, so a rule of K alone rotates with its input.
    G, Q = sample(), orthogonal(20)
    assert torch.allclose(gram(G @ Q), gram(G), atol=1e-10)
    agg, rotated = get(name, f=1), get(name, f=1)
    assert agg.gram_space
    assert torch.allclose(rotated(G @ Q), agg(G) @ Q, atol=1e-8)


@pytest.mark.parametrize("name", GRAM_RULES)
def test_coefficients_give_the_aggregate(name):
    G = sample()
    agg, twin = get(name, f=1), get(name, f=1)
    c = agg.coefficients(gram(G), 1)
    assert c.shape == (9,) and c.dtype == torch.float64
    assert torch.allclose(c @ G, twin(G), atol=1e-10)
    if name in AFFINE:
        assert float(c.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", OTHER_RULES)
def test_other_rules_refuse_coefficients(name):
    agg = get(name, f=1)
    assert not agg.gram_space
    with pytest.raises(NotImplementedError):
        agg.coefficients(gram(sample()), 1)


def test_reference_flag_is_not_a_gram_rule():
    agg = get("flag", mode="reference", r=2)
    assert not agg.gram_space
    with pytest.raises(NotImplementedError, match="U\\^T G"):
        agg.coefficients(gram(sample()), 0)


def test_composition_in_gram_space_equals_mixing_the_rows():
    G = sample(p=11, seed=3)
    by_rows = Krum(f=2).aggregate(NNM(f=2).transform(G, 2), 2)
    assert torch.allclose(get("nnm+krum", f=2)(G), by_rows, atol=1e-12)


@pytest.mark.parametrize("name", AFFINE)
def test_affine_rules_move_with_a_translation(name):
    G, t = sample(seed=4), torch.linspace(-3, 3, 20, dtype=torch.float64)
    assert torch.allclose(get(name, f=1)(G + t), get(name, f=1)(G) + t, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_combine_into_a_given_buffer_gives_the_same_bits(dtype):
    """The exchanges pass a reused buffer (a fresh one is paid in page faults); the bits are ``c @ G``'s."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(5, 3001, generator=gen).to(dtype)
    c = torch.rand(5, generator=gen, dtype=torch.float64)
    out = torch.full((3001,), float("nan"), dtype=dtype)
    assert combine(G, c, out=out) is out
    assert torch.equal(out, c.to(dtype) @ G) and torch.equal(out, combine(G, c))
    block = torch.full((1000,), float("nan"), dtype=dtype)  # a block of columns, as the sharded exchange's
    torch.testing.assert_close(combine(G[:, 1000:2000], c, out=block), combine(G, c)[1000:2000])
