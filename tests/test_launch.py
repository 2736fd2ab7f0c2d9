"""The launch/ and slurm/ scripts: shellcheck, the commands they build, GPU pinning, host discovery."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import ROOT, job_env, output

SCRIPTS = sorted(
    [*ROOT.glob("launch/*.sh"), *ROOT.glob("slurm/*.sh"), *ROOT.glob("slurm/*.sbatch"), *ROOT.glob("tools/slurm/*.sh"),
     *ROOT.glob("tools/cluster/*.sh")]
)


def debian_tool(tool: str, package: str) -> str:
    """The path of ``tool``, installed from Debian's ``package`` with apt-get when missing; skips without root or apt-get."""
    found = shutil.which(tool)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{tool} is not installed and there is no root/apt-get to install Debian's {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], check=True, env=env,
                   capture_output=True)
    return shutil.which(tool)


def test_scripts_pass_shellcheck():
    shellcheck = debian_tool("shellcheck", "shellcheck")
    assert len(SCRIPTS) >= 8, SCRIPTS
    proc = subprocess.run([shellcheck, "-x", *[str(p.relative_to(ROOT)) for p in SCRIPTS]], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def recorder(tmp_path):
    """Stand-ins for horovodrun, mpirun, torchrun and python that record their argv (one JSON list per call) and exit 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for name in ("horovodrun", "mpirun", "torchrun", "python"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\nprintf "%s\\0" "{name}" "$@" >> "{log}"\nprintf "\\n" >> "{log}"\n')
        stub.chmod(0o755)

    def run(argv, **env):
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})
        calls = [line.strip("\0").split("\0") for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls

    return run


def printed_commands(stderr: str) -> list[list[str]]:
    """The commands a script printed before running them (lines ``[name] + CMD ARGS``)."""
    return [shlex.split(line.split("] +", 1)[1]) for line in stderr.splitlines() if "] + " in line]


def test_local_launcher_prints_and_runs_horovodrun(recorder):
    proc, calls = recorder(["launch/local.sh", "3", "configs/demo.yaml", "--set", "optim.lr=0.05"])
    assert proc.returncode == 0, proc.stderr
    expected = ["horovodrun", "-np", "3", "-H", "localhost:3", "fa-hvd-train", "--config", "configs/demo.yaml",
                "--set", "optim.lr=0.05"]
    assert calls == [expected]
    assert printed_commands(proc.stderr) == [expected]


def test_hostfile_launcher_counts_the_slots(recorder, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two GPU nodes and a small one\nnode1 slots=4\n\nnode2 slots=4\nnode3\n")
    proc, calls = recorder(["launch/hosts.sh", str(hostfile), "configs/demo.yaml"], HOROVODRUN_ARGS="--gloo")
    assert proc.returncode == 0, proc.stderr
    expected = ["horovodrun", "-np", "9", "-hostfile", str(hostfile), "--gloo", "fa-hvd-train", "--config",
                "configs/demo.yaml"]
    assert calls == [expected]
    assert printed_commands(proc.stderr) == [expected]


def test_mpirun_launchers_use_horovods_flags(recorder, monkeypatch):
    monkeypatch.delenv("NCCL_DEBUG", raising=False)
    proc, calls = recorder(["launch/mpi4py.sh", "4", "configs/demo.yaml"], HOSTFILE="myhosts")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:5] == ["mpirun", "-np", "4", "-hostfile", "myhosts"]
    assert "NCCL_DEBUG=WARN" in call  # unless the user set a level
    _, calls = recorder(["launch/mpirun.sh", "2", "configs/demo.yaml"], FA_HVD_NATIVE="0",
                        HOROVOD_STALL_CHECK_TIME_SECONDS="30", NCCL_DEBUG="INFO")
    assert calls[0][:5] == ["mpirun", "-np", "2", "-H", "localhost:2"]
    exported = {calls[0][i + 1] for i, arg in enumerate(calls[0]) if arg == "-x"}
    assert {"FA_HVD_NATIVE", "HOROVOD_STALL_CHECK_TIME_SECONDS"} <= exported  # mpirun passes only what -x names
    assert "NCCL_DEBUG=INFO" in exported  # the user's level, not WARN
    for flag in (["-bind-to", "none"], ["-map-by", "slot"], ["-x", "LD_LIBRARY_PATH"], ["-x", "PATH"],
                 ["-mca", "pml", "ob1"], ["-mca", "btl", "^openib"]):
        assert any(call[i:i + len(flag)] == flag for i in range(len(call))), (flag, call)
    assert call[call.index("fa-hvd-train"):] == ["fa-hvd-train", "--config", "configs/demo.yaml",
                                                 "--set", "robust.transport=mpi"]
    printed = printed_commands(proc.stderr)
    assert printed[-1] == call  # mpi4py.sh prints its call of mpirun.sh, which prints mpirun's
    assert printed[0][0].endswith("launch/mpirun.sh")


def test_elastic_launcher_passes_the_discovery_script(recorder):
    proc, calls = recorder(["launch/elastic.sh", "4", "2", "6", "configs/demo.yaml"])
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:9] == ["python", "-m", "fa_hvd.horovodrun", "-np", "4", "--min-np", "2", "--max-np", "6"]
    script = call[call.index("--host-discovery-script") + 1]
    assert script == str(ROOT / "launch" / "discover-hosts.sh")
    assert call[call.index("fa-hvd-train"):] == ["fa-hvd-train", "--config", "configs/demo.yaml",
                                                 "--set", "elastic.enabled=true"]


def test_elastic_launcher_sets_the_exclusion_file_in_the_run_directory(recorder, monkeypatch):
    """robust.evict writes FA_HVD_EXCLUDE_FILE, discover-hosts.sh reads it: elastic.sh points it into RUN_DIR."""
    monkeypatch.delenv("FA_HVD_EXCLUDE_FILE", raising=False)
    for extra, env, expected in (([], {}, ROOT / "runs" / "demo" / "excluded_hosts"),
                                 (["--run-dir", "x/y"], {}, ROOT / "x" / "y" / "excluded_hosts"),
                                 (["--run-dir=/abs/run"], {}, "/abs/run/excluded_hosts"),
                                 (["--run-dir", "x"], {"FA_HVD_EXCLUDE_FILE": "/mine"}, "/mine")):
        proc, (call,) = recorder(["launch/elastic.sh", "4", "2", "6", "configs/demo.yaml", *extra], **env)
        assert proc.returncode == 0 and call[len(call) - len(extra):] == extra, proc.stderr
        assert f"[elastic.sh] hosts robust.evict excludes: {expected}\n" in proc.stderr


class NoticeClient:
    """What fa_hvd.horovodrun's wrapper reads of Horovod's WorkerNotificationClient: rank 0's addresses."""

    def addresses(self):
        return {"eth0": [("10.213.0.12", 4567)]}


def test_horovodrun_leaves_a_host_update_that_rank_0_does_not_take(monkeypatch, caplog):
    """fa_hvd.horovodrun: Horovod's elastic driver sends rank 0 each host change holding the lock
    that the survivors' new world waits for; the notice is given NOTICE_WAIT_S, then goes on in the
    background with a warning naming where rank 0 was. A notice that fails or is taken in time
    ends as Horovod's own does."""
    from fa_hvd import horovodrun

    release, sent = threading.Event(), []

    def unanswered(client, timestamp, update):  # a connect to a cut-off node: ends when the kernel gives up
        release.wait(60)
        sent.append(timestamp)

    monkeypatch.setattr(horovodrun, "NOTICE_WAIT_S", 0.05)
    with caplog.at_level(logging.WARNING):
        horovodrun.bounded(unanswered)(NoticeClient(), 1.0, 2)
    assert sent == []  # back to the driver while the notice still waits
    assert "fa_hvd: rank 0 (10.213.0.12:4567) did not take the host update within 0.05 s" in caplog.text
    release.set()

    def refused(client, timestamp, update):
        raise ConnectionRefusedError("refused")

    def taken(client, timestamp, update):
        sent.append((timestamp, update))

    monkeypatch.setattr(horovodrun, "NOTICE_WAIT_S", 600.0)  # returns as soon as the notice ends
    caplog.clear()
    with pytest.raises(ConnectionRefusedError, match="refused"):  # Horovod's driver logs it, as before
        horovodrun.bounded(refused)(NoticeClient(), 2.0, 2)
    horovodrun.bounded(taken)(NoticeClient(), 3.0, 1)
    assert (3.0, 1) in sent and "did not take" not in caplog.text


def test_torchrun_launcher_on_one_node_and_on_several(recorder):
    proc, calls = recorder(["launch/torchrun.sh", "4", "configs/demo.yaml", "--set", "optim.lr=0.05"])
    assert proc.returncode == 0, proc.stderr
    train = ["--no-python", "fa-hvd-train", "--config", "configs/demo.yaml", "--set", "robust.transport=torch",
             "--set", "optim.lr=0.05"]
    expected = ["torchrun", "--standalone", "--nproc-per-node", "4", "--max-restarts", "0", *train]
    assert calls == [expected] and printed_commands(proc.stderr) == [expected]
    proc, calls = recorder(["launch/torchrun.sh", "2", "configs/demo.yaml", "--set", "optim.lr=0.05"], NNODES="3",
                           RDZV_ENDPOINT="node1:29500", MAX_RESTARTS="2")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["torchrun", "--nnodes", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node1:29500",
                      "--rdzv-id", "fa_hvd", "--nproc-per-node", "2", "--max-restarts", "2", *train]]
    proc, calls = recorder(["launch/torchrun.sh", "2", "configs/demo.yaml"], NNODES="3")
    assert proc.returncode == 2 and calls == [] and "needs RDZV_ENDPOINT" in proc.stderr


