"""Per-rank trust and named suspects (fa_hvd.train.trust): the ledger on hand-made diagnostics,
the trainer on 4 in-process ranks (both exchanges) and on 4 horovodrun ranks with one rank
injecting a fault, and the TensorBoard scalars read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import dataclasses

import json
import socket
import statistics

import pytest
import torch

from conftest import untagged
from fa_hvd.train import config as train_config
from fa_hvd.train import control, metrics, tensorboard, trainer, trust
from local_world import run_ranks
from train_helpers import finish, start, write_config

EQUAL = {"nonfinite": [], "dropped": [], "weights": [0.25] * 4}


def test_relative_weights_are_shares_of_the_sum():
    assert trust.relative_weights(4, {"weights": [0.5, 0.5, 0.5, 0.5]}) == [1.0] * 4
    assert trust.relative_weights(4, {"weights": [0.3, 0.3, 0.4, 0.0]}) == pytest.approx([1.2, 1.2, 1.6, 0.0])
    assert trust.relative_weights(4, {"nonfinite": [1], "dropped": [1]}) is None
    assert trust.relative_weights(4, {"weights": [0.0] * 4}) is None


def test_a_rank_is_named_once_when_its_window_crosses_the_threshold():
    ledger = trust.TrustLedger(4, trust.Thresholds(window=4, min_weight=0.2),
                               [{"host": f"node{r}", "local_rank": r} for r in range(4)])
    low = {"nonfinite": [], "dropped": [], "weights": [0.33, 0.33, 0.33, 0.01]}
    named = [ledger.observe(step, EQUAL if step <= 5 else low) for step in range(1, 13)]
    # the window mean of rank 3 (1.0 per equal step, 0.04 per low one) falls below 0.2 at step 9
    assert [step for step, n in enumerate(named, 1) if n] == [9]
    (suspect,) = named[8]
    assert (suspect["rank"], suspect["host"], suspect["step"]) == (3, "node3", 9)
    assert suspect["window_weight"] == pytest.approx(0.04)
    assert "warning: suspect rank 3 on host node3 (local rank 3)" in ledger.describe(suspect)
    figures = ledger.summary()
    assert [s["rank"] for s in figures["suspects"]] == [3]
    assert figures["ranks"][3]["run_weight"] == pytest.approx((5 + 7 * 0.04) / 12)
    assert figures["ranks"][0]["window_weight"] == pytest.approx(4 * 0.33)


def test_dropped_and_nonfinite_steps_are_kept_as_ranges():
    ledger = trust.TrustLedger(4, trust.Thresholds(window=3, max_nonfinite=0.5))
    for step in range(1, 9):
        bad = step in (2, 3, 4, 7)
        ledger.observe(step, {"nonfinite": [1] if bad else [], "dropped": [1] if bad else [2]})
    ranks = ledger.summary()["ranks"]
    assert ranks[1]["nonfinite"] == [[2, 4], [7, 7]] and ranks[1]["nonfinite_steps"] == 4
    assert ranks[2]["dropped"] == [[1, 1], [5, 6], [8, 8]] and ranks[2]["nonfinite_steps"] == 0
    # no weights (a coordinate-wise rule): only non-finite rows can be named; rank 1 at step 3 (2 of 3)
    assert [(s["rank"], s["step"]) for s in ledger.summary()["suspects"]] == [(1, 3)]
    assert ranks[2]["window_weight"] is None


def test_honest_ranks_with_unequal_weights_are_not_named():
    ledger = trust.TrustLedger(4, trust.Thresholds(window=2, min_weight=0.2))
    for step in range(1, 20):
        ledger.observe(step, {"nonfinite": [], "dropped": [], "weights": [0.4, 0.3, 0.2, 0.1]})
    assert ledger.suspects == {}


def test_thresholds_are_validated_naming_the_key():
    for key, value in (("window", 0), ("min_weight", 1.5), ("max_nonfinite", 1.0), ("min_alignment", 0.1),
                       ("min_distance", 1.0), ("max_distance", 0.5), ("max_loss_excess", 0), ("min_loss_z", -1)):
        with pytest.raises(train_config.cfg.ConfigError, match=f"log.suspects.{key}: must be"):
            train_config.parse({"log": {"suspects": {key: value}}})


# Runs of a dozen steps judge windows of 3 to 5 steps: too few for the alignment and distance thresholds,
# measured on 100-step windows (an honest rank of the 4-rank run below reaches a 5-step mean alignment of -0.30).
NOISY = {"window": 5, "min_alignment": None, "min_distance": None, "max_distance": None}


def _config(**extra) -> dict:
    return {"seed": 1, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": 16},
            "optim": {"lr": 0.05, "momentum": 0.0}, "train": {"steps": 12, "batch_size": 8, "device": "cpu"},
            "robust": {"aggregator": "flag", "aggregator_params": {"f": 1}},
            "faults": [{"kind": "reverse", "ranks": [3]}], "log": {"suspects": NOISY}, **extra}


def _trained(conf, conf_data, tmp_path, transport) -> trainer.Trainer:
    """One in-process rank's trainer after the whole run (rank 0 logs and writes summary.json)."""
    t = trainer.Trainer(conf, conf_data, tmp_path / f"run{transport.rank}", transport)
    t.load_data()
    t.check_world()
    t.build()
    (t.run_dir / "checkpoints").mkdir(parents=True)
    t.last_checkpoint_time = 0.0
    if t.rank == 0:
        t.log = metrics.MetricsLog(t.run_dir / "metrics.jsonl", None)
        t.progress = metrics.Progress(conf.train.steps, 0, "none")
    t.finish(t.train(control.StopSignals()))
    return t


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["allgather", "sharded"])
def test_four_ranks_in_process_name_the_faulty_rank(tmp_path, exchange):
    """Rank 3 sends -100 x its gradient: every rank's ledger names rank 3 alone (in the sharded
    exchange from what the shard owners reported), rank 0 logs one event and lists it in summary.json."""
    conf, conf_data = train_config.parse(_config(robust={"aggregator": "flag", "aggregator_params": {"f": 1},
                                                         "exchange": exchange}))

    def rank(transport):
        t = _trained(conf, conf_data, tmp_path, transport)
        return sorted(t.trust.suspects)

    assert run_ranks(4, rank) == [[3]] * 4
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert [(s["rank"], s["host"], s["local_rank"]) for s in summary["suspects"]] == [(3, socket.gethostname(), 3)]
    assert summary["trust"]["ranks"][3]["run_weight"] < 0.2 < min(r["run_weight"] for r in summary["trust"]["ranks"][:3])
    events = [r for r in metrics.read(tmp_path / "run0") if r["kind"] == "event" and "suspect" in r]
    assert [(e["suspect"]["rank"], e["step"]) for e in events] == [(3, 5)]


def test_the_trainer_judges_every_ranks_loss_from_the_steps_agreement(tmp_path):
    """Rank 3 says its batch loss is 1e6 at every step (``lie_loss``): under the coordinate-wise median, which
    reports no weights, the loss excess alone names it at the window's end, on every rank, with its evidence.
    (It frames itself: a rank's word on its loss names only its own data, see fa_hvd.train.trust.)"""
    conf, conf_data = train_config.parse(_config(
        robust={"aggregator": "median", "aggregator_params": {"f": 1}}, faults=[{"kind": "lie_loss", "ranks": [3]}],
        log={"suspects": {**NOISY, "max_loss_excess": 1.0}}, train={"steps": 6, "batch_size": 8, "device": "cpu"}))

    def rank(transport):
        t = _trained(conf, conf_data, tmp_path, transport)
        return [(s["rank"], s["step"], s["window_loss_excess"] > 1e5, "mean batch loss" in s["reason"])
                for s in t.trust.suspects.values()]

    assert run_ranks(4, rank) == [[(3, 5, True, True)]] * 4


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_the_trainer_judges_iid_shards_by_the_iid_defaults(tmp_path, alpha):
    """data.alpha null (IID shards): the rule's IID defaults, for the suspects and for robust.evict's ledger; a
    Dirichlet split (alpha set): the defaults measured over both splits. A threshold set in the config wins."""
    conf, conf_data = train_config.parse(_config(
        data={"name": "digits", "alpha": alpha}, faults=[], train={"steps": 2, "batch_size": 8, "device": "cpu"},
        robust={"aggregator": "flag", "aggregator_params": {"f": 1}, "evict": {"window": 100, "threshold": 0.2}},
        log={"suspects": {"max_loss_excess": 0.9}}))
    measured = (trust.IID_DEFAULTS if alpha is None else trust.DEFAULTS)["flag"]

    def rank(transport):
        t = _trained(conf, conf_data, tmp_path, transport)
        return t.trust.thresholds, t.evictor.thresholds

    for judged, evicting in run_ranks(4, rank):
        assert judged == dataclasses.replace(measured, max_loss_excess=0.9)
        assert evicting == dataclasses.replace(measured, max_loss_excess=0.9, min_weight=0.2)


@pytest.mark.parametrize("value, expected", [("rule", trust.LOSS_Z), (None, None), (5, 5.0)])
def test_the_loss_z_gate_is_the_measured_rules_unless_the_config_sets_it(value, expected):
    conf, _ = train_config.parse({"log": {"suspects": {"min_loss_z": value}}})
    for rule in ("flag", "median"):
        assert conf.log.suspects.thresholds(rule).min_loss_z == expected


