"""Huge finite rows (norm 1e19 .. 1e38, one exponent bit flip) and fp32 cancellation: every
robust rule stays finite, close to its own fp64 answer, and on the honest side."""

import ctypes
import math

import pytest
import torch

from fa_hvd.aggregators import geometry, get, native, native_gram
from fa_hvd.aggregators.geometry import U64, distance_error_bound, gram, gram_error_bound, sq_distances

P, F, N = 11, 2, 600
ROBUST = {
    "median": {}, "trimmed_mean": {}, "krum": {}, "multikrum": {}, "bulyan": {}, "geomed": {},
    "cclip": {"tau": 0.5}, "mda": {}, "nmean": {}, "flag": {}, "flag[reference]": {"mode": "reference"},
    "nnm+krum": {}, "bucketing+median": {"s": 2}, "clip+median": {}, "arc+trimmed_mean": {},
}


def honest(seed=0, mean=1.0, spread=1.0, rows=P - F):
    gen = torch.Generator().manual_seed(seed)
    return mean * torch.ones(N) + spread * torch.randn(rows, N, generator=gen)


def huge_rows(kind, seed=1, count=F):
    """``count`` (``F``) finite rows: a random direction scaled to norm 10^kind; ``"flat"``: every entry
    the same, norm 1e38 (any sum over a row overflows fp32); ``"bitflip"``: honest-looking rows
    with the exponent's top bit flipped in one small element (x -> x 2^128)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.full((count, N), 1e38 / N ** 0.5)
    if kind == "bitflip":
        rows = torch.rand(count, N, generator=gen) * 0.9 + 0.05  # all in (0, 1): exponent < 127
        bits = rows.view(torch.int32)
        bits[:, 7] ^= 1 << 30
        return rows
    direction = torch.randn(count, N, generator=gen, dtype=torch.float64)
    return (direction / direction.norm(dim=1, keepdim=True) * 10.0 ** kind).float()


def rule(name, **extra):
    base = name.split("[")[0]
    return get(base, f=F if "bucketing" not in name else 1, **ROBUST[name], **extra)


@pytest.mark.parametrize("kind", [19, 30, 38, "flat", "bitflip"])
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_a_huge_finite_row_never_breaks_a_robust_rule(name, kind):
    good = honest()
    bad = huge_rows(kind)
    assert torch.isfinite(bad).all() and bad.abs().max() > 1e17
    G = torch.cat([good[:4], bad, good[4:]])
    out = rule(name)(G)
    reference = rule(name)(G.double())  # fp64 holds every square and sum of these rows
    assert torch.isfinite(out).all(), name
    assert (out.double() - reference).norm() <= 1e-4 * reference.norm() + 1e-6, name
    assert out.norm() <= 2 * good.norm(dim=1).max(), name  # the huge rows did not take over


@pytest.mark.parametrize("kind", [19, 38, "flat", "bitflip"])
def test_fa_steps_towards_the_median_with_huge_rows(kind):
    """p = 7, f = 3 (p <= 3f: FA's candidate step 5, Weiszfeld steps whose smoothing nu follows the median row's
    norm, not the largest): three huge rows among four honest ones stay out, in fp32 as in fp64."""
    good = honest(rows=4)
    G = torch.cat([good[:2], huge_rows(kind, count=3), good[2:]])
    out, reference = get("flag", f=3, median_steps=3)(G), get("flag", f=3, median_steps=3)(G.double())
    assert torch.isfinite(out).all()
    assert (out.double() - reference).norm() <= 1e-4 * reference.norm() + 1e-6
    assert out.norm() <= 2 * good.norm(dim=1).max()


@pytest.mark.parametrize("name", ["krum", "multikrum", "geomed", "mda", "bulyan"])
def test_distance_rules_keep_the_honest_geometry_against_fp32_cancellation(name):
    """Rows sharing a large mean (1e3) with a small spread (1e-2): in fp32 the Gram's entries
    (~n 1e6) swamp the squared distances (~n 1e-4). The rule on fp32 rows must pick what it
    picks on the same rows in fp64: within a tenth of the closest two rows' distance (an fp32
    Gram missed by a third of it or more)."""
    G = torch.cat([honest(mean=1e3, spread=1e-2, rows=P - F), honest(seed=5, mean=1e3, spread=3e-2, rows=F)])
    G64 = G.double()
    distances = torch.cdist(G64, G64).fill_diagonal_(float("inf"))
    out, reference = rule(name)(G), rule(name)(G64)
    assert (out.double() - reference).norm() <= 0.1 * distances.min(), name


def test_squared_distances_match_fp64_under_cancellation_and_huge_rows():
    """mu / sigma = 1e5: an fp32 Gram errs by ~36 on distances of ~0.12; the fp64-accumulated
    one by ~1e-5 relative. A row of norm 1e38 squares to 1e76: finite in fp64."""
    for G in (honest(mean=1e3, spread=1e-2), torch.cat([honest(), huge_rows(38)])):
        G64 = G.double()
        exact = ((G64[:, None, :] - G64[None, :, :]) ** 2).sum(-1)
        torch.testing.assert_close(sq_distances(G), exact, rtol=1e-4, atol=0)
        K = G64 @ G64.T
        torch.testing.assert_close(gram(G), K, rtol=0, atol=1e-12 * float(K.abs().max()))


@pytest.mark.parametrize("kind", [38, "flat"])
def test_centered_clipping_with_a_centre_and_a_huge_row(kind):
    """The second call starts from the previous aggregate v (here ~5 everywhere): G v must not
    overflow either (the flat row's G v is ~1e40)."""
    good = honest()
    G = torch.cat([good[:4], huge_rows(kind), good[4:]])
    ours, reference = rule("cclip"), rule("cclip")
    for r in (ours, reference):
        r.load_state_dict({"center": torch.full((N,), 5.0)})
    out, expected = ours(G), reference(G.double())
    assert torch.isfinite(out).all()
    assert (out.double() - expected).norm() <= 1e-4 * expected.norm()


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_the_bitflip_attack_at_its_default_rate_never_breaks_a_robust_rule(name):
    """fa_hvd.faults' own bitflip at its default rate (1e-3) on F ranks of 20000 coordinates,
    10 draws: the rows it makes hold huge finite values (a flipped top exponent bit), and
    some Inf or NaN too (then dropped)."""
    from fa_hvd.faults import ATTACKS

    gen = torch.Generator().manual_seed(0)
    good = 1.0 + 0.3 * torch.randn(P - F, 20000, generator=gen)
    huge = 0
    for draw in range(10):
        gen = torch.Generator().manual_seed(draw)
        bad = torch.stack([ATTACKS["bitflip"](good[i].clone(), None, gen, {"rate": 1e-3}) for i in range(F)])
        huge += int((torch.isfinite(bad) & (bad.abs() > 1e30)).any())
        G = torch.cat([bad, good])
        out, reference = rule(name)(G), rule(name)(G.double())
        assert torch.isfinite(out).all(), (name, draw)
        assert (out.double() - reference).norm() <= 1e-4 * reference.norm() + 1e-6, (name, draw)
    assert huge >= 5  # the draws really made huge finite rows


def exact_gram(G):
    """``G G^T`` and the squared distances, each correctly rounded (``math.fsum``) from products
    that are exact in fp64 (fp32 values) and differences within one fp64 rounding."""
    rows = G.double().tolist()
    K = torch.empty(len(rows), len(rows), dtype=torch.float64)
    D = torch.zeros_like(K)
    for i, a in enumerate(rows):
        for j in range(i, len(rows)):
            K[i, j] = K[j, i] = math.fsum(x * y for x, y in zip(a, rows[j]))
            D[i, j] = D[j, i] = math.fsum((x - y) ** 2 for x, y in zip(a, rows[j]))
    return K, D


def fidelity_case(kind):
    """The fidelity cases of the bound's test: P finite rows."""
    if kind == "near_duplicates":  # every row within 1e-5 (relative) of one row
        base = honest()[0]
        return base + 1e-5 * torch.randn(P, N, generator=torch.Generator().manual_seed(3))
    if kind == "shared_mean":  # mu / sigma = 1e5
        return honest(mean=1e3, spread=1e-2, rows=P)
    if kind == "generic":
        return honest(mean=0.0, rows=P)
    return torch.cat([honest(), huge_rows(kind)])


@pytest.mark.parametrize("compiled", [True, False])  # native_gram's product; torch's buffer and BLAS product
@pytest.mark.parametrize("terms", [None, 64])  # a CPU block's width; pieces of 64 (the accelerator path)
@pytest.mark.parametrize("kind", ["near_duplicates", "shared_mean", "generic", 38, "flat", "bitflip"])
def test_the_gram_and_its_distances_stay_within_the_stated_bound(monkeypatch, kind, terms, compiled):
    """geometry's bounds, against correctly rounded values: |gram(G) - G G^T| <= gram_error_bound
    and |sq_distances(G) - D| <= distance_error_bound, entrywise. Where the rows share a large
    common part (near duplicates, mu / sigma = 1e5) the distance bound is a small fraction of
    every distance, which an uncentred fp32 product misses by more than that."""
    monkeypatch.setitem(geometry.FP32_TERMS, "cpu", terms)
    monkeypatch.setenv("FA_HVD_NATIVE", "1" if compiled else "0")
    G = fidelity_case(kind)
    assert native_gram.supports(G) == compiled, "no C compiler: the compiled product cannot be checked"
    assert (geometry.CentredGram(G).rows is not None) == (compiled and terms is None)
    K, B, Bd = gram(G), gram_error_bound(G), distance_error_bound(G)
    exact, exact_distances = exact_gram(G)
    assert torch.isfinite(K).all() and torch.isfinite(B).all() and torch.isfinite(Bd).all()
    assert ((K - exact).abs() <= B + U64 * exact.abs()).all(), kind  # + exact's own rounding
    error = (sq_distances(K=K) - exact_distances).abs()
    assert (error <= Bd + 3 * U64 * exact_distances).all(), kind
    if kind in ("near_duplicates", "shared_mean"):
        off = ~torch.eye(P, dtype=torch.bool)
        assert (Bd[off] <= 1e-3 * exact_distances[off]).all(), kind
        plain = (G @ G.T).double()  # the uncentred fp32 product: no such accuracy
        plain_distances = plain.diagonal()[:, None] + plain.diagonal()[None, :] - 2 * plain
        assert ((plain_distances - exact_distances).abs()[off] > Bd[off]).any(), kind


@pytest.mark.parametrize("rows", [5, 16, 40])  # native_gram's registers (gram_source, up to MAX_ROWS); its tiles
def test_the_compiled_product_gives_the_same_bits_whatever_the_steps_and_threads(monkeypatch, rows):
    """native_gram's block product, as an exchange drives it (columns arriving in steps, blocks
    straddling them), gives gram()'s bits, with one torch thread or several."""
    monkeypatch.setenv("FA_HVD_NATIVE", "1")
    monkeypatch.setattr(geometry, "CPU_BLOCK", 1 << 12 if rows <= native_gram.MAX_ROWS else 1 << 16)
    G = honest(mean=1e3, spread=1e-2, rows=rows).repeat(1, 9)
    assert native_gram.supports(G), "no C compiler: the compiled product cannot be checked"
    assert (rows > native_gram.MAX_ROWS) == (rows == 40)
    assert rows != 16 or native_gram.MAX_ROWS == 16  # the largest register kernel (GRAM_FLAGS keep it compiling fast)
    whole = gram(G)
    product = geometry.CentredGram(G)
    assert product.rows is not None and len(product.blocks) > 3
    assert rows <= native_gram.MAX_ROWS or product.blocks[0].stop > native_gram.SUB_COLUMNS  # sub-blocks per block
    for filled in (100, 700, 701, 2900, G.shape[1]):
        product.advance(filled)
    assert torch.equal(product.result(), whole)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(gram(G), whole)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("FA_HVD_NATIVE", "0")  # the torch path: the same K within the bound
    assert ((gram(G) - whole).abs() <= 2 * gram_error_bound(G)).all()


@pytest.mark.parametrize("p", [20, 31])
def test_the_tiles_give_the_same_bits_whatever_the_cpus_vector_registers(monkeypatch, p):
    """native_gram.tiled_source fits its tiles to the CPU's vectors (AVX-512: 5 x 5 tiles of 16-lane vectors;
    AVX2: 3 x 3 tiles, each 16-lane accumulator as two 8-lane halves): every layout, on any CPU that runs it
    (here both, whatever this CPU has), gives the same bits, so ranks on different CPU kinds agree."""
    monkeypatch.setenv("FA_HVD_NATIVE", "1")
    G = honest(mean=1e3, spread=1e-2, rows=p + 1).repeat(1, 3)[:, :5000].contiguous()  # two sub-blocks and a tail
    assert native_gram.supports(G), "no C compiler: the compiled product cannot be checked"
    results = []
    for layout in [(64, 5), (32, 2), (32, 3), (64, 2)]:
        kernel = native.function(native_gram.tiled_source(p, layout), "gram")
        out = torch.empty(len(native_gram.pairs(p)) + 1, dtype=torch.float64)
        kernel(native_gram.row_pointers(G), ctypes.c_int64(p), ctypes.c_int64(0), ctypes.c_int64(G.shape[1]),
               ctypes.c_void_p(out.data_ptr()))
        results.append(out)
    assert results[0].isfinite().all() and all(torch.equal(out, results[0]) for out in results[1:])
    assert native_gram.register_layout() in [(64, 5), (32, 3)]


@pytest.mark.parametrize("compiled", [True, False])  # native_gram's tiles; the BLAS product (halves from 32 rows)
@pytest.mark.parametrize("p", [20, 40, 64])
def test_the_products_above_the_register_sizes_stay_within_the_bound(monkeypatch, p, compiled):
    """Above native_gram.MAX_ROWS, on rows sharing a large mean (with a near duplicate) and a bit
    flip, over several sub-blocks and a tail (2500 columns): the bound holds."""
    monkeypatch.setenv("FA_HVD_NATIVE", "1" if compiled else "0")
    assert p > native_gram.MAX_ROWS and (p >= geometry.SYMMETRIC_ROWS) == (p >= 40)
    gen = torch.Generator().manual_seed(p)
    shared = 1e3 + 1e-2 * torch.randn(p - 2, 2500, generator=gen)
    near = shared[:1] + 1e-5 * torch.randn(1, 2500, generator=gen)
    flipped = huge_rows("bitflip")[:1, :300].repeat(1, 9)[:, :2500]
    G = torch.cat([shared, near, flipped])
    compiled_product = geometry.CentredGram(G).rows is not None
    assert compiled_product == compiled, "no C compiler: the compiled product cannot be checked"
    K, B = gram(G), gram_error_bound(G)
    exact, exact_distances = exact_gram(G)
    assert ((K - exact).abs() <= B + U64 * exact.abs()).all()
    assert ((sq_distances(K=K) - exact_distances).abs() <= distance_error_bound(G) + 3 * U64 * exact_distances).all()
    assert torch.equal(K, K.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_finite_rows_tells_overflowing_sums_from_nan_and_inf(dtype):
    """finite_rows' one pass screens rows by their sums; rows whose sum overflows are finite all the same."""
    from fa_hvd.aggregators.base import finite_rows

    big = torch.finfo(dtype).max / 2
    nan, inf = float("nan"), float("inf")
    G = torch.tensor([[1.0, 2.0, 3.0], [big, big, big], [-big, -big, -big], [1.0, nan, 2.0], [inf, 0.0, 1.0],
                      [-inf, 0.0, 1.0], [inf, -inf, 0.0], [nan, nan, nan]], dtype=dtype)
    assert not G[1:3].sum(dim=1).isfinite().any()  # the screen alone would drop these
    assert finite_rows(G).tolist() == [True, True, True, False, False, False, False, False]
