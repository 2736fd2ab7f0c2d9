"""The threat model, row by row (README "Threat model"): each test injects exactly one lie in one role
and shows the claimed outcome: tolerated (the aggregate the rule gives without the liar's influence),
detected (the named error on every rank, naming the liar) or trusted (documented, shown to pass)."""

from __future__ import annotations

import pytest
import torch

import local_world
from fa_hvd.aggregators import get
from fa_hvd.comm import NoCompression
from fa_hvd.comm.messages import MessageError
from fa_hvd.exchange import AllgatherExchange, ShardedExchange, ShardMismatch
from fa_hvd.exchange.digest import Divergence
from fa_hvd.faults import FaultInjector, parse_faults
from fa_hvd.train import control
from local_world import LocalTransport, run_ranks

P, F = 4, 1
SIZES = [50, 40]


def rows(p=P, n=sum(SIZES), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) + 0.5 * torch.randn(p, n, generator=gen)


def lies(rank, entries, p=P, f=F):
    """What ``entries`` (fault specs) make rank ``rank`` say, or None."""
    return FaultInjector(parse_faults(entries, p, f=f), rank, p).roles or None


def step(exchange, row, sizes=SIZES):
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for bucket in reversed(range(len(sizes))):
        exchange.start(bucket, row[offsets[bucket] : offsets[bucket] + sizes[bucket]].clone())
    return exchange.finish(len(sizes), row.device, 0)


def exchange_with(entries, rule="geomed", replicas=1, p=P, exchange=ShardedExchange, G=None, digest=False):
    """One step on ``p`` ranks; per rank: (aggregate, diagnostics, error text)."""
    G = rows(p) if G is None else G

    def body(t):
        if exchange is ShardedExchange:
            ex = ShardedExchange(t, get(rule, f=F), prefix="trust", replicas=replicas, lies=lies(t.rank, entries, p),
                                 digest=digest)
        else:
            ex = exchange(t, get(rule, f=F), NoCompression, "trust", digest=digest)
        try:
            return step(ex, G[t.rank]), ex.aggregator.diagnostics, None
        except (ShardMismatch, Divergence) as exc:
            return None, None, str(exc)

    return run_ranks(p, body)


def honest(rule="geomed", p=P):
    return get(rule, f=F)(rows(p))


def all_fail(results, needle):
    errors = [error for _, _, error in results]
    assert all(error is not None and needle in error for error in errors), errors


# -- sharded, unreplicated: the owner's flags and partial Gram ------------------------------------------------

def test_false_flags_on_more_than_f_rows_stop_the_step_naming_the_owner():
    """The issue's case: rank 3 flags rows 0-2 of its shard (before: every aggregate became rank 3's row)."""
    all_fail(exchange_with([{"kind": "false_flags", "ranks": [3]}]), "rank(s) [3] lied about their shard")


def test_a_false_flag_on_one_row_costs_the_liar_its_own_row_too():
    """One disputed row: both rows of the dispute go and f drops by one; the rule runs on the rest."""
    results = exchange_with([{"kind": "false_flags", "ranks": [3], "params": {"rows": [0]}}])
    expected = get("geomed", f=0)(rows()[[1, 2]])
    for out, diagnostics, error in results:
        assert error is None and torch.allclose(out, expected, atol=1e-5)
        assert diagnostics["disputes"] == [[0, 3]] and diagnostics["nonfinite"] == [0, 3]


@pytest.mark.parametrize("entry,needle", [
    ({"kind": "gram_scale", "ranks": [1]}, "rank(s) [1] lied about their shard"),
    ({"kind": "gram_perturb", "ranks": [1]}, "not positive semidefinite"),
    ({"kind": "false_claims", "ranks": [2]}, "rank(s) [2] lied about their shard"),
])
def test_a_partial_gram_or_a_claim_that_contradicts_the_senders_stops_the_step_naming_the_liar(entry, needle):
    results = exchange_with([entry])
    all_fail(results, needle)
    all_fail(results, f"rank {entry['ranks'][0]}:")


def test_a_real_non_finite_row_is_dropped_on_its_senders_word_without_a_dispute():
    G = rows()
    G[2, 70] = float("nan")  # in shard 3 (chunks of 10 in the second bucket): only rank 3 sees it
    for out, diagnostics, error in exchange_with([], G=G):
        assert error is None and diagnostics["nonfinite"] == [2] and "disputes" not in diagnostics
        assert torch.allclose(out, get("geomed", f=0)(G[[0, 1, 3]]), atol=1e-5)


