"""Horovod's own optimizer tests, run with Horovod's optimizer and again with fa_hvd's in its place.

    python tools/horovod_parity.py HOROVOD_SRC [--np 2] [--mpi] [-k EXPRESSION]

``HOROVOD_SRC``: a Horovod source tree (``git clone --branch v0.28.1 https://github.com/horovod/horovod``:
the release this repo builds); its ``test/parallel/test_torch.py`` and ``test/utils/`` are read,
never changed. The tests of ``test_torch.py`` whose code uses ``hvd.DistributedOptimizer``,
``hvd.broadcast_optimizer_state`` or ``hvd.broadcast_parameters`` (``-k`` narrows them further, as
pytest's) run twice under ``horovodrun`` (Gloo, or MPI with ``--mpi``): with Horovod's functions,
then with fa_hvd's in their place (``fa_hvd.DistributedOptimizer(..., aggregator="mean")``,
``fa_hvd.broadcast_optimizer_state``, ``fa_hvd.broadcast_parameters``). A test's outcome is its worst
over the ranks (error, failed, passed, skipped). The table says each test's outcome both ways; the
exit status is 0 when every test has the same outcome both ways, 1 when one differs or none ran.
A test that fails with Horovod's optimizer too (a newer torch than the test knew) is the same
outcome, not a difference.

Horovod's ``test/utils/common.py`` imports the ``mock`` package; where it is missing, the standard
library's ``unittest.mock`` stands in (the same API). As root, Open MPI's run-as-root variables are set.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SUBSTITUTED = ("DistributedOptimizer", "broadcast_optimizer_state", "broadcast_parameters")
TEST_FILE = Path("test") / "parallel" / "test_torch.py"
SEVERITY = ("skipped", "passed", "failed", "error")  # a test's outcome: its worst over the ranks
MODES = ("horovod", "fa_hvd")


def selected_tests(source: str) -> list[str]:
    """``Class::test_name`` of the test methods that use one of :data:`SUBSTITUTED` as an attribute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test_") and any(
                        isinstance(sub, ast.Attribute) and sub.attr in SUBSTITUTED for sub in ast.walk(item)):
                    found.append(f"{node.name}::{item.name}")
    return found


def outcomes(directory: Path, mode: str) -> dict[str, tuple[str, str]]:
    """Each test's outcome in ``mode`` and the first line of its failure or skip message: its worst over
    the ranks' JUnit reports."""
    result: dict[str, tuple[str, str]] = {}
    for report in sorted(directory.glob(f"{mode}-rank*.xml")):
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            found = {child.tag: child for child in case}
            tag = next((t for t in ("error", "failure", "skipped") if t in found), None)
            outcome = {"error": "error", "failure": "failed", "skipped": "skipped", None: "passed"}[tag]
            message = "" if tag is None else (found[tag].get("message") or "").strip()
            why = message.splitlines()[0][:160] if message else ""
            name, previous = case.get("name"), result.get(case.get("name"))
            if previous is None or SEVERITY.index(outcome) > SEVERITY.index(previous[0]):
                result[name] = (outcome, why)
    return result


def launcher(np: int, mpi: bool) -> list[str]:
    """``horovodrun`` beside this Python (the repo's ``.venv``), else the one on ``PATH``."""
    beside = Path(sys.executable).parent / "horovodrun"
    return [str(beside) if beside.exists() else "horovodrun", "--mpi" if mpi else "--gloo", "-np", str(np),
            "-H", f"localhost:{np}"]


