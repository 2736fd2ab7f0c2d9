"""Horovod's own optimizer tests, run with Horovod's optimizer and again with fa_hvd's in its place.

    python tools/horovod_parity.py HOROVOD_SRC [--suites torch,elastic] [--np 2] [--mpi] [-k EXPRESSION]
                                   [--skip-optimizer NAME]

``HOROVOD_SRC``: a Horovod source tree (``git clone --branch v0.28.1 https://github.com/horovod/horovod``:
the release this repo builds); its tests are read, never changed. Two suites:

- ``torch``: the tests of ``test/parallel/test_torch.py`` whose code uses ``hvd.DistributedOptimizer``,
  ``hvd.broadcast_optimizer_state`` or ``hvd.broadcast_parameters``, on ``--np`` ranks under
  ``horovodrun`` (Gloo, or MPI with ``--mpi``);
- ``elastic``: ``test/integration/test_elastic_torch.py``, Horovod's elastic jobs (hosts added and
  removed, ranks that fail) whose training script wraps its optimizer with ``hvd.DistributedOptimizer``.

Each runs twice: with Horovod's functions, then with fa_hvd's in their place in every Python process the
run starts (``fa_hvd.DistributedOptimizer(..., aggregator="mean")``, ``fa_hvd.broadcast_optimizer_state``,
``fa_hvd.broadcast_parameters``, put into ``horovod.torch`` as it is imported: :func:`install`, loaded by a
``sitecustomize`` on ``PYTHONPATH``). A test's outcome is its worst over the ranks (error, failed,
passed, skipped) with the first line of its reason. The table says each test's outcome both ways; the
exit status is 0 when every test has the same outcome both ways, 1 when one differs or none
ran. A test that fails with Horovod's optimizer too (a newer torch than the test knew, a timing the
machine cannot keep) is the same outcome, not a difference; where the two reasons differ (a count
that hinges on timing) the table says so and gives both.

Horovod's test utilities import the ``mock`` package; where it is missing, the standard library's
``unittest.mock`` stands in (the same API). As root, Open MPI's run-as-root variables are set.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SUBSTITUTED = ("DistributedOptimizer", "broadcast_optimizer_state", "broadcast_parameters")
SUITES = {"torch": Path("test") / "parallel" / "test_torch.py",
          "elastic": Path("test") / "integration" / "test_elastic_torch.py"}
UTILS = Path("test") / "utils"
SEVERITY = ("skipped", "passed", "failed", "error")  # a test's outcome: its worst over the ranks
MODES = ("horovod", "fa_hvd")
MODE_ENV = "FA_HVD_PARITY_MODE"


def install(mode: str) -> None:
    """In this process: ``mock`` where it is missing; in mode ``fa_hvd``, fa_hvd's functions put into
    ``horovod.torch`` as soon as it is imported (whoever imports it first)."""
    import unittest.mock

    try:
        import mock  # noqa: F401 - Horovod's test utilities import it
    except ImportError:
        sys.modules["mock"] = unittest.mock
    if mode == "fa_hvd":
        sys.meta_path.insert(0, _HorovodTorchFinder())


def substitute(hvd) -> None:
    """fa_hvd's optimizer (with the mean) and broadcasts in ``horovod.torch``'s place."""
    import functools

    import fa_hvd

    hvd.DistributedOptimizer = functools.partial(fa_hvd.DistributedOptimizer, aggregator="mean")
    hvd.broadcast_optimizer_state = fa_hvd.broadcast_optimizer_state
    hvd.broadcast_parameters = fa_hvd.broadcast_parameters


class _HorovodTorchFinder(importlib.abc.MetaPathFinder):
    """Finds ``horovod.torch`` as the other finders do, with a loader that runs :func:`substitute` after it."""

    def find_spec(self, name, path, target=None):
        if name != "horovod.torch":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        spec.loader = _SubstitutingLoader(spec.loader)
        return spec


class _SubstitutingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        substitute(module)


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
    """Each test's outcome in ``mode`` (keyed ``module.Class::test``, so that suites may share test
    names) and the first line of its failure or skip message: its worst over the JUnit reports (one per
    rank)."""
    result: dict[str, tuple[str, str]] = {}
    for report in sorted(directory.glob(f"{mode}-*.xml")):
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            found = {child.tag: child for child in case}
            tag = next((t for t in ("error", "failure", "skipped") if t in found), None)
            outcome = {"error": "error", "failure": "failed", "skipped": "skipped", None: "passed"}[tag]
            message = "" if tag is None else (found[tag].get("message") or "").strip()
            why = message.splitlines()[0][:160] if message else ""
            name = f"{case.get('classname')}::{case.get('name')}"
            previous = result.get(name)
            if previous is None or SEVERITY.index(outcome) > SEVERITY.index(previous[0]):
                result[name] = (outcome, why)
    return result


def horovodrun() -> str:
    """``horovodrun`` beside this Python (the repo's ``.venv``), else the one on ``PATH``."""
    beside = Path(sys.executable).parent / "horovodrun"
    return str(beside) if beside.exists() else "horovodrun"


def suite_command(suite: str, test_file: Path, mode: str, reports: Path, np: int, mpi: bool,
                  narrowed: list[str], hidden: list[str]) -> list[str] | None:
    """The command that runs ``suite`` in ``mode``, writing its JUnit reports into ``reports``; None when
    ``test_file`` has no test to run."""
    if suite == "elastic":  # pytest itself runs the elastic driver, which starts the ranks
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *narrowed,
                f"--junitxml={reports / f'{mode}-elastic.xml'}", str(test_file)]
    selection = [f"{test_file}::{name}" for name in selected_tests(test_file.read_text())]
    if not selection:
        return None
    hide = [a for name in hidden for a in ("--skip-optimizer", name)]
    return [horovodrun(), "--mpi" if mpi else "--gloo", "-np", str(np), "-H", f"localhost:{np}", sys.executable,
            str(Path(__file__).resolve()), "--rank-mode", mode, "--reports", str(reports), *narrowed, *hide,
            *selection]


