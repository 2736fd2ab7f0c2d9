"""Unchanged Horovod scripts under ``python -m fa_hvd.wrap``, and its argument handling."""

import os
import signal
import subprocess
import time

import pytest

from conftest import BIN, ROOT, SCRIPTS, job_env, launch, output, results
from fa_hvd import wrap


def test_arguments_and_environment():
    args, params = wrap.parse_args(
        ["--aggregator", "multikrum", "--f", "1", "--param", "m=3", "train.py", "--lr", "0.1"],
        environ={"FA_HVD_PARAMS": "m=2"},
    )
    assert args.aggregator == "multikrum" and args.script == "train.py" and args.args == ["--lr", "0.1"]
    assert params == {"m": 3, "f": 1}
    args, params = wrap.parse_args(["t.py"], environ={"FA_HVD_AGGREGATOR": "flag", "FA_HVD_F": "2",
                                                       "FA_HVD_PARAMS": "r=4,mode=reference"})
    assert args.aggregator == "flag" and params == {"r": 4, "mode": "reference", "f": 2}


def test_worker_momentum_from_the_command_line_or_the_environment_moves_the_scripts_sgd_momentum(monkeypatch,
                                                                                                 capsys):
    import torch
    from torch import nn

    import fa_hvd.comm
    from loopback import LoopbackTransport

    assert wrap.parse_args(["t.py"], environ={})[0].worker_momentum == 0
    assert wrap.parse_args(["t.py"], environ={"FA_HVD_WORKER_MOMENTUM": "0.9"})[0].worker_momentum == 0.9
    args, _ = wrap.parse_args(["--worker-momentum", "0.5", "t.py"], environ={"FA_HVD_WORKER_MOMENTUM": "0.9"})
    assert args.worker_momentum == 0.5
    monkeypatch.setattr(fa_hvd.comm, "get_transport", lambda name, process_set=None: LoopbackTransport(2))
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "momentum": 0.5}], lr=0.1,
                          momentum=0.9)
    opt = wrap.robust_optimizer("mean", {}, "horovod", 0.9, environ={})(sgd)
    assert opt.worker_momentum.beta == 0.9 and [g["momentum"] for g in opt.param_groups] == [0.0, 0.0]
    assert "worker momentum 0.9 (the script's SGD momentum 0.5, 0.9 set to 0)" in capsys.readouterr().err
    assert wrap.robust_optimizer("mean", {}, "horovod", environ={})(torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9)).worker_momentum is None


def test_a_nesterov_sgd_under_worker_momentum_steps_as_it_did_alone(monkeypatch, capsys):
    """One rank: the wrapped Nesterov SGD (its momentum moved to the worker) gives torch's Nesterov SGD's
    parameters bit for bit; dampening, and groups that differ in nesterov, are refused."""
    import torch
    from torch import nn

    import fa_hvd.comm
    from loopback import LoopbackTransport

    monkeypatch.setattr(fa_hvd.comm, "get_transport", lambda name, process_set=None: LoopbackTransport(1))
    torch.manual_seed(0)
    models = [nn.Linear(3, 2), nn.Linear(3, 2)]
    models[1].load_state_dict(models[0].state_dict())
    plain = torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9, nesterov=True)
    wrapped = wrap.robust_optimizer("mean", {}, "horovod", 0.9, environ={})(
        torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9, nesterov=True))
    assert wrapped.worker_momentum.nesterov and not wrapped.param_groups[0]["nesterov"]
    assert "worker momentum 0.9 (Nesterov) (the script's SGD momentum 0.9 set to 0)" in capsys.readouterr().err
    for step in range(5):
        x = torch.randn(4, 3)
        for model, opt in zip(models, (plain, wrapped)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for mine, theirs in zip(models[1].parameters(), models[0].parameters()):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="worker momentum has no dampening"):
        wrap.robust_optimizer("mean", {}, "horovod", 0.9, environ={})(
            torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9, dampening=0.1))
    mixed = torch.optim.SGD([{"params": [models[0].weight], "nesterov": False}, {"params": [models[0].bias]}],
                            lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="groups differ in nesterov"):
        wrap.robust_optimizer("mean", {}, "horovod", 0.9, environ={})(mixed)
    assert [g["momentum"] for g in mixed.param_groups] == [0.9, 0.9]  # a refusal changes nothing