def test_the_measured_loss_excess_names_suspects_but_evicts_no_one(tmp_path):
    """An attack that slows training lifts honest ranks' losses past the measured loss excess (the README,
    "Eviction"): robust.evict judges it only where log.suspects sets it by number (the test above)."""
    conf, conf_data = train_config.parse(_config(
        faults=[], train={"steps": 2, "batch_size": 8, "device": "cpu"},
        robust={"aggregator": "flag", "aggregator_params": {"f": 1}, "evict": {"window": 100, "threshold": 0.2}},
        log={"suspects": {}}))
    measured = trust.IID_DEFAULTS["flag"]

    def rank(transport):
        t = _trained(conf, conf_data, tmp_path, transport)
        return t.trust.thresholds, t.evictor.thresholds

    for judged, evicting in run_ranks(4, rank):
        assert judged == measured and measured.max_loss_excess is not None
        assert evicting == dataclasses.replace(measured, max_loss_excess=None, min_weight=0.2)


@pytest.mark.slow
def test_horovodrun_four_ranks_one_faulty_names_its_host_and_writes_tensorboard(tmp_path):
    """The bar: 4 ranks under horovodrun, rank 3 injecting a fault; the suspect is named with its host
    (warning line and final line), listed in summary.json, and the TensorBoard event file holds every
    rank's relative weight."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path / "c.yaml", **_config())
    run_dir, board = tmp_path / "run", tmp_path / "tb"
    out = untagged(finish(start(4, config, run_dir, "--tensorboard", str(board)), timeout=300))
    host = socket.gethostname()
    assert f"warning: suspect rank 3 on host {host} (local rank 3)" in out, out
    assert f"suspects: rank 3 on host {host} (local rank 3)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["faults_injected"]["3"]
    assert [(s["rank"], s["host"]) for s in summary["suspects"]] == [(3, host)]
    events = EventAccumulator(str(board))
    events.Reload()
    weights = {r: [e.value for e in events.Scalars(f"trust/weight/rank_{r}")] for r in range(4)}
    assert all(len(w) == 12 for w in weights.values())
    assert max(weights[3]) < 0.2 and min(min(weights[r]) for r in range(3)) > 0.5
    assert len(events.Scalars("eval/test_accuracy")) == 1 and len(events.Scalars("train/loss")) == 12


def test_without_the_tensorboard_package_one_line_and_no_board(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    said = []
    assert tensorboard.open_board("somewhere", said.append) is None
    assert said == [tensorboard.MISSING]
    assert tensorboard.open_board(None, said.append) is None and len(said) == 1


def test_the_ledger_round_trips_through_its_state():
    ledger = trust.TrustLedger(4, trust.Thresholds(window=3, min_weight=0.2))
    low = {"nonfinite": [2], "dropped": [2, 3], "weights": [0.5, 0.5, 0.0, 0.0]}
    for step in range(1, 6):
        ledger.observe(step, low)
    again = trust.TrustLedger(4, trust.Thresholds(window=3, min_weight=0.2))
    again.load_state_dict(ledger.state_dict())
    assert again.summary() == ledger.summary() and sorted(again.suspects) == [2, 3]
    assert again.observe(6, low) == [] and again.summary()["ranks"][3]["dropped"] == [[1, 6]]
    with pytest.raises(ValueError, match="trust state of 4 ranks"):
        trust.TrustLedger(3).load_state_dict(ledger.state_dict())


def test_suspects_survive_a_world_of_another_size_and_are_named_once():
    """4 ranks name rank 3 (node1); a world of 3 without node1 starts its figures afresh but lists it (with
    the world it was named in), through a checkpoint too; back on 4 ranks, node1 at rank 1 is not named again."""
    places = [_identity(f"node{h}", r, None) for h, r in ((0, 0), (0, 1), (0, 2), (1, 0))]
    low3 = {"nonfinite": [], "dropped": [3], "weights": [1 / 3, 1 / 3, 1 / 3, 0.0]}
    four = trust.TrustLedger(4, trust.Thresholds(window=2, min_weight=0.2), places)
    for step in (1, 2):
        four.observe(step, low3)
    (named,) = four.summary()["suspects"]
    assert (named["rank"], named["host"], named["step"]) == (3, "node1", 2)

    three = trust.TrustLedger(3, trust.Thresholds(window=2, min_weight=0.2), places[:3])
    three.carry(json.loads(json.dumps(four.state_dict())))
    assert three.summary()["suspects"] == [{**named, "world_size": 4}]
    assert three.steps == 0 and three.summary()["ranks"][2]["run_weight"] is None
    for step in (3, 4):
        three.observe(step, {"nonfinite": [], "dropped": [2], "weights": [0.5, 0.5, 0.0]})
    assert [(s["rank"], s["host"], s["step"]) for s in three.summary()["suspects"]] == [(3, "node1", 2),
                                                                                       (2, "node0", 4)]
    resumed = trust.TrustLedger(3, trust.Thresholds(window=2, min_weight=0.2), places[:3])
    resumed.load_state_dict(json.loads(json.dumps(three.state_dict())))
    assert resumed.summary() == three.summary()

    again = trust.TrustLedger(4, trust.Thresholds(window=2, min_weight=0.2), [places[0], places[3], places[1], places[2]])
    again.carry(resumed.state_dict())
    assert [(s["rank"], s["step"], s["world_size"]) for s in again.summary()["suspects"]] == [(3, 2, 4), (2, 4, 3)]
    low1 = {"nonfinite": [], "dropped": [1], "weights": [1 / 3, 0.0, 1 / 3, 1 / 3]}
    assert [again.observe(step, low1) for step in (5, 6)] == [[], []]  # node1 was named on 4 ranks already
    assert len(again.summary()["suspects"]) == 2 and again.summary()["ranks"][1]["run_weight"] == 0.0


def test_a_resumed_run_keeps_its_trust_and_names_no_one_twice(tmp_path):
    """Four simulated ranks (loopback), rank 3 sending -100 x rank 0's gradient: named at step 3;
    the run resumed from its step-4 checkpoint goes on with the same figures and no second event.
    The digest is off: loopback ranks echo rank 0's control row (rank 3's scaled), so they cannot
    publish fingerprints of their own (tests/test_trust.py checks the digest with real ranks)."""
    from loopback import LoopbackTransport

    def run(steps, state=None):
        conf, conf_data = train_config.parse(_config(train={"steps": steps, "batch_size": 8, "device": "cpu"},
                                                     faults=[], log={"suspects": {**NOISY, "window": 3}},
                                                     checkpoint={"every_steps": 4},
                                                     robust={"aggregator": "flag", "aggregator_params": {"f": 1},
                                                             "digest": False}))
        t = trainer.Trainer(conf, conf_data, tmp_path / "run", LoopbackTransport(4, lambda row, r: -100 * row
                                                                                 if r == 3 else row))
        t.load_data()
        t.check_world()
        t.build()
        if state is not None:
            t.load_state(state)
        (t.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        t.last_checkpoint_time = 0.0
        t.log = metrics.MetricsLog(t.run_dir / "metrics.jsonl", t.step or None)
        t.progress = metrics.Progress(steps, t.step, "none")
        t.train(control.StopSignals())
        t.writer.wait()
        return t

    first = run(4)
    resumed = run(6, trainer.checkpoint.read(tmp_path / "run" / "checkpoints" / "step-000000004.ckpt"))
    assert resumed.trust.steps == 6 and sorted(resumed.trust.suspects) == [3]
    assert resumed.trust.suspects[3]["step"] == first.trust.suspects[3]["step"] == 3
    events = [r for r in metrics.read(tmp_path / "run") if r["kind"] == "event" and "suspect" in r]
    assert [e["step"] for e in events] == [3]


def test_plot_draws_the_trust_heatmap_with_the_suspect(tmp_path):
    """fa-hvd-plot reads the per-step weights and the suspect event back from metrics.jsonl."""
    from fa_hvd import plot

    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", None)
    for step in range(1, 6):
        log.write({"kind": "step", "step": step, "loss": 1.0, "world_size": 4, "nonfinite": [2] if step == 2 else [],
                   "dropped": [2] if step == 2 else [], "weights": [0.3, 0.3, 0.0 if step == 2 else 0.3, 0.1]})
    log.write({"kind": "event", "step": 4, "event": "warning: suspect rank 3", "suspect": {"rank": 3}})
    log.write({"kind": "eval", "step": 5, "test_loss": 1.0, "test_accuracy": 0.5})
    log.close()
    steps, rows, suspects = plot.trust_map(tmp_path)
    assert steps == [1, 2, 3, 4, 5] and suspects == [(4, 3)]
    assert rows[0] == pytest.approx([1.2, 1.2, 1.2, 0.4]) and rows[1][2] == -float("inf")
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0 and (tmp_path / "c.png").stat().st_size


class HostsDropped(Exception):
    """Plays Horovod's host-update interrupt, which a commit raises once the discovery dropped a host."""


def _identity(host: str, r: int, launcher_host: str | None = None) -> dict:
    return {"host": host, "local_rank": r, "cuda_device": None, "gpu_uuid": None, "slurm_node": None,
            "slurm_job": None, "launcher_host": launcher_host}


