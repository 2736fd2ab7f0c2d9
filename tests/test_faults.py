"""Fault injection (single process): formulas, scheduling, validation, data and process faults."""

import json
import logging
import os
import time
from statistics import NormalDist

import pytest
import torch

import fa_hvd
from fa_hvd.comm import Handle, Transport
from fa_hvd.faults import (
    FaultInjector,
    PoisonedDataset,
    allow_exceeding_f_from_env,
    cat_map,
    check_faults,
    fault_seed_from_env,
    faults_from_env,
    label_flip,
    lotka_volterra,
    parse_faults,
    poison_for_rank,
)


class FakeTransport(Transport):
    """Plays the other ranks: allgather returns ``rows`` with this rank's row put in."""

    def __init__(self, rank, rows):
        self.rank, self.size, self.local_rank = rank, rows.shape[0], 0
        self.rows = rows
        self.names = []

    def allgather_async(self, tensor, name, out=None):
        self.names.append(name)
        handle = Handle()
        handle.result = torch.cat([self.rows[: self.rank], tensor, self.rows[self.rank + 1:]])
        return handle

    def wait(self, handle):
        return handle.result

    def allgather_bytes(self, data, name, limit=None):
        return [data] * self.size


def injector(entries, rank=0, world=4, seed=0, transport=None, f=None):
    return FaultInjector(parse_faults(entries, world, f=f), rank, world, seed=seed, transport=transport)


def send(inj, g, step=0, bucket=0):
    return inj.gradient_transform(g.clone(), bucket, step)


G = torch.randn(1000, generator=torch.Generator().manual_seed(0))


# -- gradient faults: formulas ------------------------------------------------------


@pytest.mark.parametrize("entry, expected", [
    ({"kind": "signflip"}, lambda g: -g),
    ({"kind": "reverse"}, lambda g: -100 * g),
    ({"kind": "reverse", "params": {"scale": 3}}, lambda g: -3 * g),
    ({"kind": "zero"}, torch.zeros_like),
])
def test_deterministic_attacks_follow_their_formula(entry, expected):
    out = send(injector([{**entry, "ranks": [0]}]), G)
    assert not torch.equal(out, G)
    torch.testing.assert_close(out, expected(G))


@pytest.mark.parametrize("entry, check", [
    ({"kind": "nan"}, lambda out: bool(out.isnan().all())),
    ({"kind": "inf"}, lambda out: bool((out == float("inf")).all())),
    ({"kind": "inf", "params": {"sign": -1}}, lambda out: bool((out == float("-inf")).all())),
])
def test_non_finite_attacks(entry, check):
    assert check(send(injector([{**entry, "ranks": [0]}]), G))


def test_an_honest_rank_sends_its_gradient_unchanged():
    inj = injector([{"kind": "signflip", "ranks": [1]}], rank=0)
    assert torch.equal(send(inj, G), G)
    assert inj.counts == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_bitflip_flips_single_bits_of_about_rate_of_the_elements(dtype):
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = send(injector([{"kind": "bitflip", "ranks": [0], "params": {"rate": 1e-3}}]), g)
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
    diff = (g.view(int_dtype) ^ out.view(int_dtype))
    changed = diff[diff != 0]
    assert 50 <= changed.numel() <= 150  # expected 100 of 100000
    bits = sum(((changed >> k) & 1) for k in range(g.element_size() * 8))
    assert torch.equal(bits, torch.ones_like(bits))  # exactly one bit per hit element


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_is_reproducible_and_differs_across_ranks_steps_and_buckets(kind):
    entries = [{"kind": kind, "ranks": [0, 1]}]
    first = send(injector(entries, rank=0, seed=5), G, step=3)
    assert torch.equal(first, send(injector(entries, rank=0, seed=5), G, step=3))
    for other in (send(injector(entries, rank=1, seed=5), G, step=3),
                  send(injector(entries, rank=0, seed=5), G, step=4),
                  send(injector(entries, rank=0, seed=5), G, step=3, bucket=1),
                  send(injector(entries, rank=0, seed=6), G, step=3)):
        assert not torch.equal(first, other)


