"""The evaluation harness: grid files, the simulation engine, resuming, --cell, the report and its bars."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT
from fa_hvd.aggregators import get as get_aggregator
from fa_hvd.eval import cli, report, runner
from fa_hvd.eval.grid import load_grid
from fa_hvd.eval.simulate import simulate
from fa_hvd.faults import FaultInjector, parse_faults, poison_for_rank
from fa_hvd.train import data as datasets
from fa_hvd.train import control, models
from fa_hvd.train.sharding import ShardStream, partition

TINY = {
    "trainer": {"data": {"normalize": False}, "train": {"steps": 4, "batch_size": 8}},
    "seeds": 2,
    "splits": {"iid": None, "d0.5": 0.5},
    "workers": [[5, 1]],
    "rules": {"mean": "mean", "flag": {"name": "flag", "params": {"r": 2}}},
    "faults": {"none": [], "alie-1": [{"kind": "alie", "params": {"z": 1.0, "sign": -1}}]},
}


def write_grid(tmp_path, grid=None, **changes) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**(grid or TINY), **changes}, sort_keys=False))
    return path


def test_grid_cells_are_seed_major_with_the_faulty_ranks_and_f_filled_in(tmp_path):
    grid = load_grid(write_grid(tmp_path))
    assert len(grid.cells) == 2 * 2 * 1 * 2 * 2
    assert [c.key for c in grid.cells[:4]] == ["iid/p5f1/mean/none/s0", "iid/p5f1/flag/none/s0",
                                              "iid/p5f1/mean/alie-1/s0", "iid/p5f1/flag/alie-1/s0"]
    assert grid.cells[4].key == "d0.5/p5f1/mean/none/s0" and grid.cells[4].alpha == 0.5
    assert all(c.seed == 1 for c in grid.cells[8:])
    flag = grid.cells[3]
    assert flag.aggregator_params == {"f": 1, "r": 2}
    assert flag.fault_entries == [{"kind": "alie", "params": {"z": 1.0, "sign": -1}, "ranks": [4]}]
    first = load_grid(write_grid(tmp_path, faulty="first")).cells[3]
    assert first.fault_entries[0]["ranks"] == [0]
    assert flag.digest("simulation") != flag.digest("distributed")


@pytest.mark.parametrize("changes,message", [
    ({"rules": {"x": {"name": "flag", "params": {"f": 2}}}}, "rules.x.params: expected a mapping without f"),
    ({"rules": {"x": "nosuchrule"}}, "rules.x at p=5, f=1: unknown aggregation rule"),
    ({"rules": {"b": "bulyan"}}, r"rules.b at p=5, f=1: bulyan: needs at least 7 workers"),
    ({"workers": [[4, 4]]}, r"workers\[0\]: expected \[p, f\]"),
    ({"faults": {"bad": [{"kind": "melt"}]}}, "faults.bad at p=5, f=1: faults\\[0\\]: unknown kind 'melt'"),
    ({"splits": {"d": -1}}, "splits.d: expected null"),
    ({"trainer": {"seed": 3}}, "trainer.seed: set by the grid"),
    ({"trainer": {"data": {"alpha": 0.1}}}, "trainer.data.alpha: set by the grid"),
    ({"trainer": {"optim": {"lr": "fast"}}}, "trainer.optim.lr: expected a number"),
    ({"seeds": [1, 1]}, "seeds: expected"),
    ({"bars": {"rule": "krum"}}, "bars.rule: 'krum' is not a label in rules"),
    ({"colour": "red"}, "colour: unknown key"),
])
def test_a_bad_grid_gets_one_line_naming_the_key(tmp_path, capsys, changes, message):
    assert cli.main(["--grid", str(write_grid(tmp_path, **changes)), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err


def per_rank_reference(cell):
    """The same run written as p ranks would do it: one backward per rank, its own flat gradient."""
    conf, p, seed = cell.run_config(), cell.p, cell.seed
    steps, batch, lr = conf["train"]["steps"], conf["train"]["batch_size"], conf["optim"]["lr"]
    specs = parse_faults(conf["faults"], p, f=conf["robust"]["aggregator_params"]["f"])
    split = datasets.load_dataset("digits", seed=seed)
    shards = partition(split.train.tensors[1], p, seed, conf["data"]["alpha"])
    streams = [ShardStream(s, seed, r) for r, s in enumerate(shards)]
    data = [poison_for_rank(split.train, specs, r, seed=seed) for r in range(p)]

    class Gather:
        def __init__(self, rank):
            self.rank, self.size = rank, p

        def allgather(self, tensor, name=None):
            return honest

    injectors = [FaultInjector(specs, r, p, seed=seed, transport=Gather(r)) for r in range(p)]
    torch.manual_seed(seed)
    model = models.build("mlp", split.shape, split.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # the trainer's default momentum
    params = list(reversed(list(model.parameters())))  # the optimizer's bucket order
    agg = get_aggregator(conf["robust"]["aggregator"], **conf["robust"]["aggregator_params"])
    losses = []
    for step in range(steps):
        flats, step_losses = [], []
        for r in range(p):
            items = [data[r][int(i)] for i in streams[r].take(batch)]
            x = torch.stack([it[0] for it in items])
            y = torch.tensor([int(it[1]) for it in items])
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            step_losses.append(float(loss.detach()))
            flats.append(torch.cat([q.grad.reshape(-1) for q in params]))
        honest = torch.stack(flats)
        sent = torch.stack([injectors[r].gradient_transform(flats[r], 0, step) for r in range(p)])
        update = agg(sent)
        offset = 0
        for q in params:
            q.grad = update[offset:offset + q.numel()].view_as(q).clone()
            offset += q.numel()
        opt.step()
        losses.append(control.median_loss(torch.tensor(step_losses, dtype=torch.float64)))  # as logged
    return losses, model


@pytest.mark.parametrize("rule,faults,alpha", [
    ("flag", [{"kind": "alie", "params": {"z": 1.0, "sign": -1}}], None),
    ("mean", [{"kind": "gaussian", "params": {"sigma": 0.01}}], 0.5),
    ("median", [{"kind": "labelflip", "params": {"num_classes": 10}}], None),
    ("nmean", [{"kind": "lotka_volterra"}], 0.5),
])
def test_simulation_follows_the_per_rank_computation(tmp_path, rule, faults, alpha):
    grid = {**TINY, "trainer": {"data": {"normalize": False}, "train": {"steps": 6, "batch_size": 8}, "optim": {"lr": 0.1}}, "seeds": [3],
            "splits": {"s": alpha}, "workers": [[5, 1]], "rules": {rule: rule}, "faults": {"x": faults}}
    cell = load_grid(write_grid(tmp_path, grid)).cells[0]
    result = simulate(cell, curve=True)
    expected, _ = per_rank_reference(cell)
    assert result["steps"] == 6 and not result["diverged"]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_a_diverged_run_stops_and_says_so(tmp_path):
    grid = {**TINY, "seeds": [0], "splits": {"iid": None}, "rules": {"mean": "mean"},
            "faults": {"nan": [{"kind": "nan"}]}}
    result = simulate(load_grid(write_grid(tmp_path, grid)).cells[0], curve=True)
    assert result["diverged"] and result["steps"] == 1


def test_runs_resume_and_rerun_only_changed_cells(tmp_path, capsys):
    out = tmp_path / "out"
    path = write_grid(tmp_path, seeds=1, splits={"iid": None})
    assert cli.main(["--grid", str(path), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "4 cells, 0 already done, 4 to run" in first and first.count("accuracy") == 4
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert cli.main(["--grid", str(path), "--out", str(out)]) == 0
    assert "4 cells, 4 already done, 0 to run" in capsys.readouterr().out
    changed = write_grid(tmp_path, seeds=1, splits={"iid": None},
                         rules={"mean": "mean", "flag": {"name": "flag", "params": {"r": 3}}})
    assert cli.main(["--grid", str(changed), "--out", str(out)]) == 0
    rerun = capsys.readouterr().out
    assert "4 cells, 2 already done, 2 to run" in rerun and rerun.count(" flag ") == 2
    table = (out / "table.md").read_text()
    assert "| flag |" in table and (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_result_names_its_machine_and_cells_of_another_are_named_and_rerun_on_request(tmp_path, capsys):
    """A cell's accuracy depends on the machine, so each result line names it; a run that reuses cells
    of another machine (or of a line that names none) says how many, the report lists the machines,
    and --rerun-other-machines runs those cells here (in a whole run and in --cell mode)."""
    out = tmp_path / "out"
    path = write_grid(tmp_path, seeds=1, splits={"iid": None})
    assert cli.main(["--grid", str(path), "--out", str(out)]) == 0
    here = runner.machine()
    assert "torch " in here and f"({torch.backends.cpu.get_cpu_capability()})" in here
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["machine"] for r in records] == [here] * 4
    assert f"Machine: {here} (4 cells)." in (out / "table.md").read_text()
    by_key = {r["key"]: r for r in records}
    by_key["iid/p5f1/flag/none/s0"]["machine"] = "Another CPU (AVX512), torch 2.14.1"
    del by_key["iid/p5f1/mean/alie-1/s0"]["machine"]  # a line from before machines were recorded
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in by_key.values()))
    capsys.readouterr()
    assert cli.main(["--grid", str(path), "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "4 cells, 4 already done, 0 to run" in said.out
    assert ("note: 2 of the 4 cells already done were computed on another machine (Another CPU (AVX512), torch "
            f"2.14.1: 1, not recorded: 1; this one: {here})") in said.err, said.err
    table = (out / "table.md").read_text()
    assert f"Machines: {here} (2 cells); Another CPU (AVX512), torch 2.14.1 (1 cell); not recorded (1 cell)." \
        in table, table
    assert cli.main(["--grid", str(path), "--out", str(out), "--cell", "1", "--rerun-other-machines"]) == 0
    assert "accuracy" in capsys.readouterr().out  # cell 1 (flag/none) ran again, into a --cell file
    assert cli.main(["--grid", str(path), "--out", str(out), "--cell", "0", "--rerun-other-machines"]) == 0
    assert "already done" in capsys.readouterr().out
    assert cli.main(["--grid", str(path), "--out", str(out), "--rerun-other-machines"]) == 0
    said = capsys.readouterr()
    assert "4 cells, 3 already done, 1 to run" in said.out and "note:" not in said.err, said
    assert f"Machine: {here} (4 cells)." in (out / "table.md").read_text()


def test_cell_mode_writes_a_file_that_report_collects(tmp_path, capsys):
    out = tmp_path / "out"
    path = write_grid(tmp_path, seeds=1, splits={"iid": None})
    assert cli.main(["--grid", str(path), "--out", str(out), "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "4 cells" and listing[3] == "2 iid/p5f1/mean/alie-1/s0"
    assert cli.main(["--grid", str(path), "--out", str(out), "--cell", "2"]) == 0
    assert len(list((out / "cells").glob("*.json"))) == 1
    assert cli.main(["--grid", str(path), "--out", str(out), "--cell", "2"]) == 0
    assert "already done" in capsys.readouterr().out
    # not yet collected, the cell is done for --list too (slurm/submit-eval.sh does not send it again)
    assert cli.main(["--grid", str(path), "--out", str(out), "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line for line in listing if line.endswith("(done)")] == ["2 iid/p5f1/mean/alie-1/s0  (done)"], listing
    assert cli.main(["--grid", str(path), "--out", str(out), "--cell", "4"]) == 2
    assert cli.main(["--grid", str(path), "--out", str(out), "--report"]) == 0
    assert not list((out / "cells").glob("*.json"))
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == ["iid/p5f1/mean/alie-1/s0"]
    assert cli.main(["--grid", str(path), "--out", str(out), "--list"]) == 0
    assert "2 iid/p5f1/mean/alie-1/s0  (done)" in capsys.readouterr().out


def test_list_into_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """``fa-hvd-eval --list | head -2``: the listing (here 8,000 lines, more than a pipe holds) ends quietly
    when the pipe closes."""
    path = write_grid(tmp_path, seeds=2000, splits={"iid": None})
    proc = subprocess.run(f"{sys.executable} -m fa_hvd.eval.cli --grid {path} --out {tmp_path / 'out'} --list | head -2",
                          shell=True, capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.splitlines() == ["8000 cells", "0 iid/p5f1/mean/none/s0"] and proc.stderr == "", proc.stderr


def test_bars_are_checked_against_the_other_rules(tmp_path):
    grid = load_grid(write_grid(tmp_path, {
        "seeds": 2, "splits": {"iid": None}, "workers": [[5, 1]],
        "rules": {"mean": "mean", "nmean": "nmean", "flag": "flag"},
        "faults": {"none": [], "ipm": [{"kind": "ipm"}], "alie": [{"kind": "alie", "params": {"z": 1.0}}]},
        "bars": {"rule": "flag"},
    }))
    accuracy = {  # (rule, fault) -> per-seed accuracy
        ("mean", "none"): [0.96, 0.96], ("nmean", "none"): [0.97, 0.97], ("flag", "none"): [0.955, 0.955],
        ("mean", "ipm"): [0.10, 0.12], ("nmean", "ipm"): [0.90, 0.92], ("flag", "ipm"): [0.95, 0.95],
        ("mean", "alie"): [0.80, 0.80], ("nmean", "alie"): [0.94, 0.94], ("flag", "alie"): [0.92, 0.92],
    }
    records = {c.index: {"test_accuracy": accuracy[(c.rule, c.fault)][c.seed], "diverged": False}
               for c in grid.cells}
    table = report.summarize(grid, records)[("iid", 5, 1)]
    assert table[("mean", "ipm")].broken and not table[("flag", "ipm")].broken
    checks = report.bar_checks(grid, table)
    assert [(f, r, round(g, 4)) for f, r, g in checks["misses"]] == [("none", "nmean", 0.015),
                                                                     ("alie", "nmean", 0.02)]
    assert checks["best"] is False
    assert checks["clean"][0] is True and abs(checks["clean"][1] - 0.005) < 1e-12
    assert checks["worst"][:3] == (True, 0.92, "nmean")
    assert [f for f, _ in checks["control_faults"]] == ["ipm"]
    lines = "\n".join(report.bars_markdown(grid, {("iid", 5, 1): table}))
    assert "| iid | 5 | 1 | no: none 1.5 below nmean, alie 2.0 below nmean | yes (-0.5) |" in lines


@pytest.mark.parametrize("name", ["mlp", "cnn"])  # batched matrix products / torch.func.vmap
def test_per_worker_gradients_are_each_workers_own_backward(name):
    from fa_hvd.eval.simulate import PerWorkerGradients

    torch.manual_seed(0)
    model = models.build(name, (1, 8, 8), 10)
    x, y = torch.rand(3, 5, 1, 8, 8), torch.randint(0, 10, (3, 5))
    grads, losses = PerWorkerGradients(model, 3)(x, y)
    for r in range(3):
        model.zero_grad()
        loss = F.cross_entropy(model(x[r]), y[r])
        loss.backward()
        assert abs(float(losses[r]) - float(loss.detach())) < 1e-6
        for pname, param in model.named_parameters():
            torch.testing.assert_close(grads[pname][r], param.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer,message", [
    ({"model": {"dropout": 0.1}}, "model.dropout: the simulation does not reproduce per-rank dropout"),
    ({"train": {"amp": "bf16", "steps": 2}}, "train.amp: the simulation does not reproduce mixed precision"),
])
def test_the_simulation_refuses_trainer_settings_it_cannot_reproduce(tmp_path, trainer, message):
    grid = load_grid(write_grid(tmp_path, trainer={"train": {"steps": 2}, **trainer}))
    with pytest.raises(ValueError, match=message):
        simulate(grid.cells[0])


def test_a_cell_whose_rule_code_changes_is_stale(tmp_path, monkeypatch):
    from fa_hvd.eval import grid as grid_module

    cell = load_grid(write_grid(tmp_path)).cells[1]
    before = cell.digest("simulation")
    grid_module.rule_code.cache_clear()
    monkeypatch.setattr(grid_module.inspect, "getsourcefile", lambda cls: __file__)
    assert cell.digest("simulation") != before
    grid_module.rule_code.cache_clear()


@pytest.mark.slow
def test_the_engines_agree_on_a_small_cell(tmp_path):
    # One horovodrun job of fa-hvd-train against the simulation of the same cell: normalised
    # inputs, Dirichlet shards, an omniscient attack (ALIE below the mean), a random one
    # (Gaussian, seeded per bucket) and a data fault (label flip), aggregated by FA (5 ranks
    # for f = 2: FA needs p >= 2f + 1).
    from fa_hvd.eval.distributed import run_distributed

    grid = {"trainer": {"train": {"steps": 8, "batch_size": 16}},
            "seeds": [2], "splits": {"d": 0.5}, "workers": [[5, 2]], "rules": {"flag": "flag"},
            "faults": {"x": [{"kind": "alie", "ranks": [3], "params": {"z": 1.0, "sign": -1}},
                             {"kind": "gaussian", "ranks": [2], "params": {"sigma": 0.1}},
                             {"kind": "labelflip", "ranks": [2], "params": {"num_classes": 10}}]}}
    cell = load_grid(write_grid(tmp_path, grid)).cells[0]
    simulated = simulate(cell, curve=True)
    distributed = run_distributed(cell, tmp_path / "runs", curve=True)
    assert len(distributed["losses"]) == 8
    torch.testing.assert_close(torch.tensor(distributed["losses"]), torch.tensor(simulated["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert distributed["test_accuracy"] == simulated["test_accuracy"]
    assert abs(distributed["test_loss"] - simulated["test_loss"]) < 1e-5