def compare(source_tree: Path, suites: list[str], np: int, mpi: bool, expression: str | None, hidden: list[str],
            timeout: float) -> int:
    missing = [str(source_tree / SUITES[s]) for s in suites if not (source_tree / SUITES[s]).is_file()]
    if missing:
        print(f"horovod_parity: {', '.join(missing)} not found (HOROVOD_SRC must be a Horovod source tree)",
              file=sys.stderr)
        return 2
    narrowed = [] if expression is None else ["-k", expression]
    results: dict[str, dict[str, tuple[str, str]]] = {mode: {} for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="horovod_parity-") as scratch:
        scratch = Path(scratch)
        (scratch / "sitecustomize.py").write_text(
            f"import os\nimport horovod_parity\n\nhorovod_parity.install(os.environ.get({MODE_ENV!r}, 'horovod'))\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(scratch), str(Path(__file__).resolve().parent), str(source_tree / UTILS),
             *filter(None, [os.environ.get("PYTHONPATH")])]))
        if os.getuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        for suite in suites:
            test_file = source_tree / SUITES[suite]
            for mode in MODES:
                reports = scratch / suite
                reports.mkdir(exist_ok=True)
                command = suite_command(suite, test_file, mode, reports, np, mpi, narrowed, hidden)
                if command is None:
                    print(f"horovod_parity: no test of {test_file} uses {', '.join(SUBSTITUTED)}", file=sys.stderr)
                    break
                print(f"horovod_parity: {SUITES[suite]} with {mode}'s optimizer", flush=True)
                proc = subprocess.run(command, cwd=test_file.parent, env={**env, MODE_ENV: mode},
                                      capture_output=True, text=True, timeout=timeout)
                if not list(reports.glob(f"{mode}-*.xml")):
                    print(f"horovod_parity: no test report from {SUITES[suite]} with {mode}'s optimizer (status "
                          f"{proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
                    return 1
                results[mode].update(outcomes(reports, mode))
    ran = sorted(set(results["horovod"]) | set(results["fa_hvd"]))
    if not ran:
        print("horovod_parity: no test ran", file=sys.stderr)
        return 1
    print(report(ran, results))
    outcome = {mode: {name: results[mode].get(name, ("-",))[0] for name in ran} for mode in MODES}
    differing = [name for name in ran if outcome["horovod"][name] != outcome["fa_hvd"][name]]
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
        note = "  <- differs" if ours != theirs else "  (reasons differ)" if why != their_why else ""
        lines.append(f"{name:{width}}  {ours:8}  {theirs}{note}")
        if why or their_why:
            both = "" if why == their_why else f"; fa_hvd: {their_why or '-'}"
            reasons.append(f"  {name}: horovod: {why or '-'}{both}")
    return "\n".join(lines + (["why (the same with both unless both are given):"] + reasons if reasons else []))


def rank_run(mode: str, reports: Path, expression: str | None, tests: list[str], hidden: list[str]) -> int:
    """One rank of a ``torch`` run: pytest on ``tests`` (node ids) with this rank's JUnit report, the optimizer
    classes named in ``hidden`` left out of ``torch.optim.Optimizer.__subclasses__()``."""
    import pytest
    import torch

    if hidden:
        listed = torch.optim.Optimizer.__subclasses__
        torch.optim.Optimizer.__subclasses__ = classmethod(
            lambda cls: [c for c in listed() if c.__name__ not in hidden] if cls is torch.optim.Optimizer
            else type.__subclasses__(cls))
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    narrowed = [] if expression is None else ["-k", expression]
    return pytest.main(["-q", "-p", "no:cacheprovider", *narrowed, f"--junitxml={reports / f'{mode}-rank{rank}.xml'}",
                        *tests])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="horovod_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="+", help="a Horovod source tree (HOROVOD_SRC)")
    parser.add_argument("--suites", default="torch,elastic", help="comma list of torch, elastic (default: both)")
    parser.add_argument("--np", type=int, default=2, help="ranks of the torch suite (default 2)")
    parser.add_argument("--mpi", action="store_true", help="the torch suite under horovodrun --mpi instead of --gloo")
    parser.add_argument("-k", dest="expression", help="narrow the tests, as pytest's -k")
    parser.add_argument("--skip-optimizer", action="append", default=[], metavar="NAME",
                        help="leave torch.optim.NAME out of the optimizers the torch suite loops over, with both "
                             "optimizers (a torch newer than the tests: Muon takes 2-D parameters only); repeatable")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run of a suite")
    parser.add_argument("--rank-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--reports", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_mode is not None:
        return rank_run(args.rank_mode, args.reports, args.expression, args.source, args.skip_optimizer)
    if len(args.source) != 1:
        parser.error("give one HOROVOD_SRC")
    suites = args.suites.split(",")
    if not suites or any(s not in SUITES for s in suites):
        parser.error(f"--suites: a comma list of {', '.join(SUITES)}, got {args.suites!r}")
    if args.np < 1:
        parser.error(f"--np must be at least 1, got {args.np}")
    return compare(Path(args.source[0]), suites, args.np, args.mpi, args.expression, args.skip_optimizer,
                   args.timeout)


if __name__ == "__main__":
    sys.exit(main())
