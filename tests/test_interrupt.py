"""A pytest run stopped with SIGTERM tears its fixtures down (tests/conftest.py), as Ctrl-C does."""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

STAND_IN = '''
import pathlib
import time

import pytest

MARKS = pathlib.Path(__file__).parent


@pytest.fixture(scope="session")
def cluster():
    (MARKS / "up").touch()
    yield
    (MARKS / "down").touch()


def test_long_job(cluster):
    (MARKS / "running").touch()
    time.sleep(60)
'''


def test_sigterm_tears_the_fixtures_down_as_ctrl_c_does(tmp_path):
    (tmp_path / "test_stand_in.py").write_text(STAND_IN)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_stand_in.py")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "running").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert (tmp_path / "up").exists() and (tmp_path / "down").exists(), out
    assert proc.returncode == 2 and "KeyboardInterrupt" in out, (proc.returncode, out)