def compare(source_tree: Path, np: int, mpi: bool, expression: str | None, hidden: list[str], timeout: float) -> int:
    test_file = source_tree / TEST_FILE
    if not test_file.is_file():
        print(f"horovod_parity: {test_file} not found (HOROVOD_SRC must be a Horovod source tree)", file=sys.stderr)
        return 2
    selection = [f"{test_file}::{name}" for name in selected_tests(test_file.read_text())]
    if not selection:
        print(f"horovod_parity: no test of {test_file} uses {', '.join(SUBSTITUTED)}", file=sys.stderr)
        return 1
    env = dict(os.environ)
    if os.getuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.TemporaryDirectory(prefix="horovod_parity-") as scratch:
        reports = Path(scratch)
        for mode in MODES:
            print(f"horovod_parity: {len(selection)} tests of {TEST_FILE} selected; running them with {mode}'s "
                  f"optimizer on {np} ranks ({'MPI' if mpi else 'Gloo'})", flush=True)
            narrowed = [] if expression is None else ["-k", expression]
            hide = [a for name in hidden for a in ("--skip-optimizer", name)]
            proc = subprocess.run(launcher(np, mpi) + [sys.executable, str(Path(__file__).resolve()), "--rank-mode",
                                                       mode, "--reports", str(reports), *narrowed, *hide, *selection],
                                  env=env, capture_output=True, text=True, timeout=timeout)
            if not list(reports.glob(f"{mode}-rank*.xml")):
                print(f"horovod_parity: no test report from the {mode} run (status {proc.returncode}):\n"
                      f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
                return 1
        results = {mode: outcomes(reports, mode) for mode in MODES}
    ran = sorted(set(results["horovod"]) | set(results["fa_hvd"]))
    if not ran:
        print("horovod_parity: no test ran", file=sys.stderr)
        return 1
    print(report(ran, results))
    differing = [name for name in ran if results["horovod"].get(name) != results["fa_hvd"].get(name)]
    print(f"horovod_parity: {len(ran) - len(differing)} of {len(ran)} tests have the same outcome with fa_hvd's "
          f"optimizer as with Horovod's" + (f"; differing: {', '.join(differing)}" if differing else ""))
    return 1 if differing else 0


def report(ran: list[str], results: dict) -> str:
    """One line per test (its outcome with each optimizer), then the reason of each outcome that has one."""
    width = max(map(len, ran))
    absent = ("-", "")
    lines = [f"{'test':{width}}  {'horovod':8}  fa_hvd"]
    reasons = []
    for name in ran:
        (ours, why), (theirs, their_why) = results["horovod"].get(name, absent), results["fa_hvd"].get(name, absent)
        same = (ours, why) == (theirs, their_why)
        lines.append(f"{name:{width}}  {ours:8}  {theirs}{'' if same else '  <- differs'}")
        if why or their_why:
            reasons.append(f"  {name}: horovod: {why or '-'}" + ("" if same else f"; fa_hvd: {their_why or '-'}"))
    return "\n".join(lines + (["why (the same with both unless both are given):"] + reasons if reasons else []))


def rank_run(mode: str, reports: Path, expression: str | None, tests: list[str], hidden: list[str]) -> int:
    """One rank of a run: pytest on ``tests`` (node ids), fa_hvd's functions in Horovod's place in mode fa_hvd,
    the optimizer classes named in ``hidden`` left out of ``torch.optim.Optimizer.__subclasses__()``."""
    import functools
    import unittest.mock

    import pytest
    import torch

    if hidden:
        listed = torch.optim.Optimizer.__subclasses__
        torch.optim.Optimizer.__subclasses__ = classmethod(
            lambda cls: [c for c in listed() if c.__name__ not in hidden] if cls is torch.optim.Optimizer
            else type.__subclasses__(cls))

    try:
        import mock  # noqa: F401 - Horovod's test utilities import it
    except ImportError:
        sys.modules["mock"] = unittest.mock
    if mode == "fa_hvd":
        import horovod.torch as hvd

        import fa_hvd

        hvd.DistributedOptimizer = functools.partial(fa_hvd.DistributedOptimizer, aggregator="mean")
        hvd.broadcast_optimizer_state = fa_hvd.broadcast_optimizer_state
        hvd.broadcast_parameters = fa_hvd.broadcast_parameters
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    narrowed = [] if expression is None else ["-k", expression]
    return pytest.main(["-q", "-p", "no:cacheprovider", *narrowed, f"--junitxml={reports / f'{mode}-rank{rank}.xml'}",
                        *tests])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="horovod_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="+", help="a Horovod source tree (HOROVOD_SRC)")
    parser.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--mpi", action="store_true", help="horovodrun --mpi instead of --gloo")
    parser.add_argument("-k", dest="expression", help="narrow the selected tests, as pytest's -k")
    parser.add_argument("--skip-optimizer", action="append", default=[], metavar="NAME",
                        help="leave torch.optim.NAME out of the optimizers the tests loop over, with both optimizers "
                             "(a torch newer than the tests: Muon takes 2-D parameters only); repeatable")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per horovodrun job")
    parser.add_argument("--rank-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--reports", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_mode is not None:
        return rank_run(args.rank_mode, args.reports, args.expression, args.source, args.skip_optimizer)
    if len(args.source) != 1:
        parser.error("give one HOROVOD_SRC")
    if args.np < 1:
        parser.error(f"--np must be at least 1, got {args.np}")
    return compare(Path(args.source[0]), args.np, args.mpi, args.expression, args.skip_optimizer, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
