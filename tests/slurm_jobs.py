"""The two jobs of tests/test_slurm.py, run in the background from the start of the test session.

A Slurm job spends most of its minutes starting Ray and MLflow on its nodes and stopping them again, with both cores
busy; the rest of the suite leaves about a third of the machine idle (measured with vmstat: one core idle through
most of its first 13 minutes). So the jobs are submitted when the session starts (conftest.py does it when a test
of test_slurm.py is selected) and the tests of test_slurm.py, which run last, only wait for them and check them.

What a test would do mid-job is done here, by threads, at the moment it is due:
- the job "by_hand" is requeued with ``scontrol requeue`` once a trial has checkpointed its first epoch;
- while the job "time_limit" runs its second start, a driver with a wrong token tries to join its Ray cluster;
- a requeued job is made eligible at once (``scontrol update StartTime=now``; Slurm holds one back for two minutes,
  which only costs the test time) and given its after-requeue time limit.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from slurm_cluster import slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--experiment", "quick", "--set", "data.name=synthetic", "--set", "arch=plain_cnn", "--set", "robustness=false",
         "--set", "resources.cpu=1"]
BY_HAND_EPOCHS = 2  # acceptance 1's command; requeued once a trial has checkpointed its first, so at least one epoch is resumed
TIME_LIMIT_EPOCHS = 8  # more than the first start can train before its warning, which comes 120-150 s in (the first start's
                       # cluster and sweep start in 50-100 s, depending on what else runs, then an epoch takes ~10 s)
TIME_LIMIT = ["--time=4", "--signal=B:USR1@120"]


@dataclass
class Job:
    """A submitted job and the copy of the checkout it was submitted from (its own mlruns/ and ray_results/)."""

    copy: Path
    env: dict
    id: str = ""
    time_limit_after_requeue: str | None = None  # what a requeued start gets (the test lifts a limit that requeued the job)
    events: dict = field(default_factory=dict)  # what the background threads did to it, and when

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


def hurry(job: Job) -> None:
    """A requeued job waiting: give it its after-requeue time limit (if any) and make it eligible now. Done every second:
    while a requeued job is still completing it reads PENDING, and Slurm resets its begin time when it completes."""
    info = job.info()
    if info.get("JobState") != "PENDING" or info.get("Restarts", "0") == "0":
        return
    if job.time_limit_after_requeue:
        subprocess.run(["scontrol", "update", f"JobId={job.id}", f"TimeLimit={job.time_limit_after_requeue}"], env=job.env, capture_output=True)
    if info.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], env=job.env, capture_output=True)


def requeue_after_first_checkpoint(job: Job, stop: threading.Event) -> None:
    checkpoints = lambda: list((job.copy / "ray_results" / f"slurm-{job.id}").glob("*/*/checkpoint_*"))  # one per epoch and trial
    while not stop.wait(0.5):
        if checkpoints():
            job.events["requeue"] = subprocess.run(["scontrol", "requeue", job.id], env=job.env, capture_output=True, text=True)
            return


def wrong_token_driver_during_second_start(job: Job, stop: threading.Event) -> None:
    while not stop.wait(1):
        log = job.log()
        if log.count("resuming ") == 1:
            head = re.findall(r"Ray head \S+ at (\S+:\d+)", log)[-1]
            job.events["wrong_token"] = subprocess.run(
                [sys.executable, "sweep.py", *QUICK, "--address", head], cwd=job.copy, capture_output=True, text=True, timeout=90,
                env={**job.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64})
            job.events["wrong_token_while"] = job.info().get("JobState")  # the cluster it was refused by was still up
            return


@contextlib.contextmanager
def background_jobs(base: Path):
    """Start the test Slurm, submit both jobs from two copies of the checkout with a HOME holding a Ray token (what an
    earlier local sweep leaves, not the jobs' token), and keep the threads above running; yield {name: Job}."""
    with slurm_cluster(base / "slurm", cpus=2) as slurm:  # 2 CPUs a node: the two jobs run side by side
        (base / "home" / ".ray").mkdir(parents=True)
        (base / "home" / ".ray" / "auth_token").write_text("0" * 64)
        env = {**slurm, "HOME": str(base / "home"), "STRESSLAB_PYTHON": sys.executable, "STRESSLAB_JOIN_TIMEOUT": "300"}
        env.pop("RAY_ADDRESS", None)
        submitted = {
            "by_hand": (Job(checkout_copy(base / "by-hand"), env), ["--nodes=2", "slurm/sweep.sbatch", *QUICK, "--set", f"epochs={BY_HAND_EPOCHS}"]),
            "time_limit": (Job(checkout_copy(base / "time-limit"), env, time_limit_after_requeue="UNLIMITED"),
                           ["--nodes=2", *TIME_LIMIT, "slurm/sweep.sbatch", *QUICK, "--set", f"epochs={TIME_LIMIT_EPOCHS}"]),
        }
        for job, args in submitted.values():
            out = subprocess.run(["sbatch", "--parsable", *args], cwd=job.copy, env=env, capture_output=True, text=True, check=True).stdout
            job.id = out.strip().split(";")[0]
            job.events["submitted"] = time.monotonic()
        jobs = {name: job for name, (job, _) in submitted.items()}
        stop = threading.Event()

        def hurry_requeued() -> None:
            while not stop.wait(1):
                for job in jobs.values():
                    hurry(job)

        threads = [threading.Thread(target=hurry_requeued, daemon=True),
                   threading.Thread(target=requeue_after_first_checkpoint, args=(jobs["by_hand"], stop), daemon=True),
                   threading.Thread(target=wrong_token_driver_during_second_start, args=(jobs["time_limit"], stop), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            yield jobs
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