@pytest.mark.parametrize("script,args", [
    ("launch/local.sh", ["4", "configs/missing.yaml"]),
    ("launch/hosts.sh", ["/nonexistent/hosts", "configs/demo.yaml"]),
    ("launch/mpirun.sh", ["4", "configs/missing.yaml"]),
    ("launch/elastic.sh", ["4", "2", "4", "configs/missing.yaml"]),
    ("launch/torchrun.sh", ["4", "configs/missing.yaml"]),
    ("launch/local.sh", ["4"]),
])
def test_bad_input_is_refused_before_anything_runs(recorder, script, args):
    proc, calls = recorder([script, *args])
    assert proc.returncode == 2
    assert calls == []
    assert f"{Path(script).name}: error:" in proc.stderr
    assert ("not found" in proc.stderr or "cannot read" in proc.stderr or "usage" in proc.stderr), proc.stderr


@pytest.mark.parametrize("script,args,needle", [
    ("launch/local.sh", ["x", "configs/demo.yaml"], "NP must be a whole number >= 1, got 'x'"),
    ("launch/local.sh", ["0", "configs/demo.yaml"], "NP must be a whole number >= 1, got '0'"),
    ("launch/mpirun.sh", ["2x", "configs/demo.yaml"], "NP must be a whole number >= 1, got '2x'"),
    ("launch/mpi4py.sh", ["-1", "configs/demo.yaml"], "NP must be a whole number >= 1, got '-1'"),
    ("launch/torchrun.sh", ["0", "configs/demo.yaml"], "NPROC must be a whole number >= 1, got '0'"),
    ("launch/elastic.sh", ["4", "0", "6", "configs/demo.yaml"], "MIN_NP must be a whole number >= 1, got '0'"),
    ("launch/elastic.sh", ["4", "5", "6", "configs/demo.yaml"], "needs MIN_NP <= NP <= MAX_NP, got 5, 4, 6"),
])
def test_a_bad_rank_count_is_refused_before_anything_runs(recorder, script, args, needle):
    proc, calls = recorder([script, *args])
    assert (proc.returncode, calls) == (2, []) and f"error: {needle}" in proc.stderr, proc.stderr


