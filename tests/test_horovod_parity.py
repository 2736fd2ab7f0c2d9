"""``tools/horovod_parity.py`` on a stand-in for Horovod's source tree that the test writes: which tests
it selects, that it runs them with both optimizers under horovodrun (ranks that the tool starts, and
ranks that a test starts, as Horovod's elastic tests do), and that a test whose outcome differs makes it
fail naming the test (Horovod's real tests are not in CI)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, job_env

TOOL = ROOT / "tools" / "horovod_parity.py"

STAND_IN = '''
import os
import sys
import unittest

import torch
import horovod.torch as hvd

sys.path.append(os.path.join(os.path.dirname(__file__), os.pardir, "utils"))
from common import sentinel  # as Horovod's tests import theirs


class TorchTests(unittest.TestCase):
    def test_gradients_are_averaged(self):
        hvd.init()
        w = torch.nn.Parameter(torch.zeros(3))
        opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=1.0), named_parameters=[("w", w)])
        (w * (hvd.rank() + 1.0)).sum().backward()
        opt.step()
        assert torch.equal(w.detach(), torch.full((3,), -(hvd.size() + 1) / 2))

    def test_the_optimizer_class_comes_from_horovod(self):
        hvd.init()
        opt = hvd.DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
        assert type(opt).__module__.startswith("horovod"), type(opt).__module__

    def test_the_optimizers_looped_over_leave_out_the_hidden_one(self):
        names = {c.__name__ for c in torch.optim.Optimizer.__subclasses__()}
        assert "Adam" not in names and "SGD" in names and hvd.broadcast_parameters, names

    def test_an_allreduce_alone_is_not_selected(self):
        hvd.init()
        raise AssertionError("selected, but it uses none of the substituted functions")
'''


ELASTIC_STAND_IN = '''
import os
import subprocess
import unittest

import mock  # as Horovod's elastic tests import it


class ElasticTorchTests(unittest.TestCase):
    def test_hosts_added_and_removed(self):
        script = os.path.join(os.path.dirname(__file__), "data", "elastic_torch_main.py")
        proc = subprocess.run(["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2", "python", script],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "averaged, optimizer from horovod" in proc.stdout, proc.stdout[-300:]

    def test_the_optimizer_class_comes_from_horovod(self):  # a name the torch suite has too
        pass
'''

ELASTIC_SCRIPT = '''
import torch
import horovod.torch as hvd

hvd.init()
w = torch.nn.Parameter(torch.zeros(2))
opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=1.0), named_parameters=[("w", w)])
(w * (hvd.rank() + 1.0)).sum().backward()
opt.step()
assert torch.equal(w.detach(), torch.full((2,), -(hvd.size() + 1) / 2))
print("averaged, optimizer from", type(opt).__module__.split(".")[0])
'''


@pytest.fixture
def horovod_src(tmp_path):
    for directory in ("parallel", "utils", "integration/data"):
        (tmp_path / "test" / directory).mkdir(parents=True)
    (tmp_path / "test" / "parallel" / "test_torch.py").write_text(textwrap.dedent(STAND_IN))
    (tmp_path / "test" / "utils" / "common.py").write_text("import mock\nsentinel = mock.sentinel.horovod\n")
    (tmp_path / "test" / "integration" / "test_elastic_torch.py").write_text(textwrap.dedent(ELASTIC_STAND_IN))
    (tmp_path / "test" / "integration" / "data" / "elastic_torch_main.py").write_text(textwrap.dedent(ELASTIC_SCRIPT))
    return tmp_path


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], env=job_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_parity_tool_runs_horovods_optimizer_tests_both_ways_and_names_a_difference(horovod_src):
    proc = run_tool(str(horovod_src), "--skip-optimizer", "Adam")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("test_")}
    torch_tests, elastic_tests = "test_torch.TorchTests::", "test_elastic_torch.ElasticTorchTests::"
    assert table == {  # keyed by module and class: a name in both suites is two tests
        torch_tests + "test_gradients_are_averaged": ["passed", "passed"],
        torch_tests + "test_the_optimizer_class_comes_from_horovod": ["passed", "failed", "<-", "differs"],
        torch_tests + "test_the_optimizers_looped_over_leave_out_the_hidden_one": ["passed", "passed"],
        elastic_tests + "test_hosts_added_and_removed": ["passed", "failed", "<-", "differs"],
        elastic_tests + "test_the_optimizer_class_comes_from_horovod": ["passed", "passed"]}, proc.stdout
    assert "AssertionError: fa_hvd.optimizer" in proc.stdout  # the reason, as the failing rank gave it
    assert "averaged, optimizer from fa_hvd" in proc.stdout  # the ranks the elastic test started had fa_hvd's
    assert "3 of 5 tests have the same outcome" in proc.stdout
    assert (f"differing: {elastic_tests}test_hosts_added_and_removed, "
            f"{torch_tests}test_the_optimizer_class_comes_from_horovod") in proc.stdout

    proc = run_tool(str(horovod_src), "--suites", "torch", "-k", "averaged")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 of 1 tests have the same outcome" in proc.stdout, proc.stdout


def test_the_parity_tool_refuses_a_tree_without_horovods_test_file(tmp_path):
    proc = run_tool(str(tmp_path))
    assert proc.returncode == 2 and "HOROVOD_SRC must be a Horovod source tree" in proc.stderr, proc.stderr