def test_noise_distributions():
    gauss = send(injector([{"kind": "gaussian", "ranks": [0], "params": {"sigma": 2.0}}]), torch.zeros(100_000))
    assert abs(gauss.mean()) < 0.05 and abs(gauss.std() - 2.0) < 0.05
    unif = send(injector([{"kind": "uniform", "ranks": [0]}]), torch.zeros(100_000))
    assert unif.min() >= 0 and unif.max() < 1 and abs(unif.mean() - 0.5) < 0.01


def honest_world(n=15, dim=50):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_alie_is_mu_plus_z_sigma_with_the_z_of_n15_f3():
    rows = honest_world()
    inj = injector([{"kind": "alie", "ranks": [0, 1, 2]}], rank=1, world=15, transport=FakeTransport(1, rows))
    n, f = 15, 3
    s = n // 2 + 1 - f                                   # 5
    z = NormalDist().inv_cdf((n - f - s) / (n - f))      # Phi^-1(7/12)
    assert abs(z - 0.2104) < 1e-4
    honest = rows[3:]
    expected = honest.mean(0) + z * honest.std(0)
    torch.testing.assert_close(send(inj, rows[1]), expected)


def test_alie_uses_the_given_z():
    rows = honest_world()
    inj = injector([{"kind": "alie", "ranks": [0], "params": {"z": -1.5}}], world=15, transport=FakeTransport(0, rows))
    torch.testing.assert_close(send(inj, rows[0]), rows[1:].mean(0) - 1.5 * rows[1:].std(0))


def test_alie_sign_minus_one_goes_below_the_mean_by_the_z_of_n_and_f():
    rows = honest_world()
    inj = injector([{"kind": "alie", "ranks": [0, 1, 2], "params": {"sign": -1}}], rank=1, world=15,
                   transport=FakeTransport(1, rows))
    z = NormalDist().inv_cdf(7 / 12)
    torch.testing.assert_close(send(inj, rows[1]), rows[3:].mean(0) - z * rows[3:].std(0))


def test_alie_spread_gives_each_faulty_rank_its_own_copy_around_the_same_point():
    """``spread`` s: rank r sends mu - sigma + s sigma xi_r; two ranks' copies differ, each by about s sigma per
    coordinate from the common point, and spread 0 is the plain attack bit for bit."""
    rows = honest_world(n=15, dim=20_000)
    honest = rows[3:]
    point = honest.mean(0) - honest.std(0)

    def sent(rank, spread):
        params = {"z": 1.0, "sign": -1, **({"spread": spread} if spread is not None else {})}
        inj = injector([{"kind": "alie", "ranks": [0, 1, 2], "params": params}], rank=rank, world=15,
                       transport=FakeTransport(rank, rows))
        return send(inj, rows[rank])

    assert torch.equal(sent(1, 0.0), sent(1, None)) and torch.equal(sent(1, 0.0), sent(2, 0.0))
    a, b = sent(1, 0.5), sent(2, 0.5)
    assert not torch.equal(a, b)
    for row in (a, b):
        scaled = (row - point) / honest.std(0)
        assert abs(float(scaled.mean())) < 0.03 and abs(float(scaled.std()) - 0.5) < 0.01


def test_ipm_is_minus_eps_mu():
    rows = honest_world()
    inj = injector([{"kind": "ipm", "ranks": [0, 1, 2], "params": {"eps": 0.5}}], world=15,
                   transport=FakeTransport(0, rows))
    torch.testing.assert_close(send(inj, rows[0]), -0.5 * rows[3:].mean(0))


@pytest.mark.parametrize("params, target", [({}, 3), ({"target": 7}, 7)])
def test_mimic_copies_the_target_row(params, target):
    rows = honest_world()
    inj = injector([{"kind": "mimic", "ranks": [0, 1, 2], "params": params}], rank=2, world=15,
                   transport=FakeTransport(2, rows))
    assert torch.equal(send(inj, rows[2]), rows[target])