def _evicting(tmp_path, monkeypatch, hosts, evict={"window": 4, "threshold": 0.2}, launcher_hosts=None,
              elastic=False):
    """A loopback trainer of ``len(hosts)`` simulated ranks on ``hosts`` (their identities; horovodrun's
    names for them ``launcher_hosts``), the last sending -100 x rank 0's gradient (the digest off, as
    loopback ranks publish no fingerprints)."""
    from loopback import LoopbackTransport

    world = len(hosts)
    launcher_hosts = launcher_hosts or [None] * world
    monkeypatch.setattr(trust, "gather_identities", lambda transport, device=None: [
        _identity(host, r, launcher) for r, (host, launcher) in enumerate(zip(hosts, launcher_hosts))])
    monkeypatch.delenv(trainer.EXCLUDE_FILE_VARIABLE, raising=False)
    conf, conf_data = train_config.parse(_config(train={"steps": 12, "batch_size": 8, "device": "cpu"}, faults=[],
                                                 robust={"aggregator": "flag", "aggregator_params": {"f": 1},
                                                         "evict": evict, "digest": False},
                                                 elastic={"enabled": elastic, "commit_every_steps": 5}))
    t = trainer.Trainer(conf, conf_data, tmp_path / "run", LoopbackTransport(world, lambda row, r: -100 * row
                                                                             if r == world - 1 else row))
    t.load_data()
    t.check_world()
    t.build()
    (t.run_dir / "checkpoints").mkdir(parents=True)
    t.last_checkpoint_time = 0.0
    t.log = metrics.MetricsLog(t.run_dir / "metrics.jsonl", None)
    t.progress = metrics.Progress(12, 0, "none")
    return t


def _evict_events(tmp_path):
    return [r for r in metrics.read(tmp_path / "run") if r["kind"] == "event" and "evicted" in r]


def test_eviction_stops_with_a_checkpoint_and_lists_the_host(tmp_path, monkeypatch):
    t = _evicting(tmp_path, monkeypatch, ["node0", "node0", "node0", "node1"])
    assert t.train(control.StopSignals()) == trainer.EXIT_EVICTED and t.step == 4
    t.writer.wait()
    assert (tmp_path / "run" / "checkpoints" / "step-000000004.ckpt").exists()
    (event,) = _evict_events(tmp_path)
    assert event["evicted"] == [3] and event["excluded"] == ["node1"]
    assert "evict: rank 3 on host node1" in event["event"] and "drain node1" in event["event"]
    assert (tmp_path / "run" / trainer.EXCLUDED_HOSTS).read_text() == "node1\n"
    assert trainer.checkpoint.read(tmp_path / "run" / "checkpoints" / "step-000000004.ckpt")["evicted"] == [
        {"step": 4, "rank": 3, "host": "node1"}]  # a resumed run counts it against f
    t.evict([{**t.trust.identities[0], "rank": 0, "reason": "r"}])  # a second one over the run: > f
    *_, event = _evict_events(tmp_path)
    assert event["excluded"] == [] and "would make 2 ranks evicted over this run (hosts node1 already), " \
        "more than f = 1: stopping to ask" in event["event"]
    assert (tmp_path / "run" / trainer.EXCLUDED_HOSTS).read_text() == "node1\n"
    assert t.evict([{**t.trust.identities[3], "rank": 3, "reason": "r"}]) is None  # node1: already on its way out


def test_eviction_without_elastic_drains_the_host_whatever_it_holds_but_never_more_than_f(tmp_path, monkeypatch):
    """Without elastic the run stops and starts again on as many ranks as it asks for (SLURM's requeue
    allocates another node), so draining node1 is not refused for the 2 ranks it would leave."""
    t = _evicting(tmp_path, monkeypatch, ["node0", "node0", "node1", "node1"])
    assert t.train(control.StopSignals()) == trainer.EXIT_EVICTED
    (event,) = _evict_events(tmp_path)
    assert event["excluded"] == ["node1"] and "drain node1" in event["event"] and "start again on 4 ranks" in event["event"]
    assert (tmp_path / "run" / trainer.EXCLUDED_HOSTS).read_text() == "node1\n"
    (tmp_path / "run" / trainer.EXCLUDED_HOSTS).unlink()
    t.evicted = []
    t.evict([{**t.trust.identities[r], "rank": r, "reason": "r"} for r in (0, 3)])
    *_, event = _evict_events(tmp_path)
    assert event["excluded"] == [] and "2 ranks crossed robust.evict's threshold at once, more than f = 1: " \
        "stopping to ask" in event["event"]
    assert not (tmp_path / "run" / trainer.EXCLUDED_HOSTS).exists()


def test_evict_config_is_validated_naming_the_key():
    with pytest.raises(train_config.cfg.ConfigError, match="robust.evict.threshold: must be in"):
        train_config.parse({"robust": {"evict": {"threshold": 2}}})
    with pytest.raises(train_config.cfg.ConfigError, match="robust.evict.windw: unknown key"):
        train_config.parse({"robust": {"evict": {"windw": 2}}})
    conf, _ = train_config.parse({"robust": {"evict": {"window": 7}}, "elastic": {"enabled": True}})
    assert conf.robust.evict.window == 7 and conf.elastic.enabled


def test_under_elastic_the_evicted_host_is_excluded_and_training_goes_on(tmp_path, monkeypatch):
    """Elastic: rank 3 on the host horovodrun calls 127.0.0.1 (the same machine as the others: one host
    name for all) crosses at step 4; 127.0.0.1 goes into FA_HVD_EXCLUDE_FILE, the run commits at once
    (out of the 5-step schedule) and goes on to the last step; the eviction is in the committed state.
    Horovod has not dropped the host by then, so the run commits until it does (its host-update
    interrupt, raised by a commit), and the world without the host finishes without waiting."""
    t = _evicting(tmp_path, monkeypatch, ["box"] * 4, launcher_hosts=["localhost"] * 3 + ["127.0.0.1"], elastic=True)
    exclude = tmp_path / "shared" / "exclude"
    exclude.parent.mkdir()
    monkeypatch.setenv(trainer.EXCLUDE_FILE_VARIABLE, str(exclude))
    monkeypatch.setattr(trainer, "DROP_POLL_S", 0.0)
    commits = []

    def commit():
        commits.append((t.step, t.shared_state()))
        if len(commits) == 5:
            raise HostsDropped

    with pytest.raises(HostsDropped):
        t.train(control.StopSignals(), commit=commit)
    assert t.step == 12 and [step for step, _ in commits] == [4, 5, 10, 12, 12]
    assert commits[0][1]["evicted"] == [{"step": 4, "rank": 3, "host": "127.0.0.1"}]
    t.evicted = []
    t.load_shared(commits[0][1])  # what a reset restores and a sync broadcasts
    assert t.evicted == [{"step": 4, "rank": 3, "host": "127.0.0.1"}]
    t.load_shared(commits[1][1])  # step 5: rank 3 named over log.suspects' 5-step window
    t.world = 3  # the world without 127.0.0.1 (as elastic.join opens it)
    monkeypatch.setattr(trust, "gather_identities", lambda transport, device=None: [
        _identity("box", r, "localhost") for r in range(3)])
    t.meet()  # as elastic.join does in each new world
    t.open_trust()
    t.load_shared(commits[-1][1])
    assert t.train(control.StopSignals(), commit=commit) == trainer.EXIT_OK and len(commits) == 5
    (suspect,) = t.summary("finished", 0, True, [])["suspects"]
    assert (suspect["rank"], suspect["step"], suspect["world_size"], suspect["evicted"]) == (3, 5, 4, 4)
    assert trainer._suspect(suspect).endswith(") [evicted at step 4]") and "named at step 5 on 4 ranks" in \
        trainer._suspect(suspect)
    assert exclude.read_text() == "127.0.0.1\n" and not (tmp_path / "run" / trainer.EXCLUDED_HOSTS).exists()
    (event,) = _evict_events(tmp_path)
    assert event["evicted"] == [3] and event["excluded"] == ["127.0.0.1"]
    assert "evict: rank 3 on host box (local rank 3)" in event["event"]
    assert f"127.0.0.1 excluded (listed in {exclude}): Horovod's host discovery drops it and the run goes on " \
        "with 3 ranks, f = 1. Training goes on" in event["event"]


def test_under_elastic_a_host_horovod_never_drops_is_waited_for_then_the_run_ends(tmp_path, monkeypatch):
    t = _evicting(tmp_path, monkeypatch, ["box"] * 4, launcher_hosts=["localhost"] * 3 + ["127.0.0.1"], elastic=True)
    monkeypatch.setattr(trainer, "DROP_POLL_S", 0.0)
    monkeypatch.setattr(trainer, "DROP_POLLS", 3)
    commits = []
    assert t.train(control.StopSignals(), commit=lambda: commits.append(t.step)) == trainer.EXIT_OK
    assert commits == [4, 5, 10, 12, 12, 12]
    *_, event = [r["event"] for r in metrics.read(tmp_path / "run") if r["kind"] == "event"]
    assert event == ("warning: evict: Horovod did not drop 127.0.0.1 within 0 s of the last step; the run ends on 4 "
                     "ranks, the host still listed for draining")


def test_under_elastic_a_refused_eviction_stops_with_a_checkpoint(tmp_path, monkeypatch):
    """Elastic, 2 ranks on each of two hosts: draining rank 3's would leave 2 ranks, fewer than FA needs
    with f = 1 (f is not lowered): the run stops at step 4 with a checkpoint and status 76, nothing excluded."""
    t = _evicting(tmp_path, monkeypatch, ["box"] * 4, launcher_hosts=["localhost"] * 2 + ["127.0.0.1"] * 2,
                  elastic=True)
    commits = []
    assert t.train(control.StopSignals(), commit=lambda: commits.append(t.step)) == trainer.EXIT_EVICTED
    assert t.step == 4 and commits == [] and t.evicted == []
    t.writer.wait()
    assert trainer.checkpoint.read(tmp_path / "run" / "checkpoints" / "step-000000004.ckpt")["step"] == 4
    (event,) = _evict_events(tmp_path)
    assert event["excluded"] == [] and "draining 127.0.0.1 would leave 2 ranks" in event["event"]
    assert not (tmp_path / "run" / trainer.EXCLUDED_HOSTS).exists()