def test_worker_momentum_moves_no_other_optimizers_momentum(monkeypatch):
    """RMSprop's momentum acts on its scaled step: it is refused, not moved (the method would change);
    an RMSprop without momentum is wrapped with the worker momentum."""
    import torch

    import fa_hvd.comm
    from loopback import LoopbackTransport

    monkeypatch.setattr(fa_hvd.comm, "get_transport", lambda name, process_set=None: LoopbackTransport(1))
    model = torch.nn.Linear(3, 2)
    script = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)
    with pytest.raises(ValueError, match="the script's RMSprop has momentum 0.9 of its own"):
        wrap.robust_optimizer("mean", {}, "horovod", 0.9, environ={})(script)
    assert script.param_groups[0]["momentum"] == 0.9 and "nesterov" not in script.param_groups[0]
    plain = wrap.robust_optimizer("mean", {}, "horovod", 0.9, environ={})(
        torch.optim.RMSprop(model.parameters(), lr=0.01))
    assert plain.worker_momentum.beta == 0.9


@pytest.mark.parametrize("argv,needle", [
    (["--worker-momentum", "1", "t.py"], "worker_momentum must be a number with 0 <= beta < 1, got 1.0"),
    (["--worker-momentum", "x", "t.py"], "argument --worker-momentum: invalid float value: 'x'"),
    (["--aggregator", "nosuch", "t.py"], "unknown aggregation rule"),
    (["--param", "r", "t.py"], "key=value"),
    (["--aggregator", "flag", "--param", "r=0", "t.py"], "r must"),
])
def test_bad_choices_fail_before_the_script(argv, needle, capsys):
    with pytest.raises(SystemExit):
        wrap.parse_args(argv, environ={})
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_mnist_style_script_unchanged_with_fp16_predivide_and_worker_momentum():
    """The script's SGD momentum 0.5 moves to the ranks, through its hvd.broadcast_optimizer_state."""
    proc = launch("gloo", 4, ["python", "-m", "fa_hvd.wrap", "--aggregator", "flag", "--f", "1", "--param", "r=2",
                              "--worker-momentum", "0.5", str(SCRIPTS / "hvd_mnist_style.py"), "--epochs", "5",
                              "--fp16-allreduce", "--gradient-predivide-factor", "2.0"])
    found = results(proc)
    assert proc.returncode == 0 and found, output(proc)
    assert found[0]["optimizer"] == "fa_hvd.optimizer"
    assert found[0]["ranks_agree"]
    assert found[0]["accuracy"] > 0.6  # plain Horovod with mean reaches 0.64 after 2 epochs
    assert "worker momentum 0.5 (the script's SGD momentum 0.5 set to 0)" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_synthetic_benchmark_style_script_with_faults_from_the_environment():
    faults = "[{kind: signflip, ranks: [3], stop_step: 2}, {kind: nan, ranks: [3], start_step: 2}]"
    proc = launch("mpi", 4, ["python", "-m", "fa_hvd.wrap", str(SCRIPTS / "hvd_synthetic_style.py")],
                  env={"FA_HVD_AGGREGATOR": "median", "FA_HVD_F": "1", "FA_HVD_FAULTS": faults})
    found = results(proc)
    assert proc.returncode == 0 and found, output(proc)
    assert found[0]["finite"] and found[0]["img_sec_per_rank"] > 0
    assert found[0]["optimizer"] == "fa_hvd.optimizer"
    log = proc.stdout + proc.stderr
    assert "injecting signflip" in log and "injecting nan" in log


@pytest.mark.slow
def test_adasum_is_refused_with_a_clear_message():
    proc = launch("gloo", 2, ["python", "-m", "fa_hvd.wrap", str(SCRIPTS / "hvd_synthetic_style.py"), "--use-adasum"])
    assert proc.returncode != 0
    assert "op=hvd.Adasum is not supported" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["mean", "median"])
