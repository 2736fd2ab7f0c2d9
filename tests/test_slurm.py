"""The slurm/ scripts on a real single-node SLURM cluster (tools/slurm/cluster.sh).

One cluster for the module. Every job is submitted up front (fixture ``jobs``) and runs
beside the others (the cluster declares more CPUs than the machine has); each test waits
for its own job and checks what it did: 4 ranks on the embedded digits, a few dozen
steps. Needs root (the daemons) and SLURM, or apt-get to install it; otherwise every test
here is skipped and says why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, job_env, slurm_job, slurm_log

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
CPU_JOB = ["--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=0", "--cpus-per-task=1"]
STEPS = 60
SLOW_S = 0.75  # rank 3 sleeps this long every step: 45 s, past SLURM's first time-limit check (<= 30 s)
GRID = {  # two cells: mean and FA on 4 simulated workers, one of them sending noise
    "trainer": {"train": {"steps": 30}}, "seeds": 1, "splits": {"iid": None}, "workers": [[4, 1]],
    "rules": {"mean": "mean", "flag": "flag"}, "faults": {"gaussian": [{"kind": "gaussian"}]},
}


def cluster_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: tools/slurm/cluster.sh runs slurmctld and slurmd as root and munged as user munge"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install Debian's slurmctld slurmd slurm-client munge"
    return None


class Cluster:
    """The test cluster: submit the repo's scripts, wait for jobs, read what they wrote."""

    def __init__(self, env: dict, tmp: Path):
        self.env, self.tmp = env, tmp

    def submit(self, name: str, args: list[str], env: dict | None = None) -> str:
        """``sbatch ARGS`` from the repository root, the log in tmp/NAME-JOBID.out; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={self.tmp}/{name}-%j.out", *args],
                              cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def info(self, job: str) -> dict:
        return slurm_job(lambda: subprocess.run(["scontrol", "show", "job", "-o", job], env=self.env,
                                                capture_output=True, text=True), job)

    def wait(self, job: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while (info := self.info(job))["JobState"] not in TERMINAL:
            assert time.monotonic() < deadline, f"job {job} still {info['JobState']} after {timeout} s:\n{self.log(job)}"
            time.sleep(1)
        return info

    def scontrol(self, *args: str) -> None:
        subprocess.run(["scontrol", *args], env=self.env, check=True, capture_output=True)

    def log(self, job: str) -> str:
        return slurm_log(self.tmp, job)

    def run_dir(self, name: str) -> Path:
        return self.tmp / "runs" / name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    for stale in Path("/tmp").glob("fa_hvd-slurm-*"):  # left by a killed session: its daemons too
        if stale.name.rpartition("-")[2].isdigit() and not Path(f"/proc/{stale.name.rpartition('-')[2]}").exists():
            subprocess.run(["tools/slurm/cluster.sh", "down", str(stale)], cwd=ROOT, capture_output=True)
    state = Path(f"/tmp/fa_hvd-slurm-{os.getpid()}")  # munged (user munge) cannot enter pytest's 0700 tmp
    start = time.perf_counter()
    proc = subprocess.run(["tools/slurm/cluster.sh", "up", str(state)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "FA_HVD_SLURM_CPUS": "32"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\n[test_slurm] cluster up in {time.perf_counter() - start:.1f} s")
    env = {k: v for k, v in job_env().items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(SLURM_CONF=str(state / "slurm.conf"), SBATCH_PARTITION="debug", FA_HVD_ROOT=str(ROOT))
    yield Cluster(env, tmp_path_factory.mktemp("slurm-jobs"))
    subprocess.run(["tools/slurm/cluster.sh", "down", str(state)], cwd=ROOT, capture_output=True, text=True)


def write_config(path: Path, faults: list, steps: int = STEPS, **robust) -> Path:
    """configs/demo.yaml with ``steps`` steps, the given faults and robust settings."""
    conf = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    conf["train"].update(steps=steps, eval_every_epochs=1)
    conf["robust"].update(robust)
    conf["faults"] = faults
    path.write_text(yaml.safe_dump(conf))
    return path


@pytest.fixture(scope="module")
def jobs(cluster):
    """Submit every job of the module at once; returns {name: job id}."""
    tmp = cluster.tmp
    reverse = {"kind": "reverse", "ranks": [3]}
    slow = {"kind": "slow", "ranks": [3], "params": {"delay": SLOW_S}}
    train = write_config(tmp / "train.yaml", [reverse, slow])
    crash = write_config(tmp / "crash.yaml", [{"kind": "crash", "ranks": [2], "start_step": 5}])
    krum = write_config(tmp / "krum.yaml", [], aggregator="krum", aggregator_params={"f": 1})
    evict = write_config(tmp / "evict.yaml", [reverse], evict={"window": 5, "threshold": 0.2})
    endless = write_config(tmp / "endless.yaml", [{"kind": "slow", "ranks": [0], "params": {"delay": SLOW_S}}],
                           steps=10_000, aggregator="mean", aggregator_params={"f": 0})

    def train_job(name, config, *sbatch_args, env=None, extra=()):
        args = [*CPU_JOB, *sbatch_args, "slurm/train.sbatch", str(config), *extra, "--run-dir",
                str(cluster.run_dir(name))]
        return cluster.submit(name, args, env)

    grid = tmp / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    submit_eval = subprocess.run(["slurm/submit-eval.sh", str(grid), "--out", str(tmp / "eval")], cwd=ROOT,
                                 env={**cluster.env, "SBATCH_OUTPUT": f"{tmp}/%x-%A_%a.out"}, capture_output=True,
                                 text=True)
    assert submit_eval.returncode == 0, submit_eval.stderr
    submitted = {
        "eval_report": submit_eval.stdout.split()[-1].split(";")[0],
        "srun": train_job("srun", train, "--time=30"),
        "horovodrun": train_job("horovodrun", train, "--time=30", env={"FA_HVD_LAUNCHER": "horovodrun"}),
        # --time=2 with the script's --signal=B:USR1@300: USR1 at SLURM's first check
        "time_limit": train_job("time_limit", train, "--time=2"),
        # the same, submitted with --resume never: only the first start starts over
        "time_limit_never": train_job("time_limit_never", train, "--time=2", extra=["--resume", "never"]),
        "crash": train_job("crash", crash, "--time=30"),
        "krum": train_job("krum", krum, "--time=30"),
        "evict": train_job("evict", evict, "--time=30"),
        "missing": cluster.submit("missing", [*CPU_JOB, "slurm/train.sbatch", "configs/no-such-config.yaml"]),
        # one rank, stepping until cancelled
        "cancel": train_job("cancel", endless, "--time=30", "--ntasks-per-node=1"),
    }
    actions = [
        # SLURM signals each start of a job once, at its first check when the limit is this short:
        # once the first USR1 has arrived, give the job time, so that its requeued start (with an
        # equally short limit) is not signalled again at once.
        (lambda: "[train.sbatch] got SIGUSR1" in cluster.log(submitted["time_limit"]),
         lambda: cluster.scontrol("update", f"JobId={submitted['time_limit']}", "TimeLimit=10")),
        (lambda: "[train.sbatch] got SIGUSR1" in cluster.log(submitted["time_limit_never"]),
         lambda: cluster.scontrol("update", f"JobId={submitted['time_limit_never']}", "TimeLimit=10")),
        (lambda: (cluster.run_dir("cancel") / "metrics.jsonl").exists() and step_records(cluster, "cancel"),
         lambda: subprocess.run(["scancel", submitted["cancel"]], env=cluster.env, check=True)),
    ]
    stop = threading.Event()
    watcher = threading.Thread(target=act_once_when, args=(actions, stop), daemon=True)
    watcher.start()
    start = time.monotonic()
    yield submitted
    stop.set()
    print(f"\n[test_slurm] {time.monotonic() - start:.0f} s from submission to the last test's end")
    for name, job in submitted.items():
        info = cluster.info(job)
        print(f"[test_slurm] {name:12s} job {job}: {info['JobState']:10s} run time {info['RunTime']} "
              f"(last start), restarts {info['Restarts']}, submitted {info['SubmitTime']}, ended {info['EndTime']}")


def act_once_when(actions: list, stop: threading.Event) -> None:
    """Every second, run each ``(condition, action)``'s action once its condition holds."""
    todo = list(actions)
    while todo and not stop.wait(1):
        for condition, action in list(todo):
            if condition():
                action()
                todo.remove((condition, action))


