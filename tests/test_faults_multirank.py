"""Faults in real 4-rank jobs: what faulty ranks send, robust rules staying finite, and
crashed, hung and slow ranks under plain horovodrun; the gradient faults under torchrun too."""

import time

import pytest

from conftest import SCRIPTS, launch, output, results

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


def _wrapped(kind, launcher, faults, env=None):
    start = time.monotonic()
    proc = launch(launcher, 4, ["python", "-m", "fa_hvd.wrap", str(SCRIPTS / "hvd_synthetic_style.py")],
                  env={"FA_HVD_AGGREGATOR": "median", "FA_HVD_F": "1", "FA_HVD_FAULTS": faults, **(env or {})},
                  timeout=150)
    return proc, time.monotonic() - start


def test_a_crashed_rank_ends_the_job_with_its_rank_and_step():
    proc, elapsed = _wrapped("crash", "gloo", "[{kind: crash, ranks: [2], start_step: 3}]")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, output(proc)
    assert "fa_hvd fault: rank 2 crashes at step 3" in log
    assert "the gradient exchange failed at step 3" in log or "exit with status code 13" in log
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_a_hung_rank_ends_the_job_within_the_bound(launcher):
    env = {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5", "HOROVOD_STALL_CHECK_TIME_SECONDS": "2",
           "FA_HVD_COLLECTIVE_TIMEOUT_SECONDS": "10"}
    proc, elapsed = _wrapped("hang", launcher, "[{kind: hang, ranks: [2], start_step: 3}]", env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, output(proc)
    assert "fa_hvd fault: rank 2 hangs at step 3" in log
    assert "the gradient exchange failed at step 3" in log, output(proc)
    if launcher == "gloo":  # fa_hvd's timeout fires: rank 2's roll call answers, it waits in no collective
        assert "s; in no collective (busy or hung): rank 2 (" in log, output(proc)
    else:  # Horovod's stall inspector shuts down first (5 s < 10 s) and names the missing rank; by then
        # every rank has left its wait, so the roll call can only say who does not answer (nobody)
        assert "Missing ranks" in log and "2" in log.split("Missing ranks", 1)[1][:40], output(proc)
    assert elapsed < 90, elapsed