@pytest.mark.parametrize("direction", ["std", "unit", "sign"])
def test_minmax_and_minsum_go_exactly_as_far_as_their_bound(direction):
    rows = honest_world().double()
    honest = rows[3:]
    inj = injector([{"kind": "minmax", "ranks": [0, 1, 2], "params": {"direction": direction}}], world=15,
                   transport=FakeTransport(0, rows))
    sent = send(inj, rows[0]).double()
    bound = float(torch.cdist(honest, honest).max())
    assert float(torch.cdist(sent[None], honest).max()) == pytest.approx(bound, rel=1e-5)
    assert float((sent - honest.mean(0)).norm()) > 0.1 * bound  # it did move off the mean
    inj = injector([{"kind": "minsum", "ranks": [0, 1, 2], "params": {"direction": direction}}], world=15,
                   transport=FakeTransport(0, rows))
    sent = send(inj, rows[0]).double()
    bound = float((torch.cdist(honest, honest) ** 2).sum(1).max())
    assert float(((sent - honest) ** 2).sum()) == pytest.approx(bound, rel=1e-5)


def test_tailored_search_beats_the_fixed_attacks_against_its_rule():
    from fa_hvd.aggregators import get
    from fa_hvd.faults.gradient import ATTACKS, HonestView

    rows = honest_world(5).double()
    honest = HonestView(rows[1:], (1, 2, 3, 4))
    specs = parse_faults([{"kind": "tailored", "ranks": [0], "params": {"rule": "median"}}], 5, f=1)
    assert specs[0].params == {"rule": "median", "f": 1, "count": 1, "directions": 4}
    gen = torch.Generator().manual_seed(0)

    def error(bad):
        return float((get("median", f=1)(torch.cat([rows[1:], bad[None]])) - rows[1:].mean(0)).norm())

    searched = error(ATTACKS["tailored"](rows[0], honest, gen, specs[0].params))
    fixed = [ATTACKS["minmax"](rows[0], honest, gen, {"direction": "std"}),
             ATTACKS["alie"](rows[0], honest, gen, {"z": 1.0, "sign": 1}), -rows[1:].mean(0)]
    assert searched >= max(error(bad) for bad in fixed)
    with pytest.raises(ValueError, match="params.rule must be an aggregator name"):
        parse_faults([{"kind": "tailored", "ranks": [0], "params": {"rule": "nope"}}], 5, f=1)


def test_honest_rows_exclude_ranks_whose_gradient_faults_fire_at_that_step():
    rows = honest_world()
    entries = [{"kind": "ipm", "ranks": [0]}, {"kind": "signflip", "ranks": [5], "start_step": 10}]
    inj = injector(entries, world=15, transport=FakeTransport(0, rows))
    assert inj.honest_ranks(9) == [r for r in range(15) if r != 0]
    assert inj.honest_ranks(10) == [r for r in range(15) if r not in (0, 5)]
    expected = -0.1 * rows[[r for r in range(15) if r not in (0, 5)]].mean(0)
    torch.testing.assert_close(send(inj, rows[0], step=10), expected)


def test_every_rank_gathers_once_per_bucket_while_an_omniscient_attack_is_scheduled():
    rows = honest_world(4)
    entries = [{"kind": "alie", "ranks": [0], "start_step": 2, "stop_step": 4, "params": {"z": 1.0}}]
    transport = FakeTransport(3, rows)
    honest = injector(entries, rank=3, transport=transport)
    for step in range(6):
        for bucket in range(2):
            assert torch.equal(send(honest, rows[3], step=step, bucket=bucket), rows[3])
    assert transport.names == ["fa_hvd.faults.honest0", "fa_hvd.faults.honest1"] * 2
    plain = FakeTransport(3, rows)
    send(injector([{"kind": "signflip", "ranks": [0]}], rank=3, transport=plain), rows[3])
    assert plain.names == []


def test_omniscient_attacks_need_a_matching_transport():
    with pytest.raises(ValueError, match="need a transport"):
        injector([{"kind": "ipm", "ranks": [0]}])
    with pytest.raises(ValueError, match="transport is rank 1"):
        injector([{"kind": "ipm", "ranks": [0]}], rank=0, transport=FakeTransport(1, honest_world(4)))


# -- scheduling, counts and logs -------------------------------------------------------


def fired_steps(inj, steps=400):
    return [t for t in range(steps) if not torch.equal(send(inj, G, step=t), G)]


def test_start_and_stop_steps():
    inj = injector([{"kind": "signflip", "ranks": [0], "start_step": 3, "stop_step": 6}])
    assert fired_steps(inj, 10) == [3, 4, 5]
    assert inj.counts == {"signflip": 3}


