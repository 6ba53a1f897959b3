"""Where a run comes from: the code (git commit, uncommitted diff), the environment (library versions, host), the
driver that launched it (and whether it is still alive), and the test pixels it was judged on."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from tracking import DRIVER_TAG, PROJECT_ROOT
from tracking.store import retry, search_all, set_tags

PACKAGES = ("torch", "torchvision", "ray", "mlflow", "numpy", "grad-cam")


def git(*args: str, root: Path = PROJECT_ROOT) -> str:
    """Output of a git command in the checkout ('' outside git)."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside git)."""
    commit = git("rev-parse", "HEAD", root=root)
    if not commit:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": "true" if git("status", "--porcelain", "--untracked-files=no", root=root) else "false"}


def git_diff(root: Path = PROJECT_ROOT, limit: int = 1_000_000) -> str:
    """``git diff HEAD`` of a dirty checkout (tracked files), cut at ``limit`` characters; '' when clean."""
    diff = git("diff", "HEAD", root=root)
    return diff if len(diff) <= limit else diff[:limit] + f"\n[cut at {limit} characters of {len(diff)}]\n"


def environment_tags(entry_point: str = "sweep.py") -> dict[str, str]:
    """Code version, package versions, host and Python: what reproducing a run needs. The ``mlflow.source.*`` and
    ``mlflow.user`` tags fill the MLflow UI's Source, Version and User columns (runs made through the client get none)."""
    import getpass

    tags = git_state()
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "missing"
    tags.update({"host": socket.gethostname(), "python": platform.python_version(),
                 "mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL", "mlflow.user": getpass.getuser()})
    if tags["git.commit"] != "unknown":
        tags.update({"mlflow.source.git.commit": tags["git.commit"], "mlflow.source.git.branch": git("rev-parse", "--abbrev-ref", "HEAD")})
    return tags


def driver_id() -> str:
    """This process as host:pid:start time (the start time tells a reused pid apart)."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.0f}"


def driver_alive(driver: str) -> bool | None:
    """Whether the driver that tagged a run still runs; None when it ran on another host (unknowable here)."""
    import psutil

    host, _, rest = driver.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" == started
    except psutil.Error:
        return False


def images_digest(images) -> str:
    """SHA-256 of a uint8 image array's bytes (C order)."""
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def reap_orphans(mlflow_client, experiment_id: str) -> int:
    """Mark KILLED, with a tag saying why, the RUNNING runs whose driver on this host is gone; returns how many."""
    runs = search_all(mlflow_client, [experiment_id], "attributes.status = 'RUNNING'")
    reaped = 0
    for run in runs:
        driver = run.data.tags.get(DRIVER_TAG)
        if driver and driver_alive(driver) is False:
            set_tags(mlflow_client, run.info.run_id, {"killed_because": f"its driver {driver} is gone (found by a later launch)"})
            retry(lambda: mlflow_client.set_terminated(run.info.run_id, status="KILLED"))
            reaped += 1
    return reaped
