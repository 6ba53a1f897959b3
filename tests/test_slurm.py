"""``slurm/sweep.sbatch`` on a real two-node Slurm (tests/slurm_cluster.py: slurmctld and two slurmd on this machine).

Two jobs run side by side (the test nodes have 2 CPUs, each job takes one per node), each from its own copy of the
checkout (its own mlruns/ and ray_results/), with a ``~/.ray/auth_token`` of some earlier local sweep in $HOME, as every
user has one. Requeued jobs are made eligible 3 s later (``scontrol update StartTime=now+3``, see ``hurry``): Slurm holds
a requeued batch job back by two minutes, which only costs the test time.

The time-limit job's limit is cut short once its sweep has checkpointed an epoch (``scontrol update TimeLimit=``, to
between 2 and 3 minutes from then): a limit fixed at submission lands its warning at a point of the sweep that depends
on this machine's speed (seen: no epoch trained yet, and every epoch trained, so no requeue at all).
"""
from __future__ import annotations

import base64
import datetime
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
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
TIME_LIMIT = [*QUICK, "--set", "adversarial=false", "--set", "log_model=false"]  # (what the time-limit job tests is the time limit)
BY_HAND_EPOCHS = 2  # acceptance 1's command; requeued once a trial has checkpointed its first, so at least one epoch is resumed
TRAINING_LEFT = 45  # s the time-limit job's first start must still train after its first checkpoint: the warning comes
                    # <= 30 s after the limit is cut (slurmctld checks time limits every 30 s), and the sweep must run then
SIGNAL_LEAD = 180  # the warning's lead (s): the limit is cut to 2-3 minutes ahead, so the warning comes at once with >= 90 s left


def time_limit_epochs() -> int:
    """The time-limit job's epochs: at least 10, and enough that its first start trains TRAINING_LEFT s after its first
    checkpoint on this machine (seen: 6 s an epoch on an fp32 Zen 3, 1.2 s on a bf16 Zen 5, where 10 epochs ended before
    the warning). Timed on the job's own trial here, alone, so faster than in the job beside the other: it errs long."""
    from config.schema import resolve, trial_configs
    from tracking import TrialRun, metrics
    from trainable import fit

    _, experiment = resolve(ROOT / "experiments.yaml", "quick", [*TIME_LIMIT[3::2], "epochs=2"])
    seconds: list[float] = []
    fit(trial_configs(experiment)[0], TrialRun(), lambda values, state: seconds.append(values[metrics.EPOCH_SECONDS]), threads=1)
    return max(10, math.ceil(TRAINING_LEFT / seconds[-1]) + 1)  # (the second epoch: the first has the kernels' warm-up)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), cpus=2) as env:  # 2 CPUs a node: the two jobs run side by side
        yield env


@dataclass
class Job:
    """A submitted job and the copy of the checkout it was submitted from (its own mlruns/ and ray_results/)."""

    copy: Path
    env: dict
    id: str = ""
    time_limit_after_requeue: str | None = None  # what a requeued start gets (the test lifts a limit that requeued the job)

    def log(self) -> str:
        path = self.copy / f"stresslab-{self.id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def info(self) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], env=self.env, capture_output=True, text=True).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)


def checkout_copy(copy: Path) -> Path:
    """What git would ship, committed or not."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, slurm):
    """Both jobs, submitted at once from two copies of the checkout, with a HOME holding a Ray token; a thread makes
    each requeued start eligible at once (see the module's docstring) for as long as the tests run."""
    base = tmp_path_factory.mktemp("submit")
    (base / "home" / ".ray").mkdir(parents=True)
    (base / "home" / ".ray" / "auth_token").write_text("0" * 64)  # what an earlier local sweep leaves: not the jobs' token
    env = {**slurm, "HOME": str(base / "home"), "STRESSLAB_PYTHON": sys.executable, "STRESSLAB_JOIN_TIMEOUT": "180",
           "STRESSLAB_SYSTEM_METRICS_INTERVAL": "10"}  # the default (the test session's 1 s would load the servers and both CPUs)
    env.pop("RAY_ADDRESS", None)
    epochs = time_limit_epochs()
    submitted = {
        "by_hand": (Job(checkout_copy(base / "by-hand"), env), ["--nodes=2", "slurm/sweep.sbatch", *QUICK, "--set", f"epochs={BY_HAND_EPOCHS}"]),
        "time_limit": (Job(checkout_copy(base / "time-limit"), env, time_limit_after_requeue="UNLIMITED"),
                       ["--nodes=2", "--time=15", f"--signal=B:USR1@{SIGNAL_LEAD}", "slurm/sweep.sbatch", *TIME_LIMIT, "--set", f"epochs={epochs}"]),
    }
    for job, args in submitted.values():
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=job.copy, env=env, capture_output=True, text=True, check=True).stdout
        job.id = out.strip().split(";")[0]
    stop = threading.Event()

    def hurry_requeued() -> None:
        while not stop.wait(1):
            for job, _ in submitted.values():
                hurry(job)

    hurrier = threading.Thread(target=hurry_requeued, daemon=True)
    hurrier.start()
    jobs = {name: job for name, (job, _) in submitted.items()}
    # Acceptance 4's wrong token, against the time-limit job's second cluster while it runs (the job may finish while
    # the test of the other job still runs, so a thread waits for that start rather than the test).
    refused: dict = {}
    prober = threading.Thread(target=wrong_token_driver, args=(jobs["time_limit"], stop, refused), daemon=True)
    prober.start()
    cut: dict = {}
    cutter = threading.Thread(target=cut_limit_after_first_checkpoint, args=(jobs["time_limit"], stop, cut), daemon=True)
    cutter.start()
    yield jobs | {"refused": refused, "cut": cut, "time_limit_epochs": epochs}
    stop.set()
    for thread in (hurrier, prober, cutter):
        thread.join()


