"""Unchanged Horovod scripts under ``python -m fa_hvd.wrap``, and its argument handling."""

import pytest

from conftest import SCRIPTS, launch, output, results
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


@pytest.mark.parametrize("argv,needle", [
    (["--aggregator", "nosuch", "t.py"], "unknown aggregation rule"),
    (["--param", "r", "t.py"], "key=value"),
    (["--aggregator", "flag", "--param", "r=0", "t.py"], "r must"),
])
def test_bad_choices_fail_before_the_script(argv, needle, capsys):
    with pytest.raises(SystemExit):
        wrap.parse_args(argv, environ={})
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_mnist_style_script_unchanged_with_fp16_and_predivide():
    proc = launch("gloo", 4, ["python", "-m", "fa_hvd.wrap", "--aggregator", "flag", "--f", "1", "--param", "r=2",
                              str(SCRIPTS / "hvd_mnist_style.py"), "--epochs", "5", "--fp16-allreduce",
                              "--gradient-predivide-factor", "2.0"])
    found = results(proc)
    assert proc.returncode == 0 and found, output(proc)
    assert found[0]["optimizer"] == "fa_hvd.optimizer"
    assert found[0]["ranks_agree"]
    assert found[0]["accuracy"] > 0.6  # plain Horovod with mean reaches 0.64 after 2 epochs
    assert "hvd.DistributedOptimizer -> fa_hvd" in proc.stderr + proc.stdout


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