def test_probability_is_seeded_per_rank_and_step():
    entries = [{"kind": "signflip", "ranks": [0, 1], "probability": 0.5}]
    steps = fired_steps(injector(entries, seed=7))
    assert 160 <= len(steps) <= 240  # mean 200, sd 10
    assert steps == fired_steps(injector(entries, seed=7))
    assert steps != fired_steps(injector(entries, seed=8))
    assert steps != fired_steps(injector(entries, rank=1, seed=7))
    assert fired_steps(injector([{**entries[0], "probability": 0.0}]), 50) == []


def test_a_fault_that_fires_hits_every_bucket_of_the_step_and_counts_once():
    inj = injector([{"kind": "signflip", "ranks": [0], "probability": 0.5}], seed=3)
    for step in range(50):
        flipped = [not torch.equal(send(inj, G, step=step, bucket=b), G) for b in range(3)]
        assert len(set(flipped)) == 1
    assert inj.counts["signflip"] == sum(inj.fires(0, 0, t) for t in range(50))


def test_first_injection_is_logged_once_per_kind(caplog):
    inj = injector([{"kind": "signflip", "ranks": [2], "start_step": 3, "stop_step": 6}], rank=2)
    with caplog.at_level(logging.INFO, logger="fa_hvd.faults"):
        fired_steps(inj, 10)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["rank 2: injecting signflip at steps [3, 6) with probability 1.0 (first at step 3)"]


def test_omniscient_cost_is_logged_at_construction(caplog):
    with caplog.at_level(logging.INFO, logger="fa_hvd.faults"):
        injector([{"kind": "mimic", "ranks": [0]}], rank=1, transport=FakeTransport(1, honest_world(4)))
    assert any("one extra allgather per bucket per step" in r.getMessage() for r in caplog.records)


def test_plugs_into_the_distributed_optimizer():
    class OneRank(FakeTransport):
        def allgather_async(self, tensor, name, out=None):
            handle = Handle()
            handle.result = tensor
            return handle

    model = torch.nn.Linear(3, 2)
    inj = injector([{"kind": "signflip", "ranks": [0], "start_step": 1}], world=1)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), aggregator="mean",
                                      transport=OneRank(0, torch.zeros(1, 1)),
                                      gradient_transform=inj.gradient_transform)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        clean = [p.grad.clone() for p in model.parameters()]
        opt.step()
        grads.append((clean, [p.grad.clone() for p in model.parameters()]))
    (clean0, sent0), (clean1, sent1) = grads
    assert all(torch.equal(a, b) for a, b in zip(clean0, sent0))
    assert all(torch.equal(-a, b) for a, b in zip(clean1, sent1))


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("entries, needle", [
    ([{"kind": "explode", "ranks": [0]}], r"faults\[0\]: unknown kind 'explode'"),
    ([{"kind": "zero", "ranks": [0]}, {"kind": "alie", "ranks": [7]}],
     r"faults\[1\] \(kind 'alie'\): rank 7 is outside the world of 4 ranks"),
    ([{"kind": "zero", "ranks": [0], "probability": 1.5}], r"faults\[0\] \(kind 'zero'\): probability"),
    ([{"kind": "zero", "ranks": [0], "start_step": 5, "stop_step": 5}], "stop_step must be"),
    ([{"kind": "zero", "ranks": [0], "start_step": 1.5}], "start_step must be"),
    ([{"kind": "zero", "ranks": [0], "when": 3}], r"unknown key\(s\) \['when'\]"),
    ([{"kind": "zero", "ranks": []}], "'ranks' must be"),
    ([{"kind": "zero", "ranks": [1, 1]}], "lists a rank twice"),
    ([{"kind": "gaussian", "ranks": [0], "params": {"sigma": -1}}], r"params.sigma must be a number > 0"),
    ([{"kind": "zero", "ranks": [0], "params": {"scale": 2}}], r"unknown param\(s\) \['scale'\]"),
    ([{"kind": "labelflip", "ranks": [0]}], "params.num_classes is required"),
    ([{"kind": "labelflip", "ranks": [0], "params": {"num_classes": 10}, "stop_step": 9}], "whole run"),
    ([{"kind": "mimic", "ranks": [0], "params": {"target": 1}}, {"kind": "zero", "ranks": [1]}],
     r"params.target 1 must be a rank"),
    ("zero", "must be a list"),
])
def test_invalid_specs_name_the_entry(entries, needle):
    with pytest.raises(ValueError, match=needle):
        parse_faults(entries, world_size=4)


