"""Faults in real 4-rank jobs: what faulty ranks send, robust rules staying finite, and
crashed, hung and slow ranks under plain horovodrun; the gradient faults under torchrun too."""

import subprocess
import time

import pytest

from conftest import LAUNCHERS, ROOT, SCRIPTS, job_env, launch, output, results
from train_helpers import kill_tree

pytestmark = pytest.mark.slow


JOBS = {"gloo": "horovod", "torchrun": "torch"}  # launcher -> transport


@pytest.fixture(scope="module", params=sorted(JOBS))
def report(request):
    proc = launch(request.param, 4, ["python", str(SCRIPTS / "faults_check.py"), "--transport", JOBS[request.param],
                                     "sent", "finite", "slow"])
    found = results(proc)
    assert proc.returncode == 0 and len(found) == 1, output(proc)
    return found[0]


def test_every_gradient_fault_changes_what_the_faulty_rank_sends(report):
    for kind, r in report["sent"].items():
        assert r["others_untouched"], kind
        assert r["changed"], kind
        assert r["counted"] == 1, kind
        if r["matches_formula"] is not None:
            assert r["matches_formula"], kind
    sent = report["sent"]
    assert sent["nan"]["all_nan"] and sent["inf"]["all_posinf"]
    assert sent["uniform"]["in_unit_interval"]
    assert 0 < sent["bitflip"]["changed_fraction"] < 0.6


def test_nan_and_inf_break_mean_but_not_the_robust_rules(report):
    for case, finite in report["finite"].items():
        kind, rule = case.split("/")
        assert finite == (rule != "mean"), case


def test_a_slow_rank_shows_in_everyones_step_time(report):
    slow = report["slow"]  # rank 1 sleeps delay_s (0.5 s) per slow step: half of it is the bar, the rest slack
    assert slow["during_s"] > slow["before_s"] + slow["delay_s"] / 2, slow


def _wrapped(launcher, faults, notice, tmp_path, env=None, timeout=150):
    """The synthetic-benchmark script under fa_hvd.wrap on 4 ranks with ``faults``. Returns the finished
    job and the seconds from ``notice`` (the faulty rank's line) in its output to its end: starting 4 ranks
    on a loaded machine is not the fault's to bound. ``timeout`` bounds the whole job."""
    cmd = LAUNCHERS[launcher](4) + ["python", "-m", "fa_hvd.wrap", str(SCRIPTS / "hvd_synthetic_style.py")]
    env = job_env({"FA_HVD_AGGREGATOR": "median", "FA_HVD_F": "1", "FA_HVD_FAULTS": faults, **(env or {})})
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"

    def said() -> bool:
        return any(notice in path.read_text() for path in (out, err))

    with open(out, "w") as stdout, open(err, "w") as stderr:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, text=True)
        deadline, seen = time.monotonic() + timeout, None
        try:
            while job.poll() is None and time.monotonic() < deadline:
                if seen is None and said():
                    seen = time.monotonic()
                time.sleep(0.05)
        finally:
            if job.poll() is None:
                kill_tree(job.pid)
        ended = time.monotonic()
        job.wait()
    proc = subprocess.CompletedProcess(cmd, job.returncode, out.read_text(), err.read_text())
    assert ended < deadline, f"the job ran past {timeout} s\n{output(proc)}"
    assert said(), output(proc)
    return proc, ended - (seen if seen is not None else ended)  # None: said in the job's last 50 ms


def test_a_crashed_rank_ends_the_job_with_its_rank_and_step(tmp_path):
    proc, after = _wrapped("gloo", "[{kind: crash, ranks: [2], start_step: 3}]",
                           "fa_hvd fault: rank 2 crashes at step 3", tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, output(proc)
    assert "the gradient exchange failed at step 3" in log or "exit with status code 13" in log
    assert after < 45, after  # from the crash to the job's end: seconds, well short of a hang


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_a_hung_rank_ends_the_job_within_the_bound(launcher, tmp_path):
    env = {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5", "HOROVOD_STALL_CHECK_TIME_SECONDS": "2",
           "FA_HVD_COLLECTIVE_TIMEOUT_SECONDS": "10"}
    proc, after = _wrapped(launcher, "[{kind: hang, ranks: [2], start_step: 3}]",
                           "fa_hvd fault: rank 2 hangs at step 3", tmp_path, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, output(proc)
    assert "the gradient exchange failed at step 3" in log, output(proc)
    if launcher == "gloo":  # fa_hvd's timeout fires: rank 2's roll call answers, it waits in no collective
        assert "s; in no collective (busy or hung): rank 2 (" in log, output(proc)
    else:  # Horovod's stall inspector shuts down first (5 s < 10 s) and names the missing rank; by then
        # every rank has left its wait, so the roll call can only say who does not answer (nobody)
        assert "Missing ranks" in log and "2" in log.split("Missing ranks", 1)[1][:40], output(proc)
    assert after < 60, after  # from the hang to the job's end: the 10 s bound (5 s under MPI) and the exit
