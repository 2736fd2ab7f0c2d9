"""Aggregator diagnostics (``Aggregator.diagnostics``, ``optimizer.stats``, metrics.jsonl):
the reported per-rank weights must rebuild the aggregate, computed apart in fp64, and name
the ranks a rule dropped; the sharded exchange reports what one process computes."""

from __future__ import annotations

import pytest
import torch

import fa_hvd
from fa_hvd.aggregators import get
from fa_hvd.exchange import ShardedExchange
from local_world import run_ranks
from loopback import LoopbackTransport

P, F = 9, 2
NAN_ROW, HUGE_ROW = 3, 7
COMBINING = ["nmean", "krum", "multikrum", "geomed", "mda", "flag", "nnm+multikrum"]


def attacked(n=40, seed=0):
    """Nine rows around a common direction; row 3 holds a NaN, row 7 is finite but 1e30 times too long."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, generator=gen) + 0.3 * torch.randn(P, n, generator=gen)
    G[NAN_ROW, 5] = float("nan")
    G[HUGE_ROW] *= 1e30
    return G


def rebuilt(G: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_i w_i g_i in fp64 over the rows of non-zero weight."""
    w = torch.tensor(weights, dtype=torch.float64)
    used = w != 0
    return (w[used, None] * G[used].double()).sum(0)


@pytest.mark.parametrize("name", COMBINING + ["flag-reference"])
def test_weights_rebuild_the_aggregate_and_name_the_dropped_ranks(name):
    rule = get("flag", f=F, mode="reference") if name == "flag-reference" else get(name, f=F)
    G = attacked()
    out = rule(G)
    report = rule.diagnostics
    assert report["nonfinite"] == [NAN_ROW]
    assert len(report["weights"]) == P and report["weights"][NAN_ROW] == 0.0
    assert torch.allclose(rebuilt(G, report["weights"]), out.double(), rtol=1e-5, atol=1e-6)
    assert report["dropped"] == [i for i, w in enumerate(report["weights"]) if w == 0.0]
    if name in ("krum", "multikrum", "nnm+multikrum"):  # rules that leave an outlier out
        assert HUGE_ROW in report["dropped"]
    if name == "flag":  # FA clips around its centre: the outlier adds at most an honest row's length
        honest = max(float(G[i].double().norm()) for i in range(P) if i not in (NAN_ROW, HUGE_ROW))
        assert abs(report["weights"][HUGE_ROW]) * float(G[HUGE_ROW].double().norm()) <= honest


def test_krum_weights_are_its_one_choice():
    G = attacked()
    rule = get("krum", f=F)
    out = rule(G)
    chosen = [i for i, w in enumerate(rule.diagnostics["weights"]) if w != 0.0]
    assert len(chosen) == 1 and rule.diagnostics["weights"][chosen[0]] == 1.0
    assert torch.equal(out, G[chosen[0]])


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "bulyan", "cclip"])
def test_coordinatewise_rules_report_the_non_finite_rows_only(name):
    rule = get(name, f=F)
    rule(attacked())
    assert rule.diagnostics == {"nonfinite": [NAN_ROW], "dropped": [NAN_ROW]}


def test_every_row_non_finite_is_reported():
    rule = get("flag", f=F)
    rule(torch.full((P, 4), float("nan")))
    assert rule.diagnostics == {"nonfinite": list(range(P)), "dropped": list(range(P))}


@pytest.mark.parametrize("name", ["flag", "multikrum", "median"])
def test_the_sharded_exchange_reports_what_one_process_computes(name):
    G = attacked(n=50)
    alone = get(name, f=F)
    alone(G)

    def body(transport):
        exchange = ShardedExchange(transport, get(name, f=F), prefix="diag")
        exchange.start(0, G[transport.rank].clone())
        exchange.finish(1, G.device, 0)
        return exchange.aggregator.diagnostics

    for report in run_ranks(P, body):
        assert report.keys() == alone.diagnostics.keys()
        assert report["nonfinite"] == alone.diagnostics["nonfinite"] and report["dropped"] == alone.diagnostics["dropped"]
        if "weights" in report:
            assert report["weights"] == pytest.approx(alone.diagnostics["weights"], rel=1e-6, abs=1e-12)
        for key in ("alignment", "distance"):  # the trust signals: from the partial Grams (fa_hvd.train.trust)
            assert (key in report) == (name != "median")
            if key in report:
                mine, theirs = report[key], alone.diagnostics[key]
                assert [v is None for v in mine] == [v is None for v in theirs] and any(v is None for v in mine)
                assert [v for v in mine if v is not None] == pytest.approx([v for v in theirs if v is not None],
                                                                           rel=1e-6, abs=1e-9)


def test_optimizer_stats_carry_the_diagnostics():
    """Four simulated ranks, rank 3 sending -100 times rank 0's gradient: FA's weights clip it to at most
    an honest row's length (rank r < 3 sends (1 + 0.1 r) times rank 0's gradient)."""
    model = torch.nn.Linear(6, 3)
    opt = fa_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), aggregator="flag", aggregator_params={"f": 1},
        transport=LoopbackTransport(4, lambda row, r: -100 * row if r == 3 else (1 + 0.1 * r) * row))
    opt.zero_grad()
    model(torch.randn(5, 6)).pow(2).sum().backward()
    opt.step()
    assert opt.stats["nonfinite"] == [] and opt.stats["dropped"] == []
    weights = opt.stats["weights"]
    assert len(weights) == 4 and all(w > 0 for w in weights[:3]) and abs(weights[3]) * 100 <= 1.2
    assert sum(w * s for w, s in zip(weights, [1.0, 1.1, 1.2, -100.0])) > 0  # along the honest gradient
