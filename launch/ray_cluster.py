"""Ray for a sweep: a fresh local Ray of its own, or an existing cluster joined with the project code, and the probes
that tell in seconds why an address cannot work (nothing there, or a cluster refusing this driver's token)."""
from __future__ import annotations

import json
import os

import tracking
from config.errors import InputError
from launch import secret_files
from tracking.private_apis import LOCAL_RAY_SYSTEM_CONFIG, refuses_token

# MLflow prints a "View run" link for every run it ends (36 trials: 72 lines); the final summary prints the runs table's URL.
QUIET_MLFLOW = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def init_ray(address: str | None, resumed: dict | None = None) -> None:
    """Join ``address`` (shipping the project code to the cluster) or start a fresh local Ray, never a stale one. The
    trials of a ``resumed`` sweep log to its tracking URI (possibly not the address it was launched with)."""
    import ray

    if resumed:
        os.environ[tracking.SWEEP_URI_ENV] = json.dumps({resumed["sweep_id"]: resumed["tracking_uri"]})
    os.environ.setdefault(QUIET_MLFLOW, "true")
    if address and (problem := address_problem(address)):  # before ray.init: it retries a dead address, or a refused token, for minutes
        raise InputError(problem)
    if ray.is_initialized():
        return
    env_vars = {k: os.environ[k] for k in (tracking.SWEEP_URI_ENV, QUIET_MLFLOW) if k in os.environ}
    if address:
        excludes = ["mlruns/", "ray_results/", ".venv/", "data/", ".git/", "reports/", ".slurm/"]  # .slurm/: job tokens
        try:
            ray.init(address=address, runtime_env={"working_dir": str(tracking.PROJECT_ROOT), "excludes": excludes, "env_vars": env_vars})
        except ray.exceptions.AuthenticationError as err:  # it answered, and refused us: not the same as "no cluster there"
            raise InputError(refused_token(address, err.message)) from None
        except ConnectionError as err:
            if refuses_token(address):  # with a token of its own, ray.init retries a refused one and says only "failed to connect"
                raise InputError(refused_token(address, "InvalidAuthToken: the token sent does not match the cluster's")) from None
            raise InputError(f"cannot reach a Ray cluster at --address {address} ({err}); start one with `ray start --head` or leave out --address") from err
    else:  # "local": start our own, whatever /tmp/ray/ray_current_cluster says; no dashboard, no usage stats phoned home
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        secret_files.local_ray_token()  # its token readable by this user only (Ray writes it with the umask's 0644)
        # Ray prestarts a worker per CPU for the first driver; our job's runtime_env makes the trial actors need workers of
        # their own, so those would only boot and exit again beside them (~2 CPU-s on 2 cores).
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(tracking.PROJECT_ROOT), **env_vars}},
                 _system_config=LOCAL_RAY_SYSTEM_CONFIG)


def address_problem(address: str, timeout: float = 5.0) -> str | None:
    """Why ``--address`` HOST:PORT cannot work, found in seconds: nothing listening there, or a cluster refusing this
    process's token. None when it may work (and for "auto" or ray:// addresses, left to Ray's own checks). Measured
    with Ray 2.60: ray.init on an address where nothing listens retried for more than five minutes."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        return (f"cannot reach a Ray cluster at --address {address}: nothing answers there ({err.strerror or err}); start one with "
                f"`ray start --head` or leave out --address")
    if refuses_token(address):
        return refused_token(address, "InvalidAuthToken: the token sent does not match the cluster's")
    return None


def refused_token(address: str, detail: str) -> str:
    return (f"the Ray cluster at --address {address} refused this driver's authentication ({detail}); it runs with token "
            f"authentication (Ray 2.59+ turns it on for `ray start --head` where ~/.ray/auth_token exists): run with RAY_AUTH_MODE=token "
            f"and the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