def test_trusted_unreplicated_a_wrong_shard_of_the_aggregate_reaches_every_rank_alike():
    """Documented trust: one copy of each shard, nothing to compare it with (replicas buy it back)."""
    results = exchange_with([{"kind": "wrong_aggregate", "ranks": [1]}])
    outs = [out for out, _, _ in results]
    assert all(torch.equal(o, outs[0]) for o in outs) and not torch.allclose(outs[0], honest(), atol=1e-3)


# -- sharded, replicated ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["false_flags", "gram_scale", "gram_perturb", "wrong_aggregate", "equivocate"])
def test_with_2f_plus_1_replicas_a_lying_holder_is_outvoted(kind):
    results = exchange_with([{"kind": kind, "ranks": [1]}], replicas=3)
    plain = exchange_with([], replicas=3)[0][0]
    for out, diagnostics, error in results:
        assert error is None and torch.equal(out, plain)
        named = {r for shards in diagnostics["repaired"].values() for odd in shards.values() for r in odd}
        assert named == ({3} if kind == "equivocate" else {1})  # an equivocation shows at its victim


@pytest.mark.parametrize("kind,needle", [("gram_scale", "disagree and no one copy is held by more than f=1"),
                                         ("equivocate", "received different data from rank 1")])
def test_with_f_plus_1_replicas_a_lie_is_detected(kind, needle):
    all_fail(exchange_with([{"kind": kind, "ranks": [1]}], replicas=2), needle)


# -- relaying: a block altered in transit ------------------------------------------------------------

class Relaying(LocalTransport):
    """Rank 1 relays rank 0's block to rank 2 (as a ring allgather does) and alters it on the way."""

    def allgather_async(self, tensor, name):
        handle = super().allgather_async(tensor, name)
        if self.rank == 2 and tensor.is_floating_point() and tensor.shape[0] == 1:
            result = handle.result
            handle.result = lambda everyone: torch.cat([result(everyone)[:1] * 1.5, result(everyone)[1:]])
        return handle


@pytest.mark.parametrize("exchange", [AllgatherExchange, ShardedExchange])
def test_an_altered_relayed_block_stops_the_step_it_happened_in(monkeypatch, exchange):
    monkeypatch.setattr(local_world, "LocalTransport", Relaying)
    all_fail(exchange_with([], rule="median", exchange=exchange, digest=True), "ranks [2] differ from the largest group")
    for out, _, error in exchange_with([], rule="median", exchange=exchange):  # without the digest: silent drift
        assert error is None


# -- the control vector ------------------------------------------------------------------------------

def agree_with(entries, losses=(1.0, 1.2, 0.9, 1.1), overflowed=(False,) * P, nonfinite=()):
    def body(t):
        return control.agree(t, losses[t.rank], stop=False, checkpoint_due=False, faulty=False,
                             overflowed=overflowed[t.rank], nonfinite_rows=nonfinite, lies=lies(t.rank, entries))
    return run_ranks(P, body)


def test_a_lying_loss_moves_the_logged_median_no_further_than_the_honest_spread():
    for agreed in agree_with([{"kind": "lie_loss", "ranks": [3]}]):
        assert 1.0 <= agreed.loss <= 1.2


def test_a_claimed_overflow_counts_only_with_a_non_finite_row():
    for agreed in agree_with([{"kind": "lie_overflow", "ranks": [3]}]):
        assert agreed.overflowed_ranks == 0
    for agreed in agree_with([], overflowed=(False, True, False, True), nonfinite=[1]):
        assert agreed.overflowed_ranks == 1  # rank 1 overflowed (its row non-finite); rank 3 only says so


def test_trusted_a_stop_request_from_any_rank_stops_every_rank():
    """Documented: preemption may signal one task only, so one rank's stop is everyone's (with a checkpoint)."""
    assert all(agreed.stop for agreed in agree_with([{"kind": "lie_stop", "ranks": [2]}]))


# -- object messages ---------------------------------------------------------------------------------

def test_a_malformed_object_message_is_refused_naming_its_sender_and_runs_nothing(capsys):
    def body(t):
        t.lies = lies(t.rank, [{"kind": "malformed_message", "ranks": [2]}])
        try:
            t.allgather_json(None, "fa_hvd.train.errors", schema=object)
        except MessageError as exc:
            return str(exc)

    errors = run_ranks(P, body)
    assert all("rank 2 sent a malformed fa_hvd.train.errors message" in e for e in errors), errors
    assert "code of another rank ran" not in capsys.readouterr().out


# -- in training: the demo's shape (4 ranks, FA with f = 1, rank 3 Byzantine) --------------------------------

