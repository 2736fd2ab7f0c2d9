"""Coordinate-wise rules by sorting networks, against torch.sort; the compiled path against the eager one.

The suite runs the eager torch path (tests/conftest.py sets FA_HVD_NATIVE=0); the
compiled networks (fa_hvd.aggregators.native) are checked here, bit for bit
against it.
"""

import os
import subprocess
import time

import pytest
import torch

from fa_hvd.aggregators import base, get, native, selection
from fa_hvd.aggregators.bulyan import closest_to_median
from fa_hvd.aggregators.median import median, sorted_median
from fa_hvd.aggregators.trimmed_mean import trimmed_mean


def sort_reference_phase2(G, f):
    """Bulyan's phase 2 as first written: stable argsort of the distances to the median."""
    S = G.sort(dim=0).values
    near = (S - sorted_median(S)).abs().argsort(dim=0, stable=True)[: G.shape[0] - 2 * f]
    return S.gather(0, near).mean(dim=0)


@pytest.mark.parametrize("p", [*range(1, 34), 47, selection.MAX_NETWORK_ROWS])
def test_network_sorts_every_0_1_input(p):
    # The 0-1 principle: a comparator network sorts everything iff it sorts every 0-1 input.
    # All of them as the columns of one matrix for p <= 16, 2^16 drawn at random above.
    if p <= 16:
        bits = ((torch.arange(1 << p)[None, :] >> torch.arange(p)[:, None]) & 1).float()
    else:
        bits = torch.randint(0, 2, (p, 1 << 16), generator=torch.Generator().manual_seed(p)).float()
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
@pytest.mark.parametrize("p", [1, 2, 5, 6, 15, 16, 33, 65])
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


def test_blocks_are_sorted_by_torch_sort_off_the_cpu_and_above_the_network_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed
    assert not selection.sorts(selection.MAX_NETWORK_ROWS, cpu) and selection.sorts(selection.MAX_NETWORK_ROWS + 1, cpu)
    assert all(selection.sorts(p, cuda) for p in (1, 4, 15, 64))


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


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("FA_HVD_NATIVE", "1")
    assert native.supports(torch.zeros(2, 2)), "no C compiler: the compiled networks cannot be checked"


finite_rows = base.finite_rows


def eager(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setenv("FA_HVD_NATIVE", "0")
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 6, 15])
def test_compiled_networks_equal_the_eager_path_bit_for_bit(compiled, monkeypatch, p, dtype):
    gen = torch.Generator().manual_seed(p)
    spread = torch.randn(p, 10_001, generator=gen, dtype=dtype) * torch.logspace(-3, 3, 10_001, dtype=dtype)
    ties = torch.randint(-2, 3, (p, 999), generator=gen).to(dtype)
    for G in (spread, ties, torch.tensor([[1e38], [-3e38]], dtype=dtype).repeat(p, 1)[:p]):
        assert torch.equal(median(G), eager(monkeypatch, median, G))
        assert torch.equal(median(G), sorted_median(G.sort(dim=0).values))
        f = (p - 1) // 3
        assert torch.equal(trimmed_mean(G, f), eager(monkeypatch, trimmed_mean, G, f))
        rows = list(range(p))[::-1]
        for f in {0, (p - 1) // 2}:
            assert torch.equal(closest_to_median(G, rows, f), eager(monkeypatch, closest_to_median, G, rows, f))


def test_compiled_networks_use_every_thread_alike(compiled, monkeypatch):
    G = torch.randn(9, 100_000, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = trimmed_mean(G, 2)
        torch.set_num_threads(3)
        assert torch.equal(trimmed_mean(G, 2), one)
        assert torch.equal(trimmed_mean(G, 2, checked=True), one)
        G[4, -1] = float("nan")  # in the last thread's columns
        assert trimmed_mean(G, 2, checked=True) is None
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_clean_rows_are_read_once_and_non_finite_ones_dropped_as_before(compiled, monkeypatch, name, dtype):
    checks = []
    monkeypatch.setattr(base, "finite_rows", lambda G: checks.append(G.shape) or finite_rows(G))
    G = torch.randn(7, 5_003, generator=torch.Generator().manual_seed(8), dtype=dtype)
    G[:, 9] = -0.0
    huge = torch.finfo(dtype).max * 0.75
    cases = [(None, None, []), (3, float("nan"), [3]), (0, float("inf"), [0]), (6, -float("inf"), [6]),
             ((1, 2), huge, [])]  # two finite values whose sum overflows: checked row by row, nothing dropped
    for row, value, dropped in cases:
        H = G.clone()
        if row is not None:
            H[row, 17] = value
        checks.clear()
        out = get(name, f=2)(H)
        assert len(checks) == (row is not None)
        reference = eager(monkeypatch, get(name, f=2), H)
        assert torch.equal(out, reference) and torch.equal(out.signbit(), reference.signbit())
        assert out[9].signbit() and out.isfinite().all()
        rule = get(name, f=2)
        rule(H)
        assert rule.diagnostics["nonfinite"] == dropped


def test_a_missing_compiler_falls_back_to_the_eager_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FA_HVD_NATIVE", "1")
    monkeypatch.setenv("FA_HVD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._compiler_works.cache_clear()
    try:
        G = torch.randn(5, 100)
        assert torch.equal(median(G), sorted_median(G.sort(dim=0).values))
        assert "compiled sorting networks unavailable" in caplog.text
    finally:
        native._compiler_works.cache_clear()


def test_a_compiler_past_the_timeout_is_stopped_with_its_children(monkeypatch, tmp_path):
    """``cc`` runs ``cc1`` as a child; a build past COMPILE_TIMEOUT raises and kills both (a kill of ``cc``
    alone left ``cc1`` compiling for minutes)."""
    child = tmp_path / "child.pid"
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!/bin/sh\nsleep 300 >/dev/null 2>&1 &\necho $! > {child}\nwait\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("FA_HVD_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "COMPILE_TIMEOUT", 5)  # ample for sh to start its child and write its pid
    with pytest.raises(subprocess.TimeoutExpired):
        native.function("void f(void) {}", "f")
    pid = int(child.read_text())
    for _ in range(100):
        if not _running(pid):
            break
        time.sleep(0.05)
    assert not _running(pid), "the compiler's child outlived the timeout"


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has finished: its parent is gone and nobody reaped it yet)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False
