"""``slurm/sweep.sbatch`` on a real two-node Slurm (tests/slurm_cluster.py: slurmctld and two slurmd on this machine).

Two jobs run side by side (the test nodes have 2 CPUs, each job takes one per node), each from its own copy of the
checkout (its own mlruns/ and ray_results/), with a ``~/.ray/auth_token`` of some earlier local sweep in $HOME, as every
user has one. They are submitted when the test session starts and run beside the other tests; what is done to them
mid-job (a requeue by hand, a driver with a wrong token) is done by tests/slurm_jobs.py's threads. These tests wait
for the jobs to end and check what happened.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import missing
from slurm_jobs import BY_HAND_EPOCHS, TIME_LIMIT_EPOCHS, Job

if missing() and os.environ.get("STRESSLAB_REQUIRE_SLURM"):  # CI installs Slurm: its absence there is a failure, not a skip
    raise RuntimeError(f"STRESSLAB_REQUIRE_SLURM is set but Slurm is missing ({', '.join(missing())})")
pytestmark = pytest.mark.skipif(bool(missing()), reason=f"Slurm is not installed here (missing: {', '.join(missing())}); "
                                                         "apt-get install slurmctld slurmd slurm-client munge")

CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


@pytest.fixture(scope="module")
def jobs(slurm_jobs):
    """Both jobs, submitted when the session started (conftest.py, tests/slurm_jobs.py)."""
    if isinstance(slurm_jobs, Exception):
        raise slurm_jobs
    return slurm_jobs


def wait_for(what, predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)
    return value


def wait_until_done(job: Job, timeout: float) -> dict:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    try:
        return wait_for(f"job {job.id} to end", lambda: (info := job.info()).get("JobState") in ended and info, timeout)
    except AssertionError as err:
        raise AssertionError(f"{err}: {job.info().get('JobState')}\n{job.log()}") from None


def sweep_trials(job: Job, epochs: int):
    """The trial runs of the job's sweep by run name, each asserted to be one FINISHED run with every epoch logged
    exactly once; and the sweep's parent runs."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{job.copy / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quick").experiment_id], max_results=1000)
    trials: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("stresslab.kind") == "trial":
            trials.setdefault(run.info.run_name, []).append(run)
    assert set(trials) == {"plain_cnn-none-s42", "plain_cnn-cutout-s42"}
    for name, found in trials.items():
        assert [r.info.status for r in found] == ["FINISHED"], name
        for key in ("train/loss", "val/acc", "epoch"):
            steps = [m.step for m in client.get_metric_history(found[0].info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs + 1)), f"{name} {key}: {sorted(steps)}"
    return {name: found[0] for name, found in trials.items()}, [r for r in runs if r.data.tags.get("stresslab.kind") == "sweep"]


def assert_nothing_left(job: Job) -> None:
    """No process of the job (Ray's, the server's, the driver's), no temp dir, no token; /tmp/ray/ray_current_cluster
    (the one of Ray users outside the job, which other tests may be using meanwhile) never names any of the job's heads."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    left = [line for line in ps if f"ray-{job.id}-" in line or (str(job.copy) in line and "pytest" not in line)]
    assert not left, f"processes of job {job.id} still running:\n" + "\n".join(left)
    temp = list(Path("/tmp").glob(f"ray-{job.id}-*"))
    assert not temp, f"node temp dirs left: {temp}"
    assert not (job.copy / ".slurm" / job.id / "ray_auth_token").exists(), "the job's token outlived it"
    heads = re.findall(r"Ray head \S+ at (\S+:\d+)", job.log())
    assert heads and not (CLUSTER_FILE.exists() and CLUSTER_FILE.read_text().strip() in heads)


def test_a_job_requeued_by_hand_mid_sweep_resumes_and_finishes_on_both_nodes_leaving_nothing(jobs):
    """Acceptance 1 and 2: the quick sweep on two nodes, `scontrol requeue` once a trial has logged an epoch; the job
    runs again, resumes, ends COMPLETED with exit 0, every trial FINISHED once with no epoch logged twice, trials on
    both Ray nodes, nothing left behind."""
    job = jobs["by_hand"]
    info = wait_until_done(job, timeout=600)
    log = job.log()
    requeue = job.events.get("requeue")
    assert requeue and requeue.returncode == 0, requeue.stderr if requeue else f"never requeued: no checkpoint appeared\n{log}"
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "DUE TO JOB REQUEUE" in log and "SIGTERM: stopping the sweep" in log and log.count("resuming ") == 1, log
    assert "2/2 trials finished" in log and "[2/2] plain_cnn-" in log, log
    trials, parents = sweep_trials(job, BY_HAND_EPOCHS)
    assert len({run.data.tags["ray.node_id"] for run in trials.values()}) == 2, "both trials ran on one Ray node"
    assert parents and all(run.info.status == "FINISHED" for run in parents)
    assert_nothing_left(job)


def test_a_job_warned_before_its_time_limit_requeues_itself_and_finishes(jobs):
    """Acceptance 3 and 4's wrong token: a 4-minute limit with the warning 120 s before it (Slurm sends it up to 30 s
    earlier still): the job stops the sweep and requeues itself; its next start (the limit lifted) resumes and finishes.
    While that start runs, a driver with a wrong token is refused with an error naming authentication."""
    job = jobs["time_limit"]
    info = wait_until_done(job, timeout=600)
    log = job.log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "SIGUSR1: stopping the sweep" in log and "requeueing job" in log and log.count("resuming ") == 1, log
    sweep_trials(job, TIME_LIMIT_EPOCHS)
    assert_nothing_left(job)
    wrong = job.events.get("wrong_token")
    assert wrong, "the wrong-token driver never ran: no second start resumed"
    assert job.events["wrong_token_while"] == "RUNNING" and wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "refused this driver's authentication" in wrong.stderr and "RAY_AUTH_MODE=token" in wrong.stderr, wrong.stderr