def demo_run(tmp_path, faults, steps=3, **robust):
    """The demo's training (digits, FA f=1 r=2, rank 3 sends -100 g) on 4 in-process ranks; per rank:
    (parameters after ``steps`` steps, None) or (None, the error)."""
    from test_train import _trainer

    start = {}  # the initial parameters, drawn once here: in-process ranks share torch's global generator

    def body(t):
        trainer = _trainer(tmp_path / f"{len(faults)}-{robust.get('replicas', 1)}-{t.rank}", transport=t,
                           robust={"aggregator": "flag", "aggregator_params": {"f": 1, "r": 2}, **robust},
                           faults=[{"kind": "reverse", "ranks": [3]}, *faults], train={"steps": steps})
        trainer.model.load_state_dict(start)
        try:
            for _ in range(steps):
                trainer.train_step()
        except ShardMismatch as exc:
            return None, str(exc)
        return torch.cat([q.detach().reshape(-1) for q in trainer.model.parameters()]), None

    gen = torch.Generator().manual_seed(0)
    shapes = {"1.weight": (16, 64), "1.bias": (16,), "3.weight": (10, 16), "3.bias": (10,)}  # the mlp, hidden 16
    start.update({name: 0.1 * torch.randn(shape, generator=gen) for name, shape in shapes.items()})
    return run_ranks(P, body)


@pytest.mark.parametrize("kind", ["false_flags", "gram_scale"])
def test_training_stops_at_the_first_lie_naming_the_liar(tmp_path, kind):
    for params, error in demo_run(tmp_path, [{"kind": kind, "ranks": [3]}], exchange="sharded"):
        assert params is None and "rank(s) [3] lied about their shard" in error


def test_training_with_three_replicas_repairs_a_lying_holder(tmp_path):
    plain = demo_run(tmp_path, [], exchange="sharded", replicas=3)
    lied = demo_run(tmp_path, [{"kind": "wrong_aggregate", "ranks": [3]}], exchange="sharded", replicas=3)
    for (ours, _), (theirs, error) in zip(plain, lied):
        assert error is None and torch.equal(ours, theirs)


def test_a_config_with_too_few_replicas_for_f_is_refused_naming_the_key():
    from fa_hvd.config import ConfigError
    from fa_hvd.train import config as train_config

    with pytest.raises(ConfigError, match=r"robust.replicas: 2 cannot keep the promise for f=2.*>= 3 \(detect\) or "
                                          r">= 5 \(repair\)"):
        train_config.parse({"robust": {"aggregator": "krum", "aggregator_params": {"f": 2}, "exchange": "sharded",
                                       "replicas": 2}}, [])


def test_the_grid_selects_role_faults_and_the_simulation_sends_them_to_the_distributed_engine(tmp_path):
    """A grid cell may list a role fault (the distributed engine runs fa-hvd-train, which tells the lie);
    the simulation has no exchange to lie in and says so instead of ignoring it."""
    from fa_hvd.eval.grid import load_grid
    from fa_hvd.eval.simulate import simulate
    from test_eval import write_grid

    grid = load_grid(write_grid(tmp_path, trainer={"train": {"steps": 2}},
                                faults={"loss": [{"kind": "lie_loss"}]}))
    cell = next(c for c in grid.cells if "loss" in c.key)
    assert cell.run_config()["faults"][0]["kind"] == "lie_loss"
    with pytest.raises(ValueError, match="role faults \\(lie_loss\\)"):
        simulate(cell)


def test_the_optimizer_and_the_trainer_config_turn_the_digest_on(monkeypatch):
    import fa_hvd
    from fa_hvd.train import config as train_config

    monkeypatch.setattr(local_world, "LocalTransport", Relaying)

    def body(t):
        weight = torch.nn.Parameter(torch.ones(5))
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD([weight], lr=0.1), aggregator="mean", transport=t,
                                          digest=True)
        (weight * (t.rank + 1)).sum().backward()
        try:
            opt.step()
        except Divergence as exc:
            return str(exc)

    assert all("ranks [2] differ" in error for error in run_ranks(P, body))
    assert train_config.parse({"robust": {"digest": True}}, [])[0].robust.digest is True


def test_a_sharded_role_fault_without_the_sharded_exchange_is_refused_naming_the_entry():
    from fa_hvd.config import ConfigError
    from fa_hvd.train import config as train_config

    with pytest.raises(ConfigError, match=r"faults\[0\] \(kind 'gram_scale'\): .*set robust.exchange sharded"):
        train_config.parse({"robust": {"aggregator_params": {"f": 1}}, "faults": [{"kind": "gram_scale", "ranks": [1]}]}, [])