def test_alie_z_that_cannot_be_derived_asks_for_params_z():
    with pytest.raises(ValueError, match="give params.z"):
        parse_faults([{"kind": "alie", "ranks": [0]}], world_size=2)
    assert parse_faults([{"kind": "alie", "ranks": [0], "params": {"z": 1.0}}], world_size=2)[0].params == \
        {"z": 1.0, "sign": 1, "spread": 0.0}


def test_defaults_are_filled_in():
    (spec,) = parse_faults([{"kind": "reverse", "ranks": 2}], world_size=4)
    assert (spec.ranks, spec.start_step, spec.stop_step, spec.probability, spec.params) == \
        ([2], 0, None, 1.0, {"scale": 100.0})


def test_more_faulty_ranks_than_f():
    entries = [{"kind": "signflip", "ranks": [0, 1]},
               {"kind": "labelflip", "ranks": [2], "params": {"num_classes": 10}},
               {"kind": "crash", "ranks": [3]}]
    assert len(parse_faults(entries, 8, f=3)) == 3  # crash is not Byzantine
    with pytest.raises(ValueError, match=r"3 ranks Byzantine \[0, 1, 2\].*f=2"):
        parse_faults(entries, 8, f=2)
    with pytest.warns(UserWarning, match=r"3 ranks Byzantine .* f=2"):
        assert len(parse_faults(entries, 8, f=2, allow_exceeding_f=True)) == 3


def test_a_fault_given_by_hosts_acts_on_that_worlds_ranks_on_them():
    """``hosts`` follows the machine: the ranks on it in each world, none once it is gone, none before the
    ranks met (``rank_hosts=[]``); f counts the resolved ranks; a caller that knows no hosts refuses it."""
    entry = [{"kind": "reverse", "hosts": ["node2"]}]
    (spec,) = parse_faults(entry, 4, f=2, rank_hosts=["node2", "node2", "node1", "node1"])
    assert (spec.ranks, spec.hosts) == ([0, 1], ["node2"])
    assert parse_faults(entry, 3, f=1, rank_hosts=["node1", "node1", "node3"])[0].ranks == []
    assert parse_faults(entry, 4, f=1, rank_hosts=[])[0].ranks == []
    with pytest.raises(ValueError, match=r"2 ranks Byzantine \[2, 3\].*f=1"):
        parse_faults(entry, 4, f=1, rank_hosts=["node1", "node1", "node2", "node2"])
    (alie,) = parse_faults([{"kind": "alie", "hosts": "node2"}], 4, rank_hosts=["a", "b", "c", "node2"])
    assert alie.ranks == [3] and alie.params["z"] is not None
    with pytest.raises(ValueError, match=r"faults\[0\].*needs fa-hvd-train.*give 'ranks' here"):
        parse_faults(entry, 4)
    with pytest.raises(ValueError, match=r"give 'ranks' or 'hosts', not both"):
        parse_faults([{"kind": "reverse", "ranks": [0], "hosts": ["node2"]}], 4, rank_hosts=[])
    for bad in ([], [""], ["a", "a"], [3]):
        with pytest.raises(ValueError, match=r"'hosts'"):
            parse_faults([{"kind": "reverse", "hosts": bad}], 4, rank_hosts=[])


# -- environment ------------------------------------------------------------------------------


def test_faults_from_env_inline_yaml_json_and_file(tmp_path):
    entries = [{"kind": "alie", "ranks": [0, 1]}, {"kind": "slow", "ranks": 2, "params": {"delay": 0.5}}]
    assert faults_from_env({"FA_HVD_FAULTS": "[{kind: alie, ranks: [0, 1]}, "
                                             "{kind: slow, ranks: 2, params: {delay: 0.5}}]"}) == entries
    assert faults_from_env({"FA_HVD_FAULTS": json.dumps(entries)}) == entries
    path = tmp_path / "faults.yaml"
    path.write_text("faults:\n  - kind: alie\n    ranks: [0, 1]\n  - kind: slow\n    ranks: 2\n"
                    "    params: {delay: 0.5}\n")
    assert faults_from_env({"FA_HVD_FAULTS": f"@{path}"}) == entries
    assert faults_from_env({}) == []
    with pytest.raises(ValueError, match="cannot read"):
        faults_from_env({"FA_HVD_FAULTS": f"@{tmp_path}/missing.yaml"})
    with pytest.raises(ValueError, match="list of faults"):
        faults_from_env({"FA_HVD_FAULTS": "kind: alie"})


