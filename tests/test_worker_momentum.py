"""Worker momentum (fa_hvd.worker_momentum): what a rank sends, in the optimizer, the trainer, its
checkpoints and the simulation engine."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from torch import nn

import fa_hvd
from fa_hvd import checkpoint
from fa_hvd.config import ConfigError
from fa_hvd.eval.grid import load_grid
from fa_hvd.eval.simulate import simulate
from fa_hvd.train import config as train_config
from fa_hvd.worker_momentum import WorkerMomentum
from local_world import run_ranks
from loopback import LoopbackTransport
from test_resume import _run, _trainer as _resumable
from test_train import _hand_written, _trainer


def test_each_step_sends_beta_times_the_last_sent_plus_the_gradient_and_keeps_its_own_copy():
    momentum = WorkerMomentum(0.5)
    g = [torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.0]), torch.tensor([0.0, 8.0])]
    first = momentum(g[0], 0)
    assert torch.equal(first, g[0]) and first is not g[0]
    first.fill_(100.0)  # the exchange may write into what it was handed
    assert torch.equal(momentum(g[1], 0), torch.tensor([4.5, -1.0]))
    assert torch.equal(momentum(g[2], 0), torch.tensor([2.25, 7.5]))
    assert torch.equal(momentum(g[0], 1), g[0])  # each bucket its own buffer


def test_nesterov_sends_the_gradient_plus_beta_times_the_momentum_and_keeps_the_same_buffer():
    momentum = WorkerMomentum(0.5, nesterov=True)
    g = [torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.0])]
    assert torch.equal(momentum(g[0], 0), torch.tensor([1.5, -3.0]))
    assert torch.equal(momentum(g[1], 0), torch.tensor([6.25, -0.5]))  # g + 0.5 (0.5 m_0 + g)
    assert torch.equal(momentum.buffers[0], torch.tensor([4.5, -1.0]))
    with pytest.raises(ValueError, match="worker_nesterov needs worker_momentum > 0"):
        WorkerMomentum(0.0, nesterov=True)
    with pytest.raises(ValueError, match="worker_nesterov must be True or False, got 1"):
        WorkerMomentum(0.5, nesterov=1)


def test_a_non_finite_gradient_is_sent_as_such_and_leaves_the_history_as_it_was():
    momentum = WorkerMomentum(0.5)
    momentum(torch.tensor([2.0, 2.0]), 0)
    assert not torch.isfinite(momentum(torch.tensor([math.nan, 1.0]), 0)).all()
    assert not torch.isfinite(momentum(torch.tensor([math.inf, 1.0]), 0)).all()
    assert torch.equal(momentum(torch.tensor([1.0, 1.0]), 0), torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("beta", [-0.1, 1, 1.5, math.nan, True, "0.9"])
def test_beta_outside_0_to_1_is_refused(beta):
    with pytest.raises(ValueError, match="worker_momentum must be a number with 0 <= beta < 1"):
        WorkerMomentum(beta)


def test_state_round_trips_and_a_buffer_of_another_beta_or_size_is_refused():
    momentum = WorkerMomentum(0.9)
    momentum(torch.tensor([1.0, 2.0]), 0)
    again = WorkerMomentum(0.9)
    again.load_state_dict(momentum.state_dict())
    assert torch.equal(again(torch.ones(2), 0), momentum(torch.ones(2), 0))
    wider = again(torch.ones(2, dtype=torch.float64), 0)  # loaded buffers follow the gradients' device and dtype
    assert wider.dtype == torch.float64 and torch.allclose(wider, torch.tensor([2.71, 3.52], dtype=torch.float64))
    with pytest.raises(ValueError, match="saved buffers are for beta=0.9, this run has beta=0.5"):
        WorkerMomentum(0.5).load_state_dict(momentum.state_dict())
    with pytest.raises(ValueError, match="bucket 0 has 3 elements, its buffer 2"):
        momentum(torch.ones(3), 0)


def test_the_optimizer_sends_the_momentum_before_the_gradient_transform():
    """Rank 0 of three (the loopback's others send 2x and 3x rank 0's row): the rule gets the momenta,
    and a fault's transform sees the momentum, not the gradient."""
    gathered, transformed = [], []

    def rule(G):
        gathered.append(G.clone())
        return G.mean(0)

    def transform(flat, index, step):
        transformed.append(flat.clone())
        return flat

    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), aggregator=rule,
                                      transport=LoopbackTransport(3), gradient_transform=transform,
                                      worker_momentum=0.5)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert torch.equal(gathered[0][0], x[0]) and torch.equal(gathered[1][0], 1.5 * x[0])
    assert torch.equal(gathered[1][2], 3 * 1.5 * x[0])
    assert torch.equal(transformed[1], 1.5 * x[0])
    assert torch.equal(opt.worker_momentum.buffers[0], 1.5 * x[0])
    with pytest.raises(ValueError, match="worker_momentum must be a number with 0 <= beta < 1, got 1.0"):
        fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="mean",
                                    transport=LoopbackTransport(1), worker_momentum=1.0)


