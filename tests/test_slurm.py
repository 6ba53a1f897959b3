"""``slurm/sweep.sbatch`` on a real two-node Slurm (tests/slurm_cluster.py: slurmctld and two slurmd on this machine).

The jobs run on a copy of the checkout (its own mlruns/ and ray_results/), with a ``~/.ray/auth_token`` of some earlier
local sweep in $HOME, as every user has one. Requeued jobs are made eligible at once (``scontrol update
StartTime=now``): Slurm holds a requeued batch job back by two minutes, which only costs the test time.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from slurm_cluster import missing, slurm_cluster

if missing() and os.environ.get("STRESSLAB_REQUIRE_SLURM"):  # CI installs Slurm: its absence there is a failure, not a skip
    raise RuntimeError(f"STRESSLAB_REQUIRE_SLURM is set but Slurm is missing ({', '.join(missing())})")
pytestmark = pytest.mark.skipif(bool(missing()), reason=f"Slurm is not installed here (missing: {', '.join(missing())}); "
                                                         "apt-get install slurmctld slurmd slurm-client munge")

QUICK = ["--experiment", "quick", "--set", "data.name=synthetic", "--set", "arch=plain_cnn", "--set", "robustness=false",
         "--set", "resources.cpu=1"]
CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory, slurm):
    """A copy of the checkout (what git would ship, committed or not) and an environment whose HOME holds a Ray token."""
    copy = tmp_path_factory.mktemp("submit") / "stresslab"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    home = copy.parent / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)  # what an earlier local sweep leaves: not this job's token
    env = {**slurm, "HOME": str(home), "STRESSLAB_PYTHON": sys.executable, "STRESSLAB_JOIN_TIMEOUT": "180"}
    env.pop("RAY_ADDRESS", None)
    return copy, env


def sbatch(submit_dir, *args: str) -> str:
    copy, env = submit_dir
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(what, predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)
    return value


def hurry(env: dict, job: str, info: dict, time_limit: str | None = None) -> None:
    """A requeued job waiting: give it ``time_limit`` (if any) and make it eligible now. Done on every poll: while a
    requeued job is still completing it reads PENDING, and Slurm resets its begin time when it completes."""
    if info.get("JobState") != "PENDING":
        return
    if time_limit:
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={time_limit}"], env=env, capture_output=True)
    if info.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)


def wait_until_done(submit_dir, job: str, timeout: float) -> dict:
    """Wait for the job's final state, hurrying it after each requeue."""
    _, env = submit_dir
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(env, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        hurry(env, job, info)
        assert time.monotonic() < deadline, f"job {job} did not end within {timeout:g} s: {info.get('JobState')}\n{job_log(submit_dir, job)}"
        time.sleep(1)


def start_next(submit_dir, job: str, start: int, time_limit: str) -> None:
    """Wait for the requeued job's ``start``-th start, hurried and given ``time_limit``."""
    _, env = submit_dir

    def started() -> bool:
        hurry(env, job, job_info(env, job), time_limit)
        return f"(start {start})" in job_log(submit_dir, job)

    wait_for(f"start {start} of job {job}", started, timeout=300)


def job_log(submit_dir, job: str) -> str:
    path = submit_dir[0] / f"stresslab-{job}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def sweep_runs(submit_dir):
    """The client of the copy's store, and its trial runs by run name with the parent runs under key ''."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{submit_dir[0] / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quick")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        key = "" if run.data.tags.get("stresslab.kind") == "sweep" else run.info.run_name
        runs.setdefault(key, []).append(run)
    return client, runs


def assert_nothing_left(submit_dir, job: str) -> None:
    """No process of the job (Ray's, the server's, the driver's), no temp dir, no token; /tmp/ray/ray_current_cluster
    (the one of Ray users outside the job, which other tests may be using meanwhile) never names any of the job's heads."""
    copy, _ = submit_dir
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    left = [line for line in ps if f"ray-{job}-" in line or (str(copy) in line and "pytest" not in line)]
    assert not left, f"processes of job {job} still running:\n" + "\n".join(left)
    temp = [p for p in Path("/tmp").glob(f"ray-{job}-*")]
    assert not temp, f"node temp dirs left: {temp}"
    assert not (copy / ".slurm" / job / "ray_auth_token").exists(), "the job's token outlived it"
    heads = re.findall(r"Ray head \S+ at (\S+:\d+)", job_log(submit_dir, job))
    assert heads and not (CLUSTER_FILE.exists() and CLUSTER_FILE.read_text().strip() in heads)


def test_a_two_node_job_finishes_every_trial_on_both_nodes_and_leaves_nothing_behind(submit_dir):
    job = sbatch(submit_dir, "--nodes=2", "slurm/sweep.sbatch", *QUICK, "--set", "epochs=2")
    info = wait_until_done(submit_dir, job, timeout=300)
    log = job_log(submit_dir, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "2/2 trials finished" in log and "[2/2] plain_cnn-" in log, log
    _, runs = sweep_runs(submit_dir)
    trials = {name: r for name, r in runs.items() if name}
    assert set(trials) == {"plain_cnn-none-s42", "plain_cnn-cutout-s42"}
    assert all(len(r) == 1 and r[0].info.status == "FINISHED" for r in trials.values()), {n: [x.info.status for x in r] for n, r in trials.items()}
    assert len({r[0].data.tags["ray.node_id"] for r in trials.values()}) == 2, "both trials ran on one Ray node"
    assert [r.info.status for r in runs[""]] == ["FINISHED"]
    assert_nothing_left(submit_dir, job)


def test_requeue_by_hand_and_by_the_time_limit_resume_the_sweep_with_no_step_twice(submit_dir):
    """Start 1 (no time limit) is requeued with `scontrol requeue` once a trial has logged an epoch. Start 2 runs under a
    2-minute limit with the warning signal 60 s before it (`--signal=B:USR1@60`, given at submission): it stops the sweep
    and requeues itself. Start 3, the limit lifted, finishes the sweep; while it runs, a driver with a wrong token is
    refused with an error naming authentication."""
    copy, env = submit_dir
    epochs = 10
    job = sbatch(submit_dir, "--nodes=2", "--signal=B:USR1@60", "slurm/sweep.sbatch", *QUICK, "--set", f"epochs={epochs}")
    checkpoints = lambda: list((copy / "ray_results" / f"slurm-{job}").glob("*/*/checkpoint_*"))  # one per epoch and trial
    wait_for("a trial's first epoch", checkpoints, timeout=240, interval=0.5)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    start_next(submit_dir, job, 2, time_limit="2")
    wait_for("the time limit's warning to requeue the job", lambda: "requeueing job" in job_log(submit_dir, job), timeout=300)
    start_next(submit_dir, job, 3, time_limit="UNLIMITED")
    wait_for("the third start's sweep", lambda: job_log(submit_dir, job).count("resuming ") == 2, timeout=240)
    head = re.findall(r"Ray head \S+ at (\S+:\d+)", job_log(submit_dir, job))[-1]
    wrong = subprocess.run([sys.executable, "sweep.py", *QUICK, "--address", head], cwd=copy, capture_output=True, text=True, timeout=120,
                           env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64})
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "refused this driver's authentication" in wrong.stderr and "RAY_AUTH_MODE=token" in wrong.stderr, wrong.stderr

    info = wait_until_done(submit_dir, job, timeout=300)
    log = job_log(submit_dir, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), log
    assert "DUE TO JOB REQUEUE" in log and "SIGUSR1: stopping the sweep" in log, log
    assert log.count("resuming ") == 2, log

    client, runs = sweep_runs(submit_dir)
    sweep_id = re.search(r"sweep (quick-\d{8}-\d{6}): MLflow", log).group(1)
    trials = {n: [x for x in r if x.data.tags.get("stresslab.sweep_id") == sweep_id] for n, r in runs.items() if n}
    trials = {n: r for n, r in trials.items() if r}
    assert set(trials) == {"plain_cnn-none-s42", "plain_cnn-cutout-s42"}
    for name, (run,) in trials.items():  # one run per trial, FINISHED, every epoch logged exactly once
        assert run.info.status == "FINISHED", name
        for key in ("train/loss", "val/acc", "epoch"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs + 1)), f"{name} {key}: {sorted(steps)}"
    assert_nothing_left(submit_dir, job)
