"""A bad number on any command line is one usage error naming its option (exit 2), never a traceback."""

import argparse
import importlib

import pytest

from fa_hvd.cli_types import integer_at_least, integers_at_least, number_at_least


def test_integer_at_least():
    assert integer_at_least(0)("0") == 0 and integer_at_least(1)("12") == 12
    for text in ("0", "-3", "x", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected an integer >= 1, got {text!r}"):
            integer_at_least(1)(text)
    assert integers_at_least(0)("0,5") == [0, 5]
    with pytest.raises(argparse.ArgumentTypeError, match="expected a comma list of integers >= 0, got '1,-2'"):
        integers_at_least(0)("1,-2")
    assert number_at_least(0.0)("0.5") == 0.5
    for text in ("-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a number >= 0.0, got {text!r}"):
            number_at_least(0.0)(text)


@pytest.mark.parametrize("module,argv,option", [
    ("fa_hvd.bench.cli", ["robustness", "--n", "0"], "--n"),
    ("fa_hvd.bench.cli", ["robustness", "--directions", "-1"], "--directions"),
    ("fa_hvd.bench.cli", ["robustness", "--seed", "-1"], "--seed"),
    ("fa_hvd.bench.cli", ["checkpoint", "--rounds", "0"], "--rounds"),
    ("fa_hvd.bench.cli", ["checkpoint", "--mib", "x"], "--mib"),
    ("fa_hvd.bench.cli", ["step", "--steps", "0"], "--steps"),
    ("fa_hvd.bench.cli", ["step", "--rounds", "0"], "--rounds"),
    ("fa_hvd.bench.cli", ["aggregators", "--f", "-1"], "--f"),
    ("fa_hvd.bench.cli", ["aggregators", "--lambda", "-1"], "--lambda"),
    ("fa_hvd.bench.cli", ["gather", "--mib", "0"], "--mib"),
    ("fa_hvd.eval.cli", ["--grid", "configs/eval/standing.yaml", "--jobs", "0"], "--jobs"),
    ("fa_hvd.eval.suspects", ["--grid", "configs/eval/standing.yaml", "--window", "0"], "--window"),
    ("fa_hvd.demo", ["--np", "0"], "--np"),
])
def test_a_bad_number_is_a_usage_error_naming_its_option(module, argv, option, capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: argument {option}: expected " in err.splitlines()[-1], err