def checkpoints(job: Job) -> list[Path]:
    return list((job.copy / "ray_results" / f"slurm-{job.id}").glob("*/*/checkpoint_*"))  # one per epoch and trial


def cut_limit_after_first_checkpoint(job: Job, stop: threading.Event, result: dict) -> None:
    """Once the job's first start has checkpointed an epoch: its time limit cut to the first whole minute at least
    SIGNAL_LEAD - 60 s ahead (at most SIGNAL_LEAD), so the warning is due at once and comes with time to stop."""
    while not stop.wait(0.5):
        if checkpoints(job):
            elapsed = seconds(job.info()["RunTime"])
            minutes = (elapsed + SIGNAL_LEAD) // 60
            subprocess.run(["scontrol", "update", f"JobId={job.id}", f"TimeLimit={minutes}"], env=job.env, check=True)
            result.update(elapsed=elapsed, minutes=minutes, checkpoints=len(checkpoints(job)))
            return


def seconds(duration: str) -> int:
    """Slurm's [D-]HH:MM:SS (or MM:SS) in seconds."""
    days, _, clock = duration.rpartition("-")
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total + int(days or 0) * 86400


def wrong_token_driver(job: Job, stop: threading.Event, result: dict) -> None:
    """Once the job's second start runs its sweep: a driver with a wrong token; its CompletedProcess into ``result``."""
    while not stop.wait(0.5):
        if job.log().count("resuming ") == 1:
            head = re.findall(r"Ray head \S+ at (\S+:\d+)", job.log())[-1]
            try:
                result["driver"] = subprocess.run([sys.executable, "sweep.py", *QUICK, "--address", head], cwd=job.copy, capture_output=True,
                                                  text=True, timeout=90, env={**job.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64})
            except subprocess.TimeoutExpired as err:
                result["driver"] = err
            return


def hurry(job: Job) -> None:
    """A requeued job waiting: give it its after-requeue time limit (if any) and make it eligible in a few seconds. Done
    every second: while a requeued job is still completing it reads PENDING, and Slurm resets its begin time when it
    completes (to cred_expire + 1 s later, 121 s). Not sooner than 3 s: slurmd refuses a job credential created in the
    second its previous start's credential was revoked, or before ("Killing non-startable batch JobId=...: Job credential
    revoked", the job FAILED; seen once with StartTime=now)."""
    info = job.info()
    if info.get("JobState") != "PENDING" or info.get("Restarts", "0") == "0":
        return
    if job.time_limit_after_requeue:
        subprocess.run(["scontrol", "update", f"JobId={job.id}", f"TimeLimit={job.time_limit_after_requeue}"], env=job.env, capture_output=True)
    if info.get("Reason") == "BeginTime" and seconds_until(info.get("EligibleTime", "")) > 5:
        subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now+3"], env=job.env, capture_output=True)


def seconds_until(timestamp: str) -> float:
    """Seconds from now to one of Slurm's local times (2026-12-02T23:24:33); infinite for Unknown/None."""
    try:
        return (datetime.datetime.fromisoformat(timestamp) - datetime.datetime.now()).total_seconds()
    except ValueError:
        return math.inf


def wait_for(what, predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)
    return value


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_until_done(job: Job, timeout: float) -> dict:
    try:
        return wait_for(f"job {job.id} to end", lambda: (info := job.info()).get("JobState") in ENDED and info, timeout)
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
    assert not (job.copy / ".slurm" / job.id / "mlflow").exists(), "the job's MLflow login outlived it"
    heads = re.findall(r"Ray head \S+ at (\S+:\d+)", job.log())
    assert heads and not (CLUSTER_FILE.exists() and CLUSTER_FILE.read_text().strip() in heads)