def test_elastic_script_survives_a_killed_worker(tmp_path, aggregator):
    """Horovod elastic (``hvd.elastic.run``, ``TorchState``) through ``fa_hvd.wrap``: two hosts of
    one slot each (localhost and 127.0.0.1 are two hosts to horovodrun), SIGKILL the worker on
    127.0.0.1 mid-run, and the job finishes on the other one, as it does with plain Horovod."""
    discover = tmp_path / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
    discover.chmod(0o755)
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--host-discovery-script", str(discover),
           "python", "-m", "fa_hvd.wrap", "--aggregator", aggregator, "--f", "0",
           str(SCRIPTS / "hvd_elastic_style.py"), "--pid-dir", str(pids), "--batches", "150",
           "--slow-host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _wait_for_progress(pids, "127.0.0.1", batches=15, timeout=90)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    found = results(done)
    assert proc.returncode == 0 and len(found) == 1, output(done)
    assert found[0] == {"batches": 150, "final_size": 1, "sizes_seen": [1, 2], "optimizer": "fa_hvd.optimizer",
                        "finite": True}, output(done)
    assert "rank 0: now 1 rank (was 2): aggregating with " + aggregator in stdout + stderr, output(done)


def _wait_for_progress(pids, host, batches, timeout):
    """The pid of the worker on ``host`` once it has done ``batches`` batches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = pids / f"progress.{host}"
        done = progress.read_text().strip() if progress.exists() else ""  # empty while being rewritten
        if done and int(done) >= batches:
            return int(next(pids.glob(f"{host}.*")).name.rsplit(".", 1)[1])
        time.sleep(0.2)
    raise AssertionError(f"the worker on {host} did not reach batch {batches} within {timeout} s")


def test_a_bad_transport_from_the_environment_and_a_missing_script_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as stop:
        wrap.parse_args(["t.py"], environ={"FA_HVD_TRANSPORT": "nccl"})
    assert stop.value.code == 2
    assert "error: FA_HVD_TRANSPORT: expected one of horovod, mpi, got 'nccl'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        wrap.main(["/nonexistent/train.py"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "python -m fa_hvd.wrap: error: script not found: /nonexistent/train.py\n"


@pytest.mark.parametrize("environ, message", [
    ({"FA_HVD_FAULTS": "[{kind: alie2, ranks: [1]}]"}, "error: FA_HVD_FAULTS: faults[0]: unknown kind 'alie2'"),
    ({"FA_HVD_FAULTS": "[{kind: alie, ranks: [1, 2]}]"}, "error: FA_HVD_FAULTS: faults make 2 ranks Byzantine"),
    ({"FA_HVD_FAULT_SEED": "x"}, "error: FA_HVD_FAULT_SEED must be an integer, got 'x'"),
    ({"FA_HVD_ALLOW_EXCEEDING_F": "maybe"}, "error: FA_HVD_ALLOW_EXCEEDING_F must be 1/true or 0/false"),
])
def test_bad_fault_settings_are_usage_errors_before_the_script(environ, message, capsys):
    with pytest.raises(SystemExit) as stop:
        wrap.parse_args(["--f", "1", "t.py"], environ=environ)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    wrap.parse_args(["--f", "1", "t.py"], environ={**environ, "FA_HVD_FAULTS": "[{kind: alie, ranks: [1]}]",
                                                   "FA_HVD_FAULT_SEED": "3", "FA_HVD_ALLOW_EXCEEDING_F": "0"})


def test_data_faults_are_refused_before_the_script(capsys):
    with pytest.raises(SystemExit):
        wrap.parse_args(["t.py"], environ={"FA_HVD_FAULTS": "[{kind: labelflip, ranks: [1], params: {num_classes: 10}}]"})
    err = capsys.readouterr().err
    assert "data fault(s) labelflip cannot be applied to an unchanged script" in err
    assert "poison_for_rank" in err


def test_the_replacement_takes_horovods_arguments_in_horovods_order(monkeypatch):
    import inspect

    import horovod.torch as hvd
    import torch
    from torch import nn

    import fa_hvd.comm
    from loopback import LoopbackTransport

    asked = []
    monkeypatch.setattr(fa_hvd.comm, "get_transport",
                        lambda name, process_set=None: asked.append((name, process_set)) or LoopbackTransport(2))
    horovods = list(inspect.signature(hvd.DistributedOptimizer).parameters)
    replacement = wrap.robust_optimizer("median", {"f": 0}, "horovod", environ={})
    assert list(inspect.signature(replacement).parameters)[:len(horovods)] == horovods
    model = nn.Linear(3, 2)
    marker = object()
    opt = replacement(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()), None, 2, None, 1.0,
                      0, None, False, marker)  # every argument positionally, process_set last
    assert asked == [("horovod", marker)]
    assert opt.backward_passes_per_step == 2 and opt.aggregator.name == "median"