def test_the_optimizers_own_momentum_beside_worker_momentum_is_refused_at_construction_and_on_load():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match=re.escape("worker_momentum=0.9 with the optimizer's own momentum 0.5 "
                                                   "applies momentum twice")):
        fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), aggregator="mean",
                                    transport=LoopbackTransport(1), worker_momentum=0.9)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # a checkpoint of a run without it
    opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), aggregator="mean",
                                      transport=LoopbackTransport(1), worker_momentum=0.9)
    with pytest.raises(ValueError, match="own momentum 0.9 applies momentum twice"):
        opt.load_state_dict(plain.state_dict())
    assert (opt.param_groups[0]["momentum"], opt.param_groups[0]["lr"]) == (0, 0.2)
    opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.3).state_dict())
    assert opt.param_groups[0]["lr"] == 0.3


@pytest.mark.parametrize("nesterov", [False, True])
def test_on_one_rank_the_trainer_with_worker_momentum_is_torch_sgd_with_momentum_bit_for_bit(tmp_path, nesterov):
    """Worker momentum 0.9 and an optimizer without momentum, against a plain torch loop with SGD momentum
    0.9 (no weight decay: torch's SGD puts it inside the momentum, worker momentum leaves it outside);
    with ``optim.nesterov`` the workers' momentum is Nesterov's."""
    t = _trainer(tmp_path, ["robust.worker_momentum=0.9"],
                 optim={"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "nesterov": nesterov},
                 schedule={"name": "cosine", "warmup_steps": 3}, train={"steps": 10, "batch_size": 8})
    assert t.worker_momentum.nesterov is nesterov and not t.optimizer.param_groups[0]["nesterov"]
    for _ in range(6):
        t.train_step()
        t.step += 1
    expected = _hand_written(6, 8, 1, None, "none", momentum=0.9, weight_decay=0.0, nesterov=nesterov)
    for mine, theirs in zip(t.model.parameters(), expected.parameters()):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("override,needle", [
    ("robust.worker_momentum=1.0", "robust.worker_momentum must be a number with 0 <= beta < 1, got 1.0"),
    ("robust.worker_momentum=-0.5", "robust.worker_momentum must be a number with 0 <= beta < 1, got -0.5"),
    ("robust.worker_momentum=0.9", "robust.worker_momentum: 0.9 with optim.momentum 0.9 applies momentum twice"),
    ("optim.nesterov=true optim.momentum=0", "optim.nesterov: needs optim.momentum > 0, or robust.worker_momentum > 0"),
    ("optim.nesterov=true optim.name=adam", "optim.nesterov: needs optim.name sgd, got adam"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        train_config.parse({}, override.split())


def test_worker_momentum_is_accepted_with_sgd_without_momentum_and_with_adam():
    assert train_config.parse({}, ["robust.worker_momentum=0.9", "optim.momentum=0"])[0].robust.worker_momentum == 0.9
    assert train_config.parse({"optim": {"name": "adam"}}, ["robust.worker_momentum=0.9"])[0].robust.worker_momentum == 0.9
    conf = train_config.parse({}, ["robust.worker_momentum=0.9", "optim.momentum=0", "optim.nesterov=true"])[0]
    assert conf.worker_nesterov
    assert not train_config.parse({}, ["optim.nesterov=true"])[0].worker_nesterov  # the optimizer's own


def test_a_resumed_run_continues_each_ranks_own_momentum_exactly(tmp_path):
    """Two in-process ranks, 6 steps with a checkpoint every 3. The same run with its step-6 checkpoint
    removed resumes at step 3 and writes a step-6 checkpoint equal to the first: the parameters and
    each rank's own buffers (which differ between the ranks)."""
    overrides = ["robust.worker_momentum=0.9", "optim.momentum=0"]

    def run(run_dir):
        def body(transport):
            return _run(_resumable(run_dir, overrides, transport=transport)) == 0
        assert run_ranks(2, body) == [True, True]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(whole)
    shutil.copytree(whole, cut)
    (cut / "checkpoints" / checkpoint.path_for("", 6).name).unlink()
    run(cut)
    a, b = (checkpoint.read(checkpoint.path_for(d / "checkpoints", 6)) for d in (whole, cut))
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    buffers = [[r["worker_momentum"]["buffers"] for r in state["ranks"]] for state in (a, b)]
    assert not torch.equal(buffers[0][0][0], buffers[0][1][0])
    for mine, theirs in zip(buffers[0], buffers[1]):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[i], theirs[i]) for i in mine)


def test_a_checkpoint_holds_worker_momentum_past_the_state_limit(tmp_path, monkeypatch):
    """The per-rank state's limit grows with the model: two in-process ranks checkpoint their worker
    momentum with ``MAX_STATE_BYTES`` lowered to 1 kB above a rank's state without it."""
    from fa_hvd.comm import messages

    overrides = ["robust.worker_momentum=0.9", "optim.momentum=0"]
    probe = _trainer(tmp_path / "probe", overrides)  # the same model as _resumable's
    without = len(messages.encode_state(probe.rank_state()))
    probe.train_step()
    assert len(messages.encode_state(probe.rank_state())) > without + 4000  # 1,210 fp32 buffers
    monkeypatch.setattr(messages, "MAX_STATE_BYTES", without + 1000)
    assert run_ranks(2, lambda t: _run(_resumable(tmp_path / "run", overrides, transport=t))) == [0, 0]
    state = checkpoint.read(checkpoint.path_for(tmp_path / "run" / "checkpoints", 6))
    assert all(rank["worker_momentum"]["buffers"] for rank in state["ranks"])


def test_a_config_without_the_key_has_the_hash_it_had_before_the_key_existed():
    _, data = train_config.parse({})
    before = {**data, "robust": {k: v for k, v in data["robust"].items() if k != "worker_momentum"}}
    assert train_config.config_hash(before) == train_config.config_hash(data)
    _, on = train_config.parse({}, ["robust.worker_momentum=0.9", "optim.momentum=0"])
    _, off = train_config.parse({}, ["optim.momentum=0"])
    assert train_config.config_hash(on) != train_config.config_hash(off)


def test_a_new_world_starts_the_momentum_afresh(tmp_path):
    t = _trainer(tmp_path, ["robust.worker_momentum=0.9", "optim.momentum=0"], train={"steps": 4, "batch_size": 8})
    t.train_step()
    assert t.worker_momentum.buffers
    t.reseed()
    assert t.worker_momentum.buffers == {}


@pytest.mark.parametrize("nesterov", ["false", "true"])
def test_the_simulation_sends_each_workers_momentum(tmp_path, nesterov):
    """With ``mean`` and no fault, worker momentum 0.9 and no optimizer momentum trains as the optimizer's
    momentum 0.9 does (the same SGD, up to the order of the sums; Nesterov's too); with ALIE the attack sees
    the momenta."""
    def cells(extra):
        grid = tmp_path / f"grid{len(extra)}.yaml"
        grid.write_text(f"""out: {tmp_path / 'out'}
trainer: {{data: {{name: digits}}, model: {{name: mlp}}, train: {{steps: 30, batch_size: 16}}, {extra}}}
seeds: 1
splits: {{iid: null}}
workers: [[4, 1]]
rules: {{mean: mean}}
faults: {{none: [], alie: [{{kind: alie, params: {{z: 1.0, sign: -1}}}}]}}
""")
        return load_grid(grid).cells

    server = [simulate(c, curve=True) for c in cells(f"optim: {{momentum: 0.9, nesterov: {nesterov}}}")]
    worker = [simulate(c, curve=True)
              for c in cells(f"optim: {{momentum: 0.0, nesterov: {nesterov}}}, robust: {{worker_momentum: 0.9}}")]
    torch.testing.assert_close(torch.tensor(worker[0]["losses"]), torch.tensor(server[0]["losses"]),
                               rtol=1e-4, atol=1e-6)
    assert max(abs(a - b) for a, b in zip(worker[1]["losses"], server[1]["losses"])) > 1e-3