def test_a_launcher_without_its_tool_on_path_says_how_to_get_it(tmp_path):
    """horovodrun lives in fa_hvd's environment: without it on PATH, one line says to activate it."""
    proc = subprocess.run(["launch/local.sh", "2", "configs/demo.yaml"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "local.sh: error: horovodrun not found on PATH" in proc.stderr, proc.stderr
    assert "source .venv/bin/activate" in proc.stderr


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_LOCALID": "2"}, "6"),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, "5"),  # mpirun inside a SLURM batch step
    ({"HOROVOD_LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, "7"),
])
def test_pin_gpu_shows_each_rank_its_own_gpu(env, expected):
    proc = subprocess.run(["launch/pin-gpu.sh", "printenv", "CUDA_VISIBLE_DEVICES"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "4,5,6,7", **env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert f"CUDA_VISIBLE_DEVICES={expected}" in proc.stderr


def test_pin_gpu_without_gpus_changes_nothing_and_refuses_a_rank_without_one():
    clean = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run(["launch/pin-gpu.sh", "sh", "-c", "echo ${CUDA_VISIBLE_DEVICES-unset}"], cwd=ROOT,
                          capture_output=True, text=True, env={**clean, "SLURM_LOCALID": "1"})
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "unset", "")
    proc = subprocess.run(["launch/pin-gpu.sh", "true"], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "SLURM_LOCALID": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 2
    assert "local rank 2 but only 2 GPU(s)" in proc.stderr


def test_discover_hosts(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# the elastic job's hosts\nnode1:4\n\nnode2:2\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FA_HVD_"))}

    def discover(**env):
        proc = subprocess.run(["launch/discover-hosts.sh"], cwd=ROOT, capture_output=True, text=True,
                              env={**clean, **env})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert discover(FA_HVD_HOSTS_FILE=str(hosts), SLURM_JOB_NODELIST="x") == ["node1:4", "node2:2"]
    assert discover(FA_HVD_SLOTS="3") == ["localhost:3"]  # SLURM's node list: tests/test_slurm.py
    excluded = tmp_path / "excluded_hosts"
    excluded.write_text("node2\n")  # what fa-hvd-train's robust.evict writes
    assert discover(FA_HVD_HOSTS_FILE=str(hosts), FA_HVD_EXCLUDE_FILE=str(excluded)) == ["node1:4"]
    assert discover(FA_HVD_SLOTS="3", FA_HVD_EXCLUDE_FILE=str(excluded)) == ["localhost:3"]
    assert discover(FA_HVD_SLOTS="3", FA_HVD_EXCLUDE_FILE=str(tmp_path / "none")) == ["localhost:3"]


@pytest.mark.slow
def test_local_and_mpi4py_launchers_train_the_same_parameters(tmp_path):
    """launch/local.sh (horovodrun, Horovod's collectives) and launch/mpi4py.sh (mpirun, plain MPI)
    run the same 4-rank job: the allgather is exact, so the parameters agree bit for bit."""
    crcs = {}
    for script in ("launch/local.sh", "launch/mpi4py.sh"):
        run_dir = tmp_path / Path(script).stem
        proc = subprocess.run([script, "4", "configs/demo.yaml", "--set", "train.steps=20", "--run-dir", str(run_dir)],
                              cwd=ROOT, capture_output=True, text=True, env=job_env(), timeout=300)
        assert proc.returncode == 0, output(proc)
        assert printed_commands(proc.stderr)[-1][0] in ("horovodrun", "mpirun"), proc.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["status"], summary["step"], summary["world_size"]) == ("finished", 20, 4), summary
        crcs[script] = summary["params_crc32"]
    assert len(set(crcs.values())) == 1, crcs


@pytest.mark.parametrize("restart, asked, expected", [
    ("0", ["--resume", "never"], "never"), ("1", ["--resume", "never"], "auto"), ("3", ["--resume=never"], "auto"),
    ("0", [], "auto"), ("0", ["--resume", "runs/x/checkpoints/step-000000010.ckpt"],
                        "runs/x/checkpoints/step-000000010.ckpt")])
def test_train_sbatch_owns_the_resume_policy_on_requeue(recorder, tmp_path, restart, asked, expected):
    """The first start resumes as asked; every requeued start (SLURM_RESTART_COUNT > 0) with auto,
    so a --resume never does not start the run over at every requeue."""
    srun = tmp_path / "bin" / "srun"
    log = tmp_path / "calls"  # where the recorder reads its stand-ins' calls
    srun.write_text(f'#!/bin/sh\nprintf "%s\\0" srun "$@" >> "{log}"\nprintf "\\n" >> "{log}"\n')
    srun.chmod(0o755)
    proc, calls = recorder(["bash", "slurm/train.sbatch", "configs/demo.yaml", *asked, "--set", "optim.lr=0.05"],
                           SLURM_JOB_ID="77", SLURM_RESTART_COUNT=restart, SLURM_NTASKS="1",
                           SLURM_JOB_NODELIST="localhost", FA_HVD_LAUNCHER="srun")
    [call] = calls
    train = call[call.index("fa-hvd-train"):]
    assert train == ["fa-hvd-train", "--config", "configs/demo.yaml", "--resume", expected, "--set", "optim.lr=0.05",
                     "--run-dir", "runs/demo-77"], proc.stderr


def test_submit_eval_sends_the_cells_not_done_in_arrays_of_at_most_max_array_size(recorder, tmp_path):
    """slurm/submit-eval.sh: one array task per cell not done, in arrays of at most SLURM's MaxArraySize
    (task T of the array at offset O runs cell O + T), then a report job after them all. With
    --rerun-other-machines "done" would mean done on the login node's machine, not the compute nodes':
    every cell is submitted, and each task's ``--cell`` skips a cell that its own machine computed."""
    import yaml

    from fa_hvd.eval.grid import load_grid
    from fa_hvd.eval.runner import machine

    grid_path, out, log = tmp_path / "grid.yaml", tmp_path / "eval", tmp_path / "calls"
    grid_path.write_text(yaml.safe_dump({"seeds": 2, "splits": {"iid": None}, "workers": [[4, 1]],
                                         "rules": {"mean": "mean", "flag": "flag"}, "faults": {"none": []}}))
    cells = load_grid(grid_path).cells
    assert len(cells) == 4
    out.mkdir()
    done = {0: "Another CPU (AVX512), torch 2.14.1", 1: machine()}
    (out / "results.jsonl").write_text("".join(
        json.dumps({"key": cells[i].key, "digest": cells[i].digest("simulation"), "engine": "simulation",
                    "machine": name, "test_accuracy": 0.9}) + "\n" for i, name in done.items()))
    # scontrol is the first call; sbatch answers its call's number as the job id (2, 3, ...);
    # MaxArraySize 3 splits the 4 cells into arrays at offsets 0 and 3
    for name, answer in {"sbatch": f'wc -l < "{log}"', "scontrol": 'echo "MaxArraySize            = 3"'}.items():
        stub = tmp_path / "bin" / name
        stub.write_text(f'#!/bin/sh\nprintf "%s\\0" {name} "$@" >> "{log}"\nprintf "\\n" >> "{log}"\n{answer}\n')
        stub.chmod(0o755)

    def jobs(*args):
        proc, calls = recorder(["slurm/submit-eval.sh", str(grid_path), "--out", str(out), *args])
        assert proc.returncode == 0, proc.stderr
        assert [call[:2] for call in calls] == [["scontrol", "show"]] + [["sbatch", "--parsable"]] * (len(calls) - 1)
        *arrays, report = [call[2:] for call in calls[1:]]
        for array in arrays:
            assert array[2:] == ["slurm/eval.sbatch", str(grid_path), "--out", str(out), *args], array
        array_ids = ":".join(str(job) for job in range(2, len(arrays) + 2))
        assert report[:2] == ["--job-name=fa_hvd_eval_report", f"--dependency=afterany:{array_ids}"], report
        assert report[2].startswith(f"--wrap=fa-hvd-eval --grid {grid_path} --report"), report
        return proc.stderr, [tuple(array[:2]) for array in arrays]

    _, arrays = jobs()
    assert arrays == [("--array=2", "--export=ALL,FA_HVD_CELL_OFFSET=0"), ("--array=0", "--export=ALL,FA_HVD_CELL_OFFSET=3")]
    for flag in ("--rerun-other-machines", "--rerun"):  # argparse takes the abbreviation too
        said, arrays = jobs(flag)
        assert arrays == [("--array=0,1,2", "--export=ALL,FA_HVD_CELL_OFFSET=0"),
                          ("--array=0", "--export=ALL,FA_HVD_CELL_OFFSET=3")], flag
        assert "every cell is submitted" in said, said
