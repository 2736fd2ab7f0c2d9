"""The threat model, row by row (README "Threat model"): each test injects exactly one lie in one role
and shows the claimed outcome: tolerated (the aggregate the rule gives without the liar's influence),
detected (the named error on every rank, naming the liar) or trusted (documented, shown to pass)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fa_hvd
import local_world
from fa_hvd import checkpoint
from fa_hvd.aggregators import get
from fa_hvd.comm import NoCompression
from fa_hvd.comm.messages import MessageError
from fa_hvd.exchange import AllgatherExchange, ShardedExchange, ShardMismatch
from fa_hvd.exchange import digest as digest_module
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

    def allgather_async(self, tensor, name, out=None):
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


# -- the deferred digest: no collective of its own, the lie named at the next control row ------------------

class RelayingOnce(LocalTransport):
    """Rank 1 alters rank 0's block on its way to rank 2 in the second step only: its gradient buckets
    (allgather exchange) or its shard of the aggregate (sharded exchange)."""

    def allgather_async(self, tensor, name, out=None):
        handle = super().allgather_async(tensor, name)
        if self.rank == 2 and (".bucket" in name or ".out" in name) and handle.key[1] == 2:  # from 1
            result = handle.result
            handle.result = lambda everyone: torch.cat([result(everyone)[:1] * 1.5, result(everyone)[1:]])
        return handle


class LyingDigest(digest_module.DeferredDigest):
    """A rank that publishes a fingerprint it did not compute."""

    def words(self):
        nonce, *fingerprint = super().words()
        return [nonce, *([7.0, 7.0] if self.published is not None else fingerprint)]


def deferred_steps(steps, verify_after=None, liar=None, exchange="allgather"):
    """``steps`` steps of the optimizer with the deferred digest, each followed by the control row; per rank:
    the error text (None if every step passed) and the fingerprints published."""

    def body(t):
        weight = torch.nn.Parameter(torch.ones(5))
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD([weight], lr=0.1), aggregator="mean", transport=t,
                                          exchange=exchange, digest="deferred")
        if t.rank == liar:
            opt.digest = LyingDigest()
        published = []
        try:
            for step in range(steps):
                opt.zero_grad()
                (weight * (t.rank + 1) * (step + 1)).sum().backward()
                opt.step()
                control.agree(t, 1.0, stop=False, checkpoint_due=False, faulty=False, overflowed=False,
                              digest=opt.digest)
                opt.digest.settle()  # the fingerprint of this step's aggregate, computed on the worker
                published.append(opt.digest.published)
                if step == verify_after:
                    opt.digest.verify(t)
        except Divergence as exc:
            return str(exc), published
        return None, published

    return run_ranks(P, body)


def test_the_deferred_digest_passes_honest_steps_with_the_same_fingerprints_on_every_rank():
    results = deferred_steps(3, verify_after=2)
    assert all(error is None for error, _ in results), results
    fingerprints = [published for _, published in results]
    assert all(f == fingerprints[0] for f in fingerprints) and [s for s, _ in fingerprints[0]] == [0, 1, 2]
    assert len({value for _, value in fingerprints[0]}) == 3  # each step its own aggregate and key


@pytest.mark.parametrize("exchange", ["allgather", "sharded"])
def test_an_altered_relayed_block_is_named_at_the_next_control_row(monkeypatch, exchange):
    monkeypatch.setattr(local_world, "LocalTransport", RelayingOnce)
    results = deferred_steps(3, exchange=exchange)  # the lie in step 1; step 2's row compares step 1's
    assert all(error is not None and "step 1: the ranks computed different aggregates" in error
               and "ranks [2] differ from the largest group" in error for error, _ in results), results
    assert all(len(published) == 2 for _, published in results)  # step 2's row raised


def test_verifying_before_a_save_names_the_divergence_of_the_step_just_taken(monkeypatch):
    monkeypatch.setattr(local_world, "LocalTransport", RelayingOnce)
    results = deferred_steps(3, verify_after=1)
    assert all(error is not None and "step 1:" in error and "ranks [2] differ" in error and len(published) == 2
               for error, published in results), results


def test_a_rank_lying_in_its_digest_word_stops_the_run_naming_it():
    results = deferred_steps(3, liar=3)
    assert all(error is not None and "ranks [3] differ from the largest group" in error for error, _ in results)


def test_the_fingerprint_changes_with_every_bit_and_with_the_key():
    words = 3 * digest_module.ROW_WORDS + 37  # three rows for the lanes and a leftover hashed as it is
    aggregate = torch.randn(words, generator=torch.Generator().manual_seed(0))
    aggregate[5], aggregate[6] = 0.0, 1e-42  # a zero and a denormal
    key = digest_module.key_for(4, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    before = digest_module.fingerprint(aggregate, key)
    assert digest_module.fingerprint(aggregate.clone(), key) == before
    assert digest_module.fingerprint(aggregate, digest_module.key_for(5, torch.tensor([1.0, 2.0, 3.0, 4.0]))) != before
    assert digest_module.fingerprint(aggregate, digest_module.key_for(4, torch.tensor([1.0, 2.0, 3.0, 5.0]))) != before
    bits = aggregate.view(torch.int32)
    for word in (0, 5, 6, 1023, 1024, 2047, 2048 + 511, 3 * 1024 - 1, 3 * 1024, words - 1):
        for bit in (0, 17, 31):  # the last bit, a middle one, the sign (-0.0 against 0.0 at word 5)
            altered = bits.clone()
            altered[word] ^= (1 << bit) if bit < 31 else -(1 << 31)
            assert digest_module.fingerprint(altered.view(torch.float32), key) != before, (word, bit)


def test_the_compiled_lanes_numpy_and_torch_compute_the_sums_of_the_definition(monkeypatch):
    monkeypatch.setenv("FA_HVD_NATIVE", "1")  # the suite runs numpy's path (tests/conftest.py)
    assert digest_module._kernel() is not None, "no C compiler: the compiled lanes cannot be checked"
    gen, width, rows = torch.Generator().manual_seed(1), digest_module.ROW_WORDS, 3
    words = torch.randint(-2**31, 2**31, (rows, width), dtype=torch.int32, generator=gen)
    weights = torch.randint(-2**31, 2**31, (2, width), dtype=torch.int32, generator=gen)
    unsigned = [[int(w) % 2**32 for w in row] for row in (*words.tolist(), *weights.tolist())]  # the bits
    expected = [[sum(a * b for a, b in zip(unsigned[r], unsigned[rows + lane])) % 2**64 for lane in (0, 1)]
                for r in range(rows)]
    for path in ("native", "numpy", "torch"):  # torch's is the GPU's, run here on the CPU
        sums = digest_module.lane_sums(words, weights, path=path)
        assert [[int(s) % 2**64 for s in row] for row in sums.tolist()] == expected, path


@pytest.mark.parametrize("steps, saving, saved", [(3, {"every_steps": 1}, [1]), (2, {}, []), (2, {"at_end": False}, [])])
def test_the_trainer_checks_the_digest_by_default_and_saves_no_checkpoint_of_a_diverged_step(tmp_path, monkeypatch,
                                                                                             steps, saving, saved):
    """The lie is in the second exchange (numbered 1): named before a checkpoint after it (every step, or at
    the end) would be written, and at the end of the run when nothing is saved."""
    from test_train import _trainer

    from fa_hvd.train import config as train_config

    assert train_config.parse({}, [])[0].robust.digest is True
    monkeypatch.setattr(local_world, "LocalTransport", RelayingOnce)

    def body(t):
        trainer = _trainer(tmp_path / str(t.rank), transport=t, train={"steps": steps}, checkpoint=saving)
        trainer.model.load_state_dict(start)
        (trainer.run_dir / "checkpoints").mkdir(parents=True)
        trainer.log = trainer_module.metrics.MetricsLog(trainer.run_dir / "metrics.jsonl", None)
        trainer.progress = trainer_module.metrics.Progress(steps, 0, "none")
        try:
            trainer.train(control.StopSignals())
        except Divergence as exc:
            trainer.writer.wait()
            return str(exc), sorted(path.name for path in (trainer.run_dir / "checkpoints").iterdir())
        return None, None

    from fa_hvd.train import trainer as trainer_module

    start = {name: 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
             for name, shape in {"1.weight": (16, 64), "1.bias": (16,), "3.weight": (10, 16), "3.bias": (10,)}.items()}
    results = run_ranks(P, body)
    assert all(error is not None and "step 1:" in error and "ranks [2] differ" in error for error, _ in results)
    assert results[0][1] == [checkpoint.path_for(Path("."), step).name for step in saved]  # only before the lie


def test_a_run_resumes_with_the_digest_turned_on_or_off_but_not_with_other_robust_changes():
    from fa_hvd.train import config as train_config

    def hashed(robust):
        return train_config.config_hash(train_config.parse({"robust": robust}, [])[1])

    assert hashed({"digest": True}) == hashed({"digest": False}) != hashed({"digest": False, "exchange": "sharded"})


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