def summary(cluster, name: str) -> dict:
    return json.loads((cluster.run_dir(name) / "summary.json").read_text())


def step_records(cluster, name: str) -> list[dict]:
    lines = (cluster.run_dir(name) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "step"]


def test_train_job_trains_and_writes_metrics(cluster, jobs):
    job = jobs["srun"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "[train.sbatch] + srun --mpi=pmix --kill-on-bad-exit=0 --wait=60" in log, log
    result = summary(cluster, "srun")
    assert (result["status"], result["step"], result["world_size"]) == ("finished", STEPS, 4), result
    steps = [r["step"] for r in step_records(cluster, "srun")]
    assert steps == sorted(steps) and len(steps) >= STEPS // 10 and steps[-1] >= STEPS - 10, steps
    assert result["final"]["test_accuracy"] > 0.5, result  # FA trains through rank 3's reversed gradients


def test_horovodrun_job_ends_with_the_same_parameters(cluster, jobs):
    job = jobs["horovodrun"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "[train.sbatch] + horovodrun -np 4 -H " in log, log
    cluster.wait(jobs["srun"])
    assert summary(cluster, "horovodrun")["params_crc32"] == summary(cluster, "srun")["params_crc32"]


def test_time_limit_checkpoints_requeues_and_resumes_bit_exactly(cluster, jobs):
    job = jobs["time_limit"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert int(info["Restarts"]) >= 1, log
    for line in ("[train.sbatch] got SIGUSR1", "[train.sbatch] + kill -s USR1", "[train.sbatch] checkpoint written",
                 "[train.sbatch] + scontrol requeue", f"job {job} (restart 1)"):
        assert line in log, (line, log)
    assert list((cluster.run_dir("time_limit") / "checkpoints").iterdir()), "no checkpoint"
    result = summary(cluster, "time_limit")
    assert (result["status"], result["step"]) == ("finished", STEPS), result
    cluster.wait(jobs["srun"])
    assert result["params_crc32"] == summary(cluster, "srun")["params_crc32"]


def test_resume_never_starts_over_once_and_the_requeue_resumes(cluster, jobs):
    """sbatch slurm/train.sbatch CONFIG --resume never, then a time-limit USR1: the requeued start
    resumes (--resume auto) from the checkpoint instead of starting over."""
    job = jobs["time_limit_never"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert int(info["Restarts"]) >= 1, log
    first, _, requeued = log.partition(f"job {job} (restart 1)")
    assert "--resume never" in first and "--resume auto" not in first, log
    assert "--resume auto" in requeued and "--resume never" not in requeued, log
    assert "resumed at step" in requeued and "--resume never: deleted" not in requeued, log
    result = summary(cluster, "time_limit_never")
    assert (result["status"], result["step"]) == ("finished", STEPS), result
    cluster.wait(jobs["srun"])
    assert result["params_crc32"] == summary(cluster, "srun")["params_crc32"]


def test_scancel_checkpoints_and_is_not_requeued(cluster, jobs):
    job = jobs["cancel"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    for line in ("[train.sbatch] got SIGTERM", "[train.sbatch] checkpoint written after SIGTERM", "not requeued"):
        assert line in log, (line, log)
    result = summary(cluster, "cancel")
    assert result["status"] == "preempted" and 0 < result["step"] < 10_000, result
    assert list((cluster.run_dir("cancel") / "checkpoints").iterdir()), "no checkpoint"


def test_a_crashed_rank_ends_the_job_and_is_named(cluster, jobs):
    job = jobs["crash"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert info["JobState"] == "FAILED", log
    assert "rank 2 crashes at step 5" in log, log
    assert "task 2: Exited with exit code 13" in log, log  # srun's line, not the fault's own
    assert "[train.sbatch] training failed with exit status" in log, log
    assert int(info["Restarts"]) == 0
    # The last step record was written just before the crash; the job ended within seconds of it,
    # far below the hang timeouts (FA_HVD_COLLECTIVE_TIMEOUT_SECONDS: 330 s): srun --wait=60 ended
    # the others (plus KillWait, 30 s here as SLURM's default).
    last_step = (cluster.run_dir("crash") / "metrics.jsonl").stat().st_mtime
    ended = datetime.strptime(info["EndTime"], "%Y-%m-%dT%H:%M:%S").timestamp()
    assert ended - last_step < 120, (info["EndTime"], last_step)


def test_an_evicted_node_is_excluded_from_the_requeued_job(cluster, jobs):
    """robust.evict names rank 3 (-100 x its gradient) and its node, the cluster's only one: the ranks stop
    with a checkpoint and status 76, and the script requeues the job held, while a job of its own sets that
    node in ExcNodeList (SLURM takes none for a running job) and releases it: it waits, with no other node
    to run on."""
    job = jobs["evict"]

    def released() -> bool:  # the helper job's log says so (SLURM then zeroes the priority of a job no node fits)
        return any(f"released {job}" in log.read_text() for log in cluster.run_dir("evict").glob("exclude-*.out"))

    deadline = time.monotonic() + 600
    while not released():
        info = cluster.info(job)
        assert info["JobState"] not in TERMINAL and time.monotonic() < deadline, (info, cluster.log(job))
        time.sleep(1)
    info = cluster.info(job)
    subprocess.run(["scancel", job], env=cluster.env, check=True)
    log = cluster.log(job)
    node = (cluster.run_dir("evict") / "excluded_hosts").read_text().split()
    assert node == [info["ExcNodeList"]] and (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info, log)
    assert info["Reason"] != "job_requeued_in_held_state", info  # released
    assert "warning: evict: rank 3 on host" in log and f"SLURM node {node[0]}, job {job})" in log, log
    assert f"drain {node[0]}: listed in" in log, log
    assert f"requeueing job {job} without node(s) {node[0]}" in log, log
    assert summary(cluster, "evict")["status"] == "evicted"
    assert list((cluster.run_dir("evict") / "checkpoints").glob("step-*.ckpt")), "no checkpoint to resume from"


def test_an_aggregator_the_world_size_cannot_feed_is_refused_before_training(cluster, jobs):
    job = jobs["krum"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert log.count("fa-hvd-train: error:") == 1 and "krum" in log, log
    metrics = cluster.run_dir("krum") / "metrics.jsonl"
    assert not metrics.exists() or not step_records(cluster, "krum"), "a rank trained"


def test_a_missing_config_is_refused_before_any_rank_starts(cluster, jobs):
    job = jobs["missing"]
    info = cluster.wait(job)
    log = cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert "train.sbatch: error: config not found: configs/no-such-config.yaml" in log, log
    assert "+ srun" not in log, log


def test_a_missing_partition_is_refused_at_submission(cluster, tmp_path):
    env = {k: v for k, v in cluster.env.items() if k != "SBATCH_PARTITION"}
    proc = subprocess.run(["sbatch", *CPU_JOB, "slurm/train.sbatch", "configs/demo.yaml"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "partition" in proc.stderr.lower(), proc.stderr


def test_an_array_job_runs_each_grid_cell_as_the_harness_does(cluster, jobs, tmp_path):
    info = cluster.wait(jobs["eval_report"])
    logs = "\n".join(p.read_text() for p in cluster.tmp.glob("fa_hvd_eval*.out"))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert logs.count("[eval.sbatch] + fa-hvd-eval --grid") == 2, logs
    lines = (cluster.tmp / "eval" / "results.jsonl").read_text().splitlines()
    on_slurm = {r["key"]: r for r in map(json.loads, lines)}
    assert (cluster.tmp / "eval" / "table.md").exists()
    # The same grid in one process, outside SLURM: the same two cells, the same numbers. With the cells'
    # torch thread count: eval.sbatch runs them with OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK (its --cpus-per-task),
    # and a multi-threaded reduction may sum in another order than a single-threaded one.
    threads = re.search(r"^#SBATCH --cpus-per-task=(\d+)$", (ROOT / "slurm" / "eval.sbatch").read_text(), re.M)
    assert threads, "slurm/eval.sbatch asks for no --cpus-per-task"
    proc = subprocess.run(["fa-hvd-eval", "--grid", str(cluster.tmp / "grid.yaml"), "--out", str(tmp_path)], cwd=ROOT,
                          env=job_env({"OMP_NUM_THREADS": threads.group(1)}), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    local = {r["key"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert sorted(on_slurm) == sorted(local) and len(local) == 2, (on_slurm, local)
    for key, record in local.items():
        assert on_slurm[key]["test_accuracy"] == record["test_accuracy"], key


def test_discover_hosts_expands_the_slurm_node_list(cluster):
    proc = subprocess.run(["launch/discover-hosts.sh"], cwd=ROOT, capture_output=True, text=True,
                          env={**cluster.env, "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS_PER_NODE": "8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["gpu01:8", "gpu02:8"]