@pytest.mark.parametrize("entries, message", [
    ([{"kind": "alie2", "ranks": [1]}], r"faults\[0\]: unknown kind 'alie2'"),
    ([{"kind": "alie", "ranks": [-1]}], r"faults\[0\] \(kind 'alie'\): rank -1 is negative"),
    ([{"kind": "slow", "ranks": [1], "params": {"delay": 0}}], r"params.delay must be a number > 0"),
    ([{"kind": "zero", "ranks": [1], "start_step": 3, "stop_step": 2}], r"stop_step must be"),
    ([{"kind": "zero", "hosts": ["n1"]}], r"'hosts' needs fa-hvd-train"),
    ([{"kind": "zero", "ranks": [1]}, {"kind": "alie", "ranks": [2]}], r"faults make 2 ranks Byzantine \[1, 2\]"),
    ({"kind": "zero"}, r"faults must be a list"),
])
def test_check_faults_refuses_what_needs_no_world_size(entries, message):
    with pytest.raises(ValueError, match=message):
        check_faults(entries, f=1)


def test_check_faults_leaves_the_range_and_an_allowed_excess_to_parse_faults(recwarn):
    entries = [{"kind": "zero", "ranks": [1]}, {"kind": "alie", "ranks": [9]}]
    check_faults(entries, f=1, allow_exceeding_f=True)
    check_faults(entries[1:], f=1)
    assert not recwarn.list  # parse_faults warns once the world is known
    with pytest.raises(ValueError, match="rank 9 is outside the world of 4 ranks"):
        parse_faults(entries[1:], 4, f=1)


def test_fault_seed_from_env():
    assert fault_seed_from_env({}) == 0
    assert fault_seed_from_env({"FA_HVD_FAULT_SEED": " 7 "}) == 7
    with pytest.raises(ValueError, match="FA_HVD_FAULT_SEED must be an integer, got 'x'"):
        fault_seed_from_env({"FA_HVD_FAULT_SEED": "x"})


def test_faults_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("FA_HVD_FAULTS", "- {kind: zero, ranks: [0]}")
    monkeypatch.setenv("FA_HVD_ALLOW_EXCEEDING_F", "true")
    assert faults_from_env() == [{"kind": "zero", "ranks": [0]}]
    assert allow_exceeding_f_from_env() is True
    assert allow_exceeding_f_from_env({}) is False
    assert allow_exceeding_f_from_env({"FA_HVD_ALLOW_EXCEEDING_F": "1"}) is True
    with pytest.raises(ValueError):
        allow_exceeding_f_from_env({"FA_HVD_ALLOW_EXCEEDING_F": "maybe"})


# -- data faults --------------------------------------------------------------------------------


def test_label_flip():
    assert torch.equal(label_flip(torch.tensor([0, 3, 9]), 10), torch.tensor([9, 6, 0]))
    assert label_flip(2, 10) == 7
    with pytest.raises(ValueError, match="labels must lie"):
        label_flip(torch.tensor([10]), 10)


def cat_map_period(n):
    image = torch.arange(n * n).reshape(n, n)
    current, period = cat_map(image), 1
    while not torch.equal(current, image):
        current, period = cat_map(current), period + 1
    return period


def test_cat_map_is_a_pixel_permutation_with_the_known_map():
    n = 7
    image = torch.arange(n * n).reshape(n, n)
    out = cat_map(image, iterations=3)
    assert torch.equal(out.reshape(-1).sort().values, image.reshape(-1))  # a bijection of the pixels
    once = cat_map(image)
    for x in range(n):
        for y in range(n):
            assert once[(2 * x + y) % n, (x + y) % n] == image[x, y]