def test_eviction_decisions():
    """eviction.decide on hand-made worlds (FA with f = 1 needs 3 ranks)."""
    from fa_hvd.aggregators import get as get_aggregator
    from fa_hvd.train import eviction

    flag = get_aggregator("flag", f=1)

    def decide(hosts, suspects, earlier=(), elastic=False, launchers=None, f=1):
        world = [_identity(h, r, (launchers or [None] * len(hosts))[r]) for r, h in enumerate(hosts)]
        return eviction.decide([{**world[r], "rank": r} for r in suspects], world, list(earlier), f, flag,
                               elastic, 9, "FILE")

    one_machine = {"hosts": ["box"] * 4, "launchers": ["localhost"] * 3 + ["127.0.0.1"]}
    v = decide(**one_machine, suspects=[3], elastic=True)
    assert (v.hosts, v.stop, v.evicted) == (["127.0.0.1"], False, [{"step": 9, "rank": 3, "host": "127.0.0.1"}])
    v = decide(**one_machine, suspects=[3])  # without elastic: the machine's own name (the run starts again elsewhere)
    assert (v.hosts, v.stop) == (["box"], True) and v.text == "drain box: listed in FILE; start again on 4 ranks without it"
    assert decide(**one_machine, suspects=[3], elastic=True, earlier=[{"step": 5, "rank": 3, "host": "127.0.0.1"}]) \
        is None  # pending: Horovod has not dropped it yet
    v = decide(["a", "a", "b", "b", "b"], [0])  # rank 1, honest, leaves with host a: 3 ranks are left
    assert (v.hosts, v.stop) == (["a"], True) and v.text == "drain a: listed in FILE; start again on 5 ranks without it"
    v = decide(["a", "a", "a", "b", "b"], [0], elastic=True)  # host a holds 3 ranks: 2 would be left
    assert (v.hosts, v.stop) == ([], True) and "would leave 2 ranks" in v.text
    v = decide(["a", "b", "c", "d", "e"], [0, 1], elastic=True)
    assert v.hosts == [] and v.text.startswith("2 ranks crossed robust.evict's threshold at once, more than f = 1")
    v = decide(["a", "b", "c", "d", "e"], [1], elastic=True, earlier=[{"step": 5, "rank": 4, "host": "z"}])
    assert v.hosts == [] and "would make 2 ranks evicted over this run (hosts z already)" in v.text
    v = decide(list("abcdefz"), [6, 1], elastic=True, f=2, earlier=[{"step": 5, "rank": 6, "host": "z"}])
    assert (v.hosts, v.stop, [s["rank"] for s in v.suspects]) == (["b"], False, [1])  # rank 6 on z: pending
    assert "goes on with 5 ranks, f = 2" in v.text  # without b and z; FA needs 5 with f = 2


def _residuals_by_hand(G, c):
    """alignment (cosine with the others' aggregate) and relative distance straight from the rows (the
    definitions, not the Gram identities)."""
    G64, c64 = G.double(), c.double()
    a = c64 @ G64
    others = a - c64[:, None] * G64
    alignment = ((G64 * others).sum(1) / (G64.norm(dim=1) * others.norm(dim=1))).tolist()
    spread = ((G64 - a) ** 2).sum(1)
    return alignment, (spread / spread.median()).tolist()


def _attacked_rows(seed=0, p=8, n=400):
    """Honest rows: a common gradient plus their own noise; row p-2 sends -g (sign flip), row p-1 sits at
    the honest mean (ALIE with z = 0)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    G = g + 0.8 * torch.randn(p, n, generator=gen, dtype=torch.float64)
    G[p - 2] = -G[p - 2]
    G[p - 1] = G[: p - 2].mean(0)
    return G


def test_residuals_from_the_gram_match_the_rows():
    from fa_hvd.aggregators.base import residuals

    G = _attacked_rows()
    for c in (torch.full((8,), 1 / 8, dtype=torch.float64), torch.linspace(0.05, 0.2, 8, dtype=torch.float64)):
        alignment, distance = residuals(G @ G.T, c)
        want_alignment, want_distance = _residuals_by_hand(G, c)
        assert alignment == pytest.approx(want_alignment, rel=1e-9, abs=1e-9)
        assert distance == pytest.approx(want_distance, rel=1e-9, abs=1e-9)
    assert residuals(torch.zeros(3, 3), torch.full((3,), 1 / 3)) == (None, None)  # a = 0: undefined


@pytest.mark.parametrize("rule", ["flag", "multikrum", "geomed"])
def test_rules_report_the_signals_of_the_aggregate_they_return(rule):
    """The diagnostics' weights give the aggregate the rule returned (FA's default mode included,
    clipping and all: a = c^T G), and its alignment and distance are those of these rows; the sign
    flip points against the others, the row at the honest mean sits closest."""
    from fa_hvd.aggregators import get

    G = _attacked_rows(seed=1)
    aggregator = get(rule, f=2)
    a = aggregator(G).double()
    d = aggregator.diagnostics
    c = torch.tensor(d["weights"], dtype=torch.float64)
    assert (c @ G).tolist() == pytest.approx(a.tolist(), rel=1e-6, abs=1e-6)  # the weights give the aggregate
    alignment, distance = _residuals_by_hand(G, c)
    assert d["alignment"] == pytest.approx(alignment, rel=1e-6, abs=1e-6)
    assert d["distance"] == pytest.approx(distance, rel=1e-6, abs=1e-6)
    assert d["alignment"][6] < -0.5 < min(d["alignment"][:6])
    assert d["distance"][7] < min(d["distance"][:6]) / 2


def test_describe_spreads_the_signals_over_the_kept_rows():
    from fa_hvd.aggregators.base import Rows, describe

    G = _attacked_rows(p=4)[[0, 1, 3]]
    c = torch.full((3,), 1 / 3, dtype=torch.float64)
    d = describe(4, Rows(torch.tensor([0, 1, 3]), 1), c, G @ G.T)
    alignment, distance = _residuals_by_hand(G, c)
    assert d["alignment"][2] is None and d["distance"][2] is None and d["nonfinite"] == [2]
    assert [d["alignment"][r] for r in (0, 1, 3)] == pytest.approx(alignment)
    assert [d["distance"][r] for r in (0, 1, 3)] == pytest.approx(distance)
    assert "alignment" not in describe(4, Rows(None, 1), torch.full((4,), 0.25), None)


def _signals(alignment, distance):
    return {**EQUAL, "alignment": alignment, "distance": distance}


def test_a_rank_pulling_against_the_aggregate_is_named_at_its_full_window():
    """Weights say nothing (equal shares); rank 3's mean alignment is -2 over the window, the honest
    ranks' swing between -0.4 and +0.4 step to step and average 0."""
    ledger = trust.TrustLedger(4, trust.Thresholds(window=4, min_alignment=-0.5, min_distance=0.2))
    named = []
    for step in range(1, 9):
        swing = 0.4 if step % 2 else -0.4
        named += ledger.observe(step, _signals([swing, -swing, swing, -2.0], [1.0, 1.2, 0.9, 1.1]))
    assert [(s["rank"], s["step"]) for s in named] == [(3, 4)]
    assert named[0]["window_alignment"] == pytest.approx(-2.0) and "pulls against it" in named[0]["reason"]
    assert ledger.summary()["ranks"][0]["window_alignment"] == pytest.approx(0.0)


def test_a_rank_too_close_to_the_aggregate_is_named_and_missing_figures_are_skipped():
    """Rank 2 sits at the centre (distance 0.05) on the steps that report signals; steps without them
    (None: a dropped row, an undefined step) count for nothing, in either direction."""
    ledger = trust.TrustLedger(4, trust.Thresholds(window=3, min_alignment=-0.5, min_distance=0.2))
    ledger.observe(1, _signals([0.0, 0.0, None, 0.0], [1.0, 1.0, None, 1.0]))
    ledger.observe(2, EQUAL)  # no signals at all
    assert ledger.observe(3, _signals([0.1, 0.0, -0.1, 0.0], [1.2, 0.8, 0.05, 1.5])) == []  # rank 2: one step
    (named,) = ledger.observe(4, _signals([0.1, 0.0, -0.1, 0.0], [1.2, 0.8, 0.05, 1.5]))
    assert named["rank"] == 2 and named["window_distance"] == pytest.approx(0.05)
    assert "closer than honest noise allows" in named["reason"]
    off = trust.TrustLedger(4, trust.Thresholds(window=1, min_alignment=None, min_distance=None, max_distance=None))
    assert off.observe(1, _signals([-2.0] * 4, [0.0] * 4)) == []


def _rows_and_shares(seed=0, p=6, n=50):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(p, n, generator=g, dtype=torch.float64)
    c = torch.rand(p, generator=g, dtype=torch.float64) + 0.1
    return G, c / c.sum()


def test_the_distance_is_to_the_aggregate_of_the_other_ranks():
    """From the rule's distance to its own aggregate ``a = c^T G`` and the shares alone, each row's squared distance to
    the others' combination ``(a - c_i x_i) / (1 - c_i)``, over the median row's: checked against the rows."""
    from fa_hvd.aggregators.base import describe, Rows

    G, c = _rows_and_shares()
    diagnostics = describe(6, Rows(None, 0), c, G @ G.T)
    a = c @ G
    by_hand = torch.stack([((G[i] - (a - c[i] * G[i]) / (1 - c[i])) ** 2).sum() for i in range(6)])
    middle = statistics.median(by_hand.tolist())  # the mean of the middle two
    assert trust.loo_distances(6, diagnostics) == pytest.approx((by_hand / middle).tolist(), rel=1e-9)
    # weights that do not sum to 1 are shares of their sum; a step without weights or distances has none
    scaled = {**diagnostics, "weights": [3 * w for w in diagnostics["weights"]]}
    assert trust.loo_distances(6, scaled) == pytest.approx(trust.loo_distances(6, diagnostics), rel=1e-12)
    assert trust.loo_distances(6, {"weights": diagnostics["weights"]}) is None
    assert trust.loo_distances(6, {"distance": diagnostics["distance"]}) is None