def mlflow_login(job: Job, start: int) -> tuple[str, str]:
    """The MLflow server the job's ``start``-th start announced (once it answers) and the password of the job's login."""
    servers = wait_for(f"job {job.id}'s MLflow server of start {start}", lambda: (found := re.findall(r"MLflow server: (http://\S+?),", job.log()))
                       and len(found) >= start and found, timeout=300, interval=0.2)
    login = (job.copy / ".slurm" / job.id / "mlflow" / "client.env").read_text()
    return servers[start - 1], dict(line.split("=", 1) for line in login.splitlines())["MLFLOW_TRACKING_PASSWORD"]


def http_status(server: str, password: str | None = None) -> int:
    """The status of a REST call (search experiments) to ``server``, as the job's admin with ``password`` if given."""
    request = urllib.request.Request(f"{server}/api/2.0/mlflow/experiments/search?max_results=1")
    if password is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{password}".encode()).decode())
    try:
        return urllib.request.urlopen(request, timeout=20).status
    except urllib.error.HTTPError as err:
        return err.code


def assert_login_required(server: str, password: str) -> None:
    """Without credentials or with a wrong password: 401, also right after the job's login passed (the server caches
    logins it checked: launch/secret_files.py's auth_config); with the job's login: 200. The password on no command line."""
    statuses = [http_status(server, password), http_status(server), http_status(server, "wrong-" + password), http_status(server, password)]
    assert statuses == [200, 401, 401, 200]
    command_lines = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
    assert password not in command_lines


def test_a_job_requeued_by_hand_mid_sweep_resumes_and_finishes_on_both_nodes_leaving_nothing(jobs):
    """Acceptance 1 and 2: the quick sweep on two nodes, `scontrol requeue` once a trial has logged an epoch; the job
    runs again, resumes, ends COMPLETED with exit 0, every trial FINISHED once with no epoch logged twice, trials on
    both Ray nodes, nothing left behind. Its MLflow server answers only to the job's login, the same login after the
    requeue; the password is in neither the job log nor any command line."""
    job = jobs["by_hand"]
    server, password = mlflow_login(job, start=1)
    assert_login_required(server, password)
    wait_for("a trial's first epoch", lambda: checkpoints(job), timeout=300, interval=0.5)
    subprocess.run(["scontrol", "requeue", job.id], env=job.env, check=True)
    server, after_requeue = mlflow_login(job, start=2)
    assert after_requeue == password, "the login changed across the requeue"
    assert_login_required(server, password)
    info = wait_until_done(job, timeout=400)
    log = job.log()
    assert password not in log
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "DUE TO JOB REQUEUE" in log and "SIGTERM: stopping the sweep" in log and log.count("resuming ") == 1, log
    # (Not asserted here: the driver's own "stopping: ..." line. On a requeue by hand Slurm sends SIGTERM to every process
    # of the job at once, the Ray nodes and the MLflow server too, so the driver may be cut off before it says anything:
    # seen once, the driver silent until KillWait's SIGKILL; the resume above recovers regardless. The time-limit test,
    # where only the batch script is signalled and it stops the driver first, asserts that line.)
    assert "2/2 trials finished" in log and "[2/2] plain_cnn-" in log, log
    trials, parents = sweep_trials(job, BY_HAND_EPOCHS)
    assert len({run.data.tags["ray.node_id"] for run in trials.values()}) == 2, "both trials ran on one Ray node"
    assert parents and all(run.info.status == "FINISHED" for run in parents)
    assert_nothing_left(job)


def test_a_job_warned_before_its_time_limit_requeues_itself_and_finishes(jobs):
    """Acceptance 3 and 4's wrong token: a limit 2-3 minutes ahead with the warning SIGNAL_LEAD s before it (the limit
    cut once the sweep has trained an epoch, see the module's docstring): the job stops the sweep before the limit and
    requeues itself; its next start (the limit lifted) resumes and finishes. While it runs, a driver with a wrong token
    is refused with an error naming authentication."""
    job = jobs["time_limit"]
    wait_for("the warning signal to requeue the job", lambda: "requeueing job" in job.log(), timeout=400)
    cut = jobs["cut"]
    assert cut["minutes"] * 60 - cut["elapsed"] > SIGNAL_LEAD - 60, cut
    wait_for("the second start's sweep and the wrong-token driver", lambda: "driver" in jobs["refused"] or job.info().get("JobState") in ENDED, timeout=400)
    assert "driver" in jobs["refused"], f"job {job.id} ended before its second start ran the sweep: {job.info()}\n{job.log()}"
    wrong = jobs["refused"]["driver"]
    assert isinstance(wrong, subprocess.CompletedProcess) and wrong.returncode == 2, wrong
    assert "refused this driver's authentication" in wrong.stderr and "RAY_AUTH_MODE=token" in wrong.stderr, wrong.stderr

    info = wait_until_done(job, timeout=400)
    log = job.log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "SIGUSR1: stopping the sweep" in log and "DUE TO TIME LIMIT" not in log, log
    assert re.search(r"stopping: the sweep's state is saved; the [12] running trial\(s\) get up to 10 s to stop", log), log  # the driver's word
    sweep_trials(job, jobs["time_limit_epochs"])
    assert_nothing_left(job)