def test_cat_map_period():
    assert cat_map_period(5) == 10
    image = torch.rand(2, 3, 5, 5)
    assert torch.equal(cat_map(image, iterations=10), image)
    assert not torch.equal(cat_map(image, iterations=9), image)
    assert torch.equal(cat_map(image, 4)[1, 2], cat_map(image[1, 2], 4))  # batch and channels alike
    with pytest.raises(ValueError, match="square"):
        cat_map(torch.rand(1, 4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_lotka_volterra_keeps_shape_dtype_and_range_and_changes_the_image(dtype):
    images = (torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(0)) * 200 + 20).to(dtype)
    out = lotka_volterra(images, dt=0.1, steps=10)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= images.min() and out.max() <= images.max()
    assert (out != images).float().mean() > 0.5
    assert torch.equal(lotka_volterra(images[1, 0]), out[1, 0])  # one image or a batch alike


def test_lotka_volterra_of_a_constant_image_is_constant():
    image = torch.full((1, 16, 16), 0.25)
    assert torch.equal(lotka_volterra(image), image)


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return torch.full((5, 5), float(i)).add_(torch.arange(25.0).reshape(5, 5)), i % 10


def test_poisoned_dataset_flips_labels_on_a_seeded_fraction():
    full = PoisonedDataset(Pairs(), "labelflip", {"num_classes": 10})
    assert [full[i][1] for i in range(10)] == [9 - i for i in range(10)]
    half = PoisonedDataset(Pairs(), "labelflip", {"num_classes": 10}, seed=4, probability=0.5)
    flipped = [i for i in range(1000) if half[i][1] != i % 10]
    assert 420 <= len(flipped) <= 580  # mean 500, sd 16
    assert all(half[i][1] == 9 - i % 10 for i in flipped)
    again = PoisonedDataset(Pairs(), "labelflip", {"num_classes": 10}, seed=4, probability=0.5)
    assert flipped == [i for i in range(1000) if again.poisoned(i)]


def test_poison_for_rank_applies_only_the_faults_naming_the_rank():
    specs = parse_faults([{"kind": "catmap", "ranks": [1], "params": {"iterations": 2}},
                          {"kind": "labelflip", "ranks": [1, 2], "params": {"num_classes": 10}}], 4)
    assert isinstance(poison_for_rank(Pairs(), specs, rank=0), Pairs)
    x, y = poison_for_rank(Pairs(), specs, rank=1)[13]
    clean_x, clean_y = Pairs()[13]
    assert torch.equal(x, cat_map(clean_x, 2)) and y == 9 - clean_y
    x, y = poison_for_rank(Pairs(), specs, rank=2)[13]
    assert torch.equal(x, clean_x) and y == 9 - clean_y


# -- process faults -------------------------------------------------------------------------------


def test_slow_sleeps_the_delay_once_per_active_step(monkeypatch):
    delays = []
    monkeypatch.setattr(time, "sleep", delays.append)
    inj = injector([{"kind": "slow", "ranks": [0], "start_step": 1, "stop_step": 3, "params": {"delay": 0.25}}])
    for step in range(5):
        for bucket in range(3):
            assert torch.equal(send(inj, G, step=step, bucket=bucket), G)
    assert delays == [0.25, 0.25]
    assert inj.counts == {"slow": 2}


class Exited(Exception):
    pass


def test_crash_prints_and_exits_with_the_code(monkeypatch, capsys):
    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    inj = injector([{"kind": "crash", "ranks": [2], "start_step": 4, "params": {"exit_code": 7}}], rank=2)
    for step in range(4):
        send(inj, G, step=step)
    with pytest.raises(Exited) as exited:
        send(inj, G, step=4)
    assert exited.value.args == (7,)
    assert capsys.readouterr().err == "fa_hvd fault: rank 2 crashes at step 4\n"


def test_hang_sleeps_forever(monkeypatch, capsys):
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise Exited()

    monkeypatch.setattr(time, "sleep", fake_sleep)
    inj = injector([{"kind": "hang", "ranks": [0], "start_step": 2}])
    send(inj, G, step=1)
    assert sleeps == []
    with pytest.raises(Exited):
        send(inj, G, step=2)
    assert len(sleeps) == 3 and all(s > 0 for s in sleeps)
    assert capsys.readouterr().err == "fa_hvd fault: rank 0 hangs at step 2\n"