def test_a_row_the_aggregate_sits_on_is_not_too_close():
    """geomed on an honest data row: that row's distance to the aggregate is about 0 and its share about 1; to the
    others' aggregate it sits as far as any honest row, so it is not named too close; a row built at the
    others' centre (share 1/p, ALIE-like) still is."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(5, 40, generator=g, dtype=torch.float64)
    sit = torch.tensor([1e-6, 1e-6, 1e-6, 1e-6, 1 - 4e-6], dtype=torch.float64)  # the aggregate on row 4
    from fa_hvd.aggregators.base import describe, Rows

    diagnostics = describe(5, Rows(None, 0), sit, G @ G.T)
    assert diagnostics["distance"][4] < 1e-9
    loo = trust.loo_distances(5, diagnostics)
    assert min(loo) > 0.2
    ledger = trust.TrustLedger(5, trust.Thresholds(window=2, min_weight=0.0, min_alignment=None, min_distance=0.2,
                                                   max_distance=None))
    assert [ledger.observe(step, diagnostics) for step in (1, 2)] == [[], []]
    centre = torch.cat([G[:4], G[:4].mean(0, keepdim=True)])
    close = describe(5, Rows(None, 0), torch.full((5,), 0.2, dtype=torch.float64), centre @ centre.T)
    assert trust.loo_distances(5, close)[4] < 0.1


def test_a_rank_too_far_from_the_others_is_named():
    """A row farther from the others' aggregate than ``max_distance`` times the median row's, over the window."""
    ledger = trust.TrustLedger(4, trust.Thresholds(window=2, min_alignment=None, min_distance=None, max_distance=3.0))
    assert ledger.observe(1, _signals([0.0] * 4, [0.9, 1.0, 1.0, 5.0])) == []
    (named,) = ledger.observe(2, _signals([0.0] * 4, [0.9, 1.0, 1.0, 2.0]))  # window mean 3.5 (the median row's 1)
    assert named["rank"] == 3 and named["window_distance"] == pytest.approx(3.5)
    assert "farther than honest ranks sit" in named["reason"]
    calm = trust.TrustLedger(4, trust.Thresholds(window=2, min_alignment=None, min_distance=None, max_distance=4.0))
    assert [calm.observe(step, _signals([0.0] * 4, [0.9, 1.0, 1.0, d])) for step, d in ((1, 5.0), (2, 2.0))] == [[], []]


@pytest.mark.parametrize("rule", sorted(trust.DEFAULTS))
def test_by_default_the_distance_names_gross_outliers_only(rule):
    """The relative distance drifts with the run's length (an unusual honest shard's reached 23-71x the median
    rank's by step 300), so the measured rules judge it only past GROSS_DISTANCE: a rank at 80x is not named
    over a 100-step window, one of noise at 10,000x is, and a rank at the median's 0.01x is not named as too
    close (the closest share and the twin gap judge copies)."""
    thresholds = dataclasses.replace(trust.defaults(rule), min_alignment=None, max_closest=None, min_twin=None)
    assert (thresholds.min_distance, thresholds.max_distance) == (None, trust.GROSS_DISTANCE)
    for far, named in ((80.0, False), (1e4, True)):
        ledger = trust.TrustLedger(4, thresholds)
        found = [s for step in range(1, 101) for s in ledger.observe(step, _signals([0.0] * 4, [0.01, 1.0, 1.0, far]))]
        assert [s["rank"] for s in found] == ([3] if named else []), found


def test_the_loss_excess_is_each_ranks_loss_above_the_median_of_the_finite_ones():
    assert trust.loss_excess(4, [1.0, float("nan"), 3.0, 2.5]) == [-1.5, None, 0.5, 0.0]
    assert trust.loss_excess(2, [float("inf"), None]) is None and trust.loss_excess(2, None) is None
    assert trust.loss_excess(3, [1.0, 2.0]) is None  # not one loss per rank


def test_a_rank_whose_loss_stays_above_the_median_is_named_without_weights():
    """A label-flipped rank's batch loss stays above the others' (its data trains another loss): named by the
    window mean of its excess, even where the rule reports no weights (median); a rank a little above the median,
    a non-finite loss and a step without losses are not. (The excess alone: no gate on the ranks' spread.)"""
    ledger = trust.TrustLedger(4, trust.Thresholds(window=3, min_alignment=None, max_distance=None,
                                                   max_loss_excess=0.5, min_loss_z=None))
    bare = {"nonfinite": [], "dropped": []}
    assert ledger.observe(1, bare, [1.0, 1.1, 0.9, 2.0]) == []
    assert ledger.observe(2, bare, None) == []  # no losses: the window's mean is over the steps that had them
    (named,) = ledger.observe(3, bare, [1.0, float("nan"), 1.4, 2.0])
    assert named["rank"] == 3 and named["window_loss_excess"] == pytest.approx((0.95 + 0.6) / 2)
    assert "mean batch loss 0.775 above the median rank's (more than 0.5)" in named["reason"]
    row = ledger.window_table()[2]
    assert row["loss_excess"] == pytest.approx((-0.15 + 0.0) / 2)
    assert ledger.window_table()[1]["loss_excess"] is None  # one finite loss in a window of 3: not judged
    off = trust.TrustLedger(4, trust.Thresholds(window=1, min_alignment=None, max_distance=None, max_loss_excess=None))
    assert off.observe(1, bare, [1.0, 1.0, 1.0, 9.0]) == []


def test_the_loss_spread_is_the_median_absolute_deviation_of_the_finite_losses():
    excess = trust.loss_excess(5, [1.0, float("nan"), 3.0, 2.5, 2.0])  # median 2.25
    assert trust.loss_spread(excess) == [0.5, None, 0.5, 0.5, 0.5]
    assert trust.loss_spread(trust.loss_excess(2, [float("inf"), None])) is None and trust.loss_spread(None) is None


def test_a_loss_excess_that_the_ranks_spread_explains_names_no_one():
    """An attack that slows training lifts every rank's loss and the gaps between them (ALIE): rank 3's excess
    passes the nats threshold but is 2.1 spreads, so it is not named; a label-flipped rank's excess of 35 spreads
    is, and the reason gives both figures. ``min_loss_z`` null judges the nats alone."""
    bare = {"nonfinite": [], "dropped": []}
    lifted = [[3.0, 3.5, 4.0, 5.0], [2.8, 3.6, 4.2, 5.2]]  # medians 3.75, 3.9; spreads 0.5, 0.7; rank 3 +1.25, +1.3
    flipped = [[0.30, 0.35, 0.40, 2.40], [0.28, 0.36, 0.42, 2.60]]  # spreads 0.05, 0.07; rank 3 +2.025, +2.21
    for losses, named in ((lifted, False), (flipped, True)):
        ledger = trust.TrustLedger(4, trust.Thresholds(window=2, min_alignment=None, max_distance=None,
                                                       max_loss_excess=1.0))
        found = [s for step, batch in enumerate(losses, 1) for s in ledger.observe(step, bare, batch)]
        row = ledger.window_table()[3]
        assert row["loss_z"] == pytest.approx(row["loss_excess"] / row["loss_spread"])
        assert row["loss_z"] == pytest.approx(1.275 / 0.6 if not named else 2.1175 / 0.06)
        assert [s["rank"] for s in found] == ([3] if named else [])
        if named:
            assert f"{row['loss_z']:.1f} times the ranks' spread" in found[0]["reason"]
            assert found[0]["window_loss_z"] == row["loss_z"]
        ungated = trust.TrustLedger(4, trust.Thresholds(window=2, min_alignment=None, max_distance=None,
                                                        max_loss_excess=1.0, min_loss_z=None))
        assert [s["rank"] for step, batch in enumerate(losses, 1) for s in ungated.observe(step, bare, batch)] == [3]


def test_the_signals_survive_a_checkpoint_and_an_old_state_still_loads():
    ledger = trust.TrustLedger(4, trust.Thresholds(window=3))
    for step in range(1, 6):
        ledger.observe(step, _signals([0.0, 0.1, -0.1, -1.5 + step / 10], [1.0, 0.9, 1.1, 0.5]))
    again = trust.TrustLedger(4, trust.Thresholds(window=3))
    again.load_state_dict(ledger.state_dict())
    assert again.summary() == ledger.summary() and again.summary()["ranks"][3]["window_alignment"] == pytest.approx(-1.1)
    old = {**ledger.state_dict(), "window": [[w, bad] for w, bad, *_ in ledger.state_dict()["window"]]}
    del old["version"], old["run_signals"]  # what the first ledger saved
    legacy = trust.TrustLedger(4, trust.Thresholds(window=3))
    legacy.load_state_dict(old)
    ranks = legacy.summary()["ranks"]
    assert ranks[3]["window_alignment"] is None and ranks[3]["window_weight"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="trust state version 6"):
        legacy.load_state_dict({**old, "version": 6})
    two = {**ledger.state_dict(), "version": 2, "window": [e[:4] for e in ledger.state_dict()["window"]]}
    before = trust.TrustLedger(4, trust.Thresholds(window=3))  # a version-2 state: no closest share, no twin gap
    before.load_state_dict(two)
    assert before.window_table()[3]["alignment"] == pytest.approx(-1.1)
    assert before.window_table()[3]["closest"] is None and before.window_table()[3]["twin"] is None
    three = {**ledger.state_dict(), "version": 3, "window": [e[:6] for e in ledger.state_dict()["window"]]}
    for step in (6, 7):
        ledger.observe(step, EQUAL, [1.0, 1.0, 1.0, 4.0])
    saved = trust.TrustLedger(4, trust.Thresholds(window=3))
    saved.load_state_dict(ledger.state_dict())
    assert saved.summary() == ledger.summary() and saved.window_table()[3]["loss_excess"] == pytest.approx(3.0)
    before = trust.TrustLedger(4, trust.Thresholds(window=3))  # a version-3 state: no loss excess
    before.load_state_dict(three)
    assert before.window_table()[3]["twin"] is not None and before.window_table()[3]["loss_excess"] is None
    state = ledger.state_dict()
    four = {**state, "version": 4, "window": [e[:7] for e in state["window"]],
            "window_sums": {**state["window_sums"], "signals": {k: v for k, v in state["window_sums"]["signals"].items()
                                                                 if k != "loss_spread"}}}
    before = trust.TrustLedger(4, trust.Thresholds(window=3))  # a version-4 state: no loss spread
    before.load_state_dict(four)
    assert before.window_table()[3]["loss_excess"] == pytest.approx(3.0)
    assert before.window_table()[3]["loss_spread"] is None and before.window_table()[3]["loss_z"] is None
    assert saved.window_table()[3]["loss_spread"] == 0.0 and saved.window_table()[3]["loss_z"] is None  # all equal


def test_a_resumed_ledger_goes_on_with_the_same_bits():
    """The window's sums are kept step by step (values enter and leave); summed again from the entries on a resume
    they would differ in the last bit, and a figure at its threshold would name a rank at another step. The state
    keeps them: after a save at step 20, both ledgers report the same figures, to the bit, at every later step."""
    gen = torch.Generator().manual_seed(0)

    def step_figures():
        values = torch.rand(4, 5, generator=gen, dtype=torch.float64).tolist()
        return {"nonfinite": [], "dropped": [], "weights": values[0], "alignment": [2 * v - 1 for v in values[1]],
                "distance": values[2]}, values[3]

    steps = [step_figures() for _ in range(40)]
    ledger = trust.TrustLedger(5, trust.Thresholds(window=7))
    for step, (diagnostics, losses) in enumerate(steps[:20], 1):
        ledger.observe(step, diagnostics, losses)
    resumed = trust.TrustLedger(5, trust.Thresholds(window=7))
    resumed.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    for step, (diagnostics, losses) in enumerate(steps[20:], 21):
        ledger.observe(step, diagnostics, losses)
        resumed.observe(step, diagnostics, losses)
        assert resumed.window_table() == ledger.window_table(), step
    assert resumed.summary() == ledger.summary()


def test_the_alignment_is_judged_against_the_median_rank():
    """Non-IID: every rank's alignment is low (-0.4 to -0.3): no one is named on that alone; a rank 0.5 below
    the median rank's is, and its evidence gives both figures."""
    ledger = trust.TrustLedger(5, trust.Thresholds(window=2, min_alignment=-0.3, min_distance=None))
    spread = [-0.4, -0.35, -0.3, -0.35, -0.38]
    weights = {"nonfinite": [], "dropped": [], "weights": [0.2] * 5}
    assert [ledger.observe(step, {**weights, "alignment": spread, "distance": [1.0] * 5}) for step in (1, 2)] == [[], []]
    assert ledger.window_table()[0]["alignment_gap"] == pytest.approx(-0.4 - -0.35)
    low = spread[:4] + [-0.9]
    assert ledger.observe(3, {**weights, "alignment": low, "distance": [1.0] * 5}) == []  # window mean -0.64: gap -0.29
    (named,) = ledger.observe(4, {**weights, "alignment": low, "distance": [1.0] * 5})
    assert named["rank"] == 4 and named["window_alignment"] == pytest.approx(-0.9)
    assert named["window_alignment_gap"] == pytest.approx(-0.9 - -0.35)
    assert "0.550 below the median rank's" in named["reason"]
    assert ledger.summary()["ranks"][4]["window_alignment_gap"] == pytest.approx(-0.55)


def test_the_closest_rank_counts_every_tie_and_skips_missing_figures():
    assert trust.closest([1.2, 0.3, 0.9, 0.3 * (1 + 1e-12)]) == [0.0, 1.0, 0.0, 1.0]
    assert trust.closest([1.2, 0.3, 0.9, 0.3 * (1 + 1e-6)]) == [0.0, 1.0, 0.0, 0.0]
    assert trust.closest([None, 0.5, 0.7]) == [None, 1.0, 0.0]
    assert trust.closest(None) is None and trust.closest([None, None]) is None


def test_a_rank_that_is_always_the_closest_is_named_and_a_rotating_one_is_not():
    """ALIE at ``z = 0`` (the honest mean) sits nearer the others' aggregate than any honest row at every step;
    honest rows take turns (batch noise). The share is judged whatever the distances' scale: rank 3's distance
    (0.45 of the median rank's) is not below ``min_distance``."""
    thresholds = trust.Thresholds(window=6, min_alignment=None, min_distance=0.1, max_distance=None, max_closest=0.7)
    ledger = trust.TrustLedger(4, thresholds)
    named = []
    for step in range(1, 13):
        honest = [1.0, 1.5, 2.0]
        if step <= 6:
            honest[step % 3] = 0.4  # the honest ranks take turns as the closest: 2 steps of 6 each
        named += ledger.observe(step, _signals([0.0] * 4, honest + [0.5 if step <= 6 else 0.45]))
    # rank 3 is the closest from step 7 on: 5 of the 6 window steps at step 11
    assert [(s["rank"], s["step"]) for s in named] == [(3, 11)]
    assert named[0]["window_closest"] == pytest.approx(5 / 6) and "honest batch noise" in named[0]["reason"]
    off = trust.TrustLedger(4, trust.Thresholds(window=6, min_alignment=None, min_distance=0.1, max_distance=None))
    assert [off.observe(step, _signals([0.0] * 4, [1.0, 1.5, 2.0, 0.45])) for step in range(1, 13)] == [[]] * 12


def test_identical_rows_are_twins_and_distinct_rows_are_not():
    """Two colluding rows computed from the same statistics are the same row: the rule gives them the same
    distance and alignment at every step (gap 0); honest rows with their own batch noise keep apart."""
    from fa_hvd.aggregators.base import describe, Rows

    g = torch.Generator().manual_seed(3)
    thresholds = trust.Thresholds(window=3, min_alignment=None, min_distance=None, max_distance=None, min_twin=0.01)
    ledger = trust.TrustLedger(6, thresholds)
    named = []
    for step in range(1, 5):
        G = torch.randn(6, 30, generator=g, dtype=torch.float64)
        G[5] = G[4] = G[:4].mean(0) - 0.3 * G[:4].std(0)  # ALIE's mu - z sigma, sent by ranks 4 and 5
        diagnostics = describe(6, Rows(None, 0), torch.full((6,), 1 / 6, dtype=torch.float64), G @ G.T)
        gaps = trust.twins(6, diagnostics)
        assert max(gaps[4:]) < 1e-9 and min(gaps[:4]) > 0.01
        named += ledger.observe(step, diagnostics)
    assert sorted((s["rank"], s["step"]) for s in named) == [(4, 3), (5, 3)]
    assert named[0]["window_twin"] < 1e-9 and "a copy of another rank's row" in named[0]["reason"]
    assert trust.twins(3, {"distance": [1.0, 0.5, 0.7], "alignment": [0.1, None, 0.3]}) == [pytest.approx(0.5), None,
                                                                                           pytest.approx(0.5)]
    assert trust.twins(3, {"distance": [1.0, 0.5, 0.7]}) is None


def _swept_cell(fault, byzantine, records, seed=0, p=2):
    from fa_hvd.eval import suspects

    full = {key: [[] for _ in range(p)] for key in suspects.FIGURES}
    for key, ranks in records.items():
        full[key] = ranks
    return {"p": p, "rule": "flag", "split": "iid", "f": len(byzantine), "fault": fault, "seed": seed,
            "window": 100, "byzantine": byzantine, "records": full}


def _simulated(tmp_path, rule: str, p: int, f: int, fault: list, steps: int) -> dict:
    """One cell of the sweep (:func:`fa_hvd.eval.suspects.run_cell`): digits, an MLP, ``p`` simulated ranks
    (the last ``f`` faulty), IID shards, seed 0, recorded over 100-step windows."""
    import yaml

    from fa_hvd.eval import suspects
    from fa_hvd.eval.grid import load_grid

    grid = {"trainer": {"data": {"name": "digits"}, "model": {"name": "mlp"},
                        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                        "train": {"steps": steps, "batch_size": 32}},
            "seeds": [0], "splits": {"iid": None}, "workers": [[p, f]], "rules": {rule: rule},
            "faults": {fault[0]["kind"]: fault}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    (cell,) = load_grid(tmp_path / "grid.yaml").cells
    return suspects.run_cell(cell, window=trust.CALIBRATION_WINDOW)


@pytest.mark.parametrize("rule", ["flag", "median"])
def test_a_label_flipped_rank_is_named_by_its_loss_and_no_honest_rank_is(tmp_path, rule):
    """The loss excess on the fault it is for: digits, an MLP, 4 simulated ranks, rank 3 training on flipped labels
    (its gradients honest gradients of another loss) for 150 steps. Its window loss excess passes the rule's measured
    max_loss_excess (FA's; the median's is the unmeasured rules') and the honest ranks' stays below it; the median
    reports no weights, so the loss is all it has."""
    from fa_hvd.eval import suspects

    record = _simulated(tmp_path, rule, 4, 1, [{"kind": "labelflip", "params": {"num_classes": 10}}], 150)
    threshold = trust.defaults(rule).max_loss_excess
    assert record["byzantine"] == [3] and suspects.extreme(record, 3, "loss_excess") > 2 * threshold
    assert all(suspects.extreme(record, r, "loss_excess") < threshold / 2 for r in range(3))
    loss_only = trust.Thresholds(min_alignment=None, max_distance=None, max_loss_excess=threshold)
    assert suspects.named_at(record, 3, loss_only) == trust.CALIBRATION_WINDOW  # at the first full window
    assert suspects.extreme(record, 3, "loss_z") > 2 * trust.LOSS_Z  # through the gate by far
    assert all(suspects.extreme(record, r, "loss_z") < trust.LOSS_Z for r in range(3))
    assert [suspects.named_at(record, r, trust.defaults(rule)) for r in range(3)] == [None] * 3


def test_a_sign_flipped_rank_among_iid_shards_is_named_by_the_iid_defaults(tmp_path):
    """8 simulated ranks under FA, rank 7 sending minus its gradient, IID shards, 110 steps. FA keeps the row inside
    the honest spread, and its alignment gap (about -0.5) is one an unusual Dirichlet(0.5) shard can reach (FA's
    any-split min_alignment is -0.56); IID honest ranks stay far above it, so FA's IID defaults name it at the first
    full window, and no honest rank."""
    from fa_hvd.eval import suspects

    record = _simulated(tmp_path, "flag", 8, 1, [{"kind": "signflip"}], 110)
    iid = trust.defaults("flag", iid=True)
    assert suspects.cell_defaults(record) == iid
    assert record["byzantine"] == [7] and suspects.extreme(record, 7, "alignment_gap") < 1.5 * iid.min_alignment
    assert all(suspects.extreme(record, r, "alignment_gap") > iid.min_alignment / 2 for r in range(7))
    assert suspects.named_at(record, 7, iid) == trust.CALIBRATION_WINDOW
    assert [suspects.named_at(record, r, iid) for r in range(7)] == [None] * 7


def test_the_sweep_records_each_new_extreme_and_names_at_the_first_crossing():
    """fa_hvd.eval.suspects: the recorder keeps a figure's running minimum (the non-finite fraction's maximum)
    from the first full window on, and named_at finds the step at which any threshold was first crossed."""
    from fa_hvd.eval import suspects

    recorder = suspects._Recorder(2, window=2)
    steps = [(0.1, 0.1, [], 0.4), (0.1, -0.5, [], 1.0), (0.1, -0.9, [1], 0.6), (0.1, 0.1, [1], 2.0)]
    for step, (a0, a1, bad, loss1) in enumerate(steps, 1):
        recorder(step, {"nonfinite": bad, "dropped": bad, "weights": [0.5, 0.5] if not bad else [1.0, 0.0],
                        "alignment": [a0, a1 if not bad else None], "distance": [1.0, 1.0 if not bad else None]},
                 [0.2, loss1])
    records = recorder.records
    # the loss excess against the median of two (their mean): half the gap (0.1, 0.4, 0.2, 0.9), its window
    # mean's running maximum
    assert records["loss_excess"][1] == [[2, pytest.approx(0.25)], [3, pytest.approx(0.3)], [4, pytest.approx(0.55)]]
    # rank 1 reports no alignment at steps 3 and 4: judged on one step of two at 3, not at all at 4
    assert records["alignment"][1] == [[2, pytest.approx(-0.2)], [3, pytest.approx(-0.5)]]
    assert records["alignment_gap"][1] == [[2, pytest.approx(-0.15)], [3, pytest.approx(-0.3)]]  # against the median
    assert records["weight"][1] == [[2, 1.0], [3, 0.5], [4, 0.0]] and records["weight"][0] == [[2, 1.0]]
    assert records["nonfinite"][1] == [[2, 0.0], [3, 0.5], [4, 1.0]]
    cell = _swept_cell("signflip", [1], records)
    defaults = trust.Thresholds()
    assert suspects.named_at(cell, 1, trust.Thresholds(min_weight=0.6, min_alignment=None, min_distance=None)) == 3
    assert suspects.named_at(cell, 1, trust.Thresholds(min_weight=0.0, max_nonfinite=0.6, min_alignment=-0.6)) == 4
    assert suspects.named_at(cell, 1, trust.Thresholds(min_weight=0.0, min_alignment=-0.1, max_nonfinite=0.9)) == 2
    assert suspects.named_at(cell, 0, defaults) is None


def test_the_sweep_counts_false_positives_and_detection_per_rule(monkeypatch):
    """At each rule's own defaults: held-out no-attack cells (seed >= 100, the grid's splits) count for the false
    positives, per cell and per honest rank-cell, another split's as the stress row; attacked cells count
    as detected only when every Byzantine rank is named, at the last one's step."""
    from fa_hvd.eval import suspects

    for table in (trust.DEFAULTS, trust.IID_DEFAULTS):  # the cells are IID, the stress one Dirichlet(0.1)
        monkeypatch.setitem(table, "flag", trust.Thresholds(min_weight=0.2, min_alignment=-0.3, min_distance=0.15))
        monkeypatch.setitem(table, "geomed", trust.Thresholds(min_weight=0.2, min_alignment=-0.4, min_distance=0.15))
    gap = lambda *values: {"alignment_gap": [[[150, v]] if v is not None else [] for v in values]}  # noqa: E731
    clean = [_swept_cell("none", [], gap(-0.1, -0.2, -0.1), seed=100, p=3),
             _swept_cell("none", [], gap(-0.35, -0.1, -0.31), seed=101, p=3),
             _swept_cell("none", [], gap(-0.9, -0.9, -0.9), seed=0, p=3)]  # calibration: not counted
    stress = {**_swept_cell("none", [], gap(-0.5, -0.1, -0.1), seed=100, p=3), "split": "dirichlet0.1"}
    attacked = [_swept_cell("signflip", [1, 2], gap(-0.1, -0.5, -0.4), p=3),
                _swept_cell("signflip", [1, 2], gap(-0.1, -0.5, -0.2), p=3)]
    assert [suspects.group(c) for c in (*clean, stress, attacked[0])] == \
        ["held-out", "held-out", "calibration", "stress", "attacked"]
    assert suspects.false_positives(clean[:2]) == (1, 2, 2, 6)
    assert suspects.detection(attacked) == (1, 2, [150])
    rows = suspects.rates(clean + [stress] + attacked).splitlines()
    assert rows[2] == ("| flag | 1/2 (50.0 %, <= 97.5 %) | 2/6 (33.3 %, <= 72.9 %) | 1/2 (50.0 %) | 150 / 150 | 0/2 "
                       "| 1/1 (100.0 %, <= 100.0 %) |")
    # the same cells under geomed, whose alignment threshold is lower: one fewer honest rank, one fewer detection
    geomed = [{**c, "rule": "geomed"} for c in clean[:2] + attacked]
    assert suspects.false_positives(geomed[:2]) == (0, 2, 0, 6)
    assert suspects.detection(geomed[2:]) == (0, 2, [])


def test_the_best_possible_thresholds_give_up_the_held_out_cell_that_costs_the_most_detection():
    """best_possible: each threshold at the honest extreme of the held-out cells kept; giving up one cell (its
    honest rank at -0.5) moves the alignment threshold to -0.2 and detects the attack at -0.3 as well. A figure
    no honest rank reported (the weight here) is not judged."""
    from fa_hvd.eval import suspects

    gap = lambda *values: {"alignment_gap": [[[150, v]] for v in values]}  # noqa: E731
    held_out = [{**_swept_cell("none", [], gap(-0.1, -0.2, -0.05), seed=100 + i, p=3), "key": f"clean{i}"}
                for i in range(2)]
    held_out.insert(1, {**_swept_cell("none", [], gap(-0.5, -0.1, -0.05), seed=110, p=3), "key": "odd"})
    attacked = [{**_swept_cell("signflip", [2], gap(-0.1, -0.05, value), p=3), "key": key}
                for key, value in (("mild", -0.3), ("strong", -0.6))]
    calibration = {**_swept_cell("none", [], gap(-0.9, -0.9, -0.9), seed=0, p=3), "key": "calibration"}
    cells = [*held_out, *attacked, calibration]  # a calibration cell's honest ranks play no part
    hit, n, false, thresholds, missed = suspects.best_possible(cells, allowed=0)
    assert (hit, n, false, thresholds.min_alignment, missed) == (1, 2, 0, -0.5, ["mild"])
    hit, n, false, thresholds, missed = suspects.best_possible(cells, allowed=1)
    assert (hit, n, false, thresholds.min_alignment, missed) == (2, 2, 1, -0.2, [])
    assert thresholds.min_weight is None and thresholds.max_distance is None
    with pytest.raises(ValueError, match="allowed"):
        suspects.best_possible(cells, allowed=2)
    row = suspects.best_possible_table(cells).splitlines()[2]  # 3 held-out cells: 1 % of them is none
    assert row.startswith("| flag | 0 | 1/2 (50.0 %) (") and row.endswith("| 0 | min_alignment -0.500 | mild |")


def test_upper_bound_is_the_exact_one_sided_binomial_bound():
    from fa_hvd.eval.suspects import upper_bound

    assert upper_bound(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300), rel=1e-9)  # about 3/300: the rule of three
    assert upper_bound(0, 300) == pytest.approx(0.01, rel=0.01)
    assert upper_bound(1, 10) == pytest.approx(0.3942, abs=1e-4)  # (1 - u)^10 + 10 u (1 - u)^9 = 0.05
    assert upper_bound(3, 3) == 1.0 and upper_bound(0, 0) == 1.0


def test_thresholds_are_calibrated_beyond_the_honest_ranks_extremes():
    """The lowest honest weight and distance divided by the margin, the lowest alignment gap and the highest loss
    excess times it; the Byzantine rank's figures play no part."""
    from fa_hvd.eval import suspects

    records = {"weight": [[[100, 0.9], [120, 0.6]], [[100, 0.01]], [[100, 0.8]]],
               "alignment_gap": [[[100, -0.1]], [[100, -2.0]], [[100, -0.2]]],
               "distance": [[[100, 0.9]], [[100, 0.001]], [[100, 0.44]]],
               "distance_far": [[[100, 1.1], [130, 2.41]], [[100, 900.0]], [[100, 1.3]]],
               "closest": [[[100, 0.2], [110, 0.41]], [[100, 1.0]], [[100, 0.3]]],
               "twin": [[[100, 0.5], [140, 0.3]], [[100, 0.0]], [[100, 0.4]]],
               "loss_excess": [[[100, 0.1], [150, 0.31]], [[100, 5.0]], [[100, 0.2]]]}
    cells = [_swept_cell("none", [1], records, p=3)]
    out = suspects.calibrate(cells, margin=1.5)
    assert out["min_weight"] == pytest.approx((0.6, 0.4))
    assert out["min_alignment"] == pytest.approx((-0.2, -0.3))
    assert out["min_distance"] == pytest.approx((0.44, 0.29))  # 0.2933 rounded outward (down)
    assert out["max_distance"] == pytest.approx((2.41, 3.62))  # 3.615 rounded outward (up)
    assert out["max_closest"] == pytest.approx((0.41, 0.61))  # 1 - 0.59 / 1.5 = 0.6067 rounded outward (up)
    assert out["min_twin"] == pytest.approx((0.3, 0.2))
    assert out["max_loss_excess"] == pytest.approx((0.31, 0.47))  # 0.465 rounded outward (up)
    assert "max_nonfinite" not in out
    records["closest"][2] = [[100, 1.0]]  # an honest rank closest at every step: the share names no one
    assert suspects.calibrate(cells, margin=1.5)["max_closest"] == (1.0, None)


def test_each_threshold_defaults_to_the_rules_own_and_a_set_one_wins(monkeypatch):
    """log.suspects: a threshold left at ``rule`` takes the measured default of robust.aggregator (trust.DEFAULTS);
    a number or null set in the config wins; a rule never measured gets Thresholds()' values."""
    measured = trust.Thresholds(min_weight=0.4, min_alignment=-0.5, min_distance=0.1, max_distance=6.0)
    monkeypatch.setitem(trust.DEFAULTS, "flag", measured)
    conf, _ = train_config.parse({"log": {"suspects": {"window": 200, "min_distance": None, "max_distance": "rule"}}})
    assert conf.log.suspects.thresholds("flag") == trust.Thresholds(200, 0.4, 0.5, -0.5, None, 6.0)
    assert conf.log.suspects.thresholds("median") == trust.Thresholds(window=200, min_distance=None)
    with pytest.raises(train_config.cfg.ConfigError, match="log.suspects.max_distance"):
        train_config.parse({"log": {"suspects": {"max_distance": "auto"}}})
    # every threshold of trust.Thresholds is a config key: the closest share and the twin gap as well
    conf, _ = train_config.parse({"log": {"suspects": {"max_closest": None, "min_twin": 0.05}}})
    chosen = conf.log.suspects.thresholds("geomed")
    assert (chosen.max_closest, chosen.min_twin, chosen.min_weight) == (None, 0.05, trust.DEFAULTS["geomed"].min_weight)
    assert train_config.parse({})[0].log.suspects.thresholds("flag") == trust.DEFAULTS["flag"]
    with pytest.raises(train_config.cfg.ConfigError, match="log.suspects.max_closest"):
        train_config.parse({"log": {"suspects": {"max_closest": 1.0}}})


def test_iid_defaults_are_measured_per_rule_and_never_looser_than_those_for_any_split():
    """trust.defaults(rule, iid=True) is the rule's IID_DEFAULTS (the same procedure on IID shards alone), over
    short windows without the window signals; each IID threshold names at least what the any-split one names;
    a rule never measured gets Thresholds()' values for IID shards too."""
    assert set(trust.IID_DEFAULTS) == set(trust.DEFAULTS)
    for rule, iid in trust.IID_DEFAULTS.items():
        assert trust.defaults(rule, iid=True) == iid
        loose = trust.DEFAULTS[rule]
        assert iid.min_weight >= loose.min_weight and iid.min_alignment >= loose.min_alignment
        assert iid.max_closest <= loose.max_closest and iid.max_loss_excess <= loose.max_loss_excess
        assert (iid.max_distance, iid.min_twin, iid.min_distance) == (loose.max_distance, loose.min_twin, None)
        assert all(getattr(trust.defaults(rule, 20, iid=True), name) is None for name in trust.WINDOW_SIGNALS)
    assert trust.defaults("median", iid=True) == trust.Thresholds()
    conf, _ = train_config.parse({"log": {"suspects": {"min_alignment": -0.5}}})
    assert conf.log.suspects.thresholds("flag", iid=True) == dataclasses.replace(trust.IID_DEFAULTS["flag"],
                                                                                min_alignment=-0.5)


def test_an_unmeasured_rules_thresholds_are_the_loosest_of_the_measured_rules():
    """Thresholds()' own values, for a rule that was not measured, are each the loosest of trust.DEFAULTS':
    the lowest weight and alignment gap, the highest non-finite fraction, distance and loss excess."""
    loose, measured = trust.Thresholds(), trust.DEFAULTS.values()
    assert loose.min_weight == min(t.min_weight for t in measured)
    assert loose.min_alignment == min(t.min_alignment for t in measured)
    assert loose.max_nonfinite == max(t.max_nonfinite for t in measured)
    assert loose.max_distance == max(t.max_distance for t in measured)
    assert loose.max_loss_excess == max(t.max_loss_excess for t in measured)
    assert (loose.min_distance, loose.max_closest, loose.min_twin) == (None, None, None)


def test_below_the_calibration_window_the_measured_defaults_judge_only_weight_and_non_finite():
    """The window signals' defaults were measured on 100-step windows: over fewer steps a rule's defaults judge
    the weight and the non-finite rows only (an honest rank can be the closest at all of 5 steps), a number set
    in the config is still judged, and robust.evict's shorter window gets the same treatment."""
    short = trust.defaults("flag", 20)
    assert (short.window, short.min_weight, short.max_nonfinite) == (20, trust.DEFAULTS["flag"].min_weight,
                                                                      trust.DEFAULTS["flag"].max_nonfinite)
    assert all(getattr(short, name) is None for name in trust.WINDOW_SIGNALS)
    assert trust.defaults("flag", trust.CALIBRATION_WINDOW) == trust.DEFAULTS["flag"]
    conf, _ = train_config.parse({"log": {"suspects": {"window": 20, "max_distance": 9.0}},
                                  "robust": {"aggregator": "flag", "aggregator_params": {"f": 1},
                                             "evict": {"window": 5, "threshold": 0.2}}})
    chosen = conf.log.suspects.thresholds("flag")
    assert (chosen.max_distance, chosen.max_closest, chosen.min_distance) == (9.0, None, None)
    assert conf.log.suspects.thresholds("flag", window=300).max_closest == trust.DEFAULTS["flag"].max_closest
    # an honest rank the closest at every step of a 5-step window: named by the measured max_closest, not here
    ledger = trust.TrustLedger(3, trust.defaults("flag", 5))
    for step in range(5):
        assert ledger.observe(step, {"weights": [0.34, 0.33, 0.33], "distance": [0.5, 1.0, 1.5],
                                     "alignment": [0.9, 0.9, 0.9]}) == []
    strict = trust.TrustLedger(3, dataclasses.replace(trust.DEFAULTS["flag"], window=5))
    named = [s for step in range(5) for s in strict.observe(step, {"weights": [0.34, 0.33, 0.33],
                                                                   "distance": [0.5, 1.0, 1.5],
                                                                   "alignment": [0.9, 0.9, 0.9]})]
    assert [s["rank"] for s in named] == [0]


@pytest.mark.parametrize("rule", ["flag", "geomed", "multikrum"])
def test_the_default_twin_gap_names_copies_and_no_honest_rank_of_concentrated_rows(rule):
    """IID honest rows in 2,000 dimensions sit at nearly the same relative distance and alignment (their
    per-step gaps are 0.001-0.05), and two ALIE copies at exactly the same place: the default min_twin
    (trust.TWIN_GAP, the same row to rounding) names the copies alone, where the 0.12 measured on the grid's
    digits MLP names honest ranks too."""
    from fa_hvd.aggregators import get

    def ledger(min_twin):
        return trust.TrustLedger(7, trust.Thresholds(window=5, min_weight=0.0, min_alignment=None, min_distance=None,
                                                     max_distance=None, max_closest=None, min_twin=min_twin))

    books = {"default": ledger(trust.DEFAULTS[rule].min_twin), "measured": ledger(0.12)}
    named = {key: set() for key in books}
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        G = torch.randn(2000, generator=gen) + 0.5 * torch.randn(7, 2000, generator=gen)
        G[5] = G[:5].mean(0) - 0.3 * G[:5].std(0)
        G[6] = G[5]
        aggregator = get(rule, f=2)
        aggregator(G)
        for key, book in books.items():
            named[key] |= {s["rank"] for s in book.observe(step, aggregator.diagnostics)}
    assert named["default"] == {5, 6}
    assert named["measured"] - {5, 6}, "the measured threshold should name honest ranks here"
