"""Coordinate-wise rules by sorting networks over column blocks, against torch.sort."""

import pytest
import torch

from fa_hvd.aggregators import get, selection
from fa_hvd.aggregators.bulyan import closest_to_median
from fa_hvd.aggregators.median import sorted_median


def sort_reference_phase2(G, f):
    """Bulyan's phase 2 as first written: stable argsort of the distances to the median."""
    S = G.sort(dim=0).values
    near = (S - sorted_median(S)).abs().argsort(dim=0, stable=True)[: G.shape[0] - 2 * f]
    return S.gather(0, near).mean(dim=0)


@pytest.mark.parametrize("p", range(1, selection.MAX_NETWORK_ROWS + 1))
def test_network_sorts_every_0_1_input(p):
    # The 0-1 principle: a comparator network sorts everything iff it sorts every 0-1 input.
    # Up to 2^16 of them, as the columns of one matrix (all of them for p <= 16).
    columns = torch.arange(min(1 << p, 1 << 16))
    if p > 16:  # spread the sample over all 2^p inputs
        columns = torch.randint(0, 1 << p, (1 << 16,), generator=torch.Generator().manual_seed(p))
    bits = ((columns[None, :] >> torch.arange(p)[:, None]) & 1).float()
    blocks = [torch.stack(values) for _, values in selection.order_statistics(bits, range(p))]
    assert torch.equal(torch.cat(blocks, dim=1), bits.sort(dim=0).values)


def test_pruned_network_is_smaller_and_exact():
    full, middle = selection.network(15, tuple(range(15))), selection.network(15, (7,))
    assert len(middle) < len(full)
    assert sum(c.min_needed + c.max_needed for c in middle) < 2 * len(full)
    G = torch.randn(15, 999, generator=torch.Generator().manual_seed(1))
    [(cols, [value])] = list(selection.order_statistics(G, [7]))
    assert cols == slice(0, 999) and torch.equal(value, G.sort(dim=0).values[7])


@pytest.mark.parametrize("network_rows", [selection.MAX_NETWORK_ROWS, 1])  # network, then torch.sort
@pytest.mark.parametrize("p", [1, 2, 5, 6, 15, 16, 33])
def test_rules_match_a_sort_over_many_blocks(monkeypatch, p, network_rows):
    monkeypatch.setattr(selection, "MAX_NETWORK_ROWS", network_rows)
    monkeypatch.setitem(selection.BLOCK_ELEMENTS, "cpu", 7 * p)  # 7 columns a block, 37 columns
    G = torch.randn(p, 37, generator=torch.Generator().manual_seed(p))
    before = G.clone()
    S = G.sort(dim=0).values
    assert torch.equal(get("median")(G), sorted_median(S))
    for f in range(0, (p - 1) // 2 + 1):
        assert torch.allclose(get("trimmed_mean", f=f)(G), S[f : p - f].mean(dim=0), atol=1e-6), f
    assert torch.equal(G, before)  # the input is never written


def test_blocks_cover_the_columns_once(monkeypatch):
    monkeypatch.setitem(selection.BLOCK_ELEMENTS, "cpu", 30)
    G = torch.randn(6, 37)
    blocks = [cols for cols, _ in selection.order_statistics(G, [2, 3])]
    assert blocks[0] == slice(0, 5) and blocks[-1] == slice(35, 37) and len(blocks) == 8


@pytest.mark.parametrize("f", [0, 1, 2, 3])
def test_bulyan_phase_two_matches_the_argsort_definition(f):
    gen = torch.Generator().manual_seed(f)
    for theta in range(2 * f + 1, 2 * f + 8):
        ties = torch.randint(-3, 4, (theta, 200), generator=gen).double()  # many equal distances
        spread = torch.randn(theta, 200, generator=gen, dtype=torch.float64)
        for G in (ties, spread):
            expected = sort_reference_phase2(G, f)
            assert torch.allclose(closest_to_median(G, list(range(theta)), f), expected, atol=1e-12)


def test_bulyan_phase_two_keeps_huge_values_out_of_the_sum():
    G = torch.tensor([[1e38], [1.0], [2.0], [3.0], [-1e38]])
    assert torch.equal(closest_to_median(G, [0, 1, 2, 3, 4], 1), torch.tensor([2.0]))


def test_bulyan_phase_two_reads_only_the_selected_rows(monkeypatch):
    monkeypatch.setitem(selection.BLOCK_ELEMENTS, "cpu", 12)
    G = torch.randn(11, 29, generator=torch.Generator().manual_seed(6))
    rows = [7, 0, 3, 9, 10, 2, 5]
    assert torch.allclose(closest_to_median(G, rows, 1), sort_reference_phase2(G[rows], 1), atol=1e-6)
