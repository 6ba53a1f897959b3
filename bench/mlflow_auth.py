"""Bench part 6: what MLflow's basic-auth login costs per REST request, without and with the login cache that
``launch.secret_files.auth_config`` turns on for the Slurm job's server (``docs/security.md``).

An ``mlflow server --app-name basic-auth --workers 1`` (as ``slurm/sweep.sbatch`` starts it) with a login written by
``launch.secret_files.mlflow_login``, once with ``auth_cache_ttl_seconds = 0`` (MLflow's default) and once with ours:
one run with a metric, then the same metric-history request (what ``log_model`` sends once per metric of the run)
``requests`` times, authenticated. A wrong password is then sent after the right one was cached: it must get 401.
"""
from __future__ import annotations

import base64
import contextlib
import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.servers import Server, mlflow_servers
from launch.secret_files import AUTH_CACHE_TTL_S, auth_config, mlflow_login, read_env, write_secret


@contextlib.contextmanager
def auth_servers(folder: Path, cache_ttls: tuple[int, ...]):
    """One basic-auth MLflow server per login cache TTL, each with a new login in its own subfolder of ``folder``
    (``bench.servers``: free ports, own process groups, started side by side); yields {TTL: (base URL, username,
    password)}."""
    servers, logins = [], []
    for ttl in cache_ttls:
        sub = folder / f"ttl-{ttl}"
        sub.mkdir()
        files = mlflow_login(sub)
        client = read_env(files["client"])
        logins.append((client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]))
        write_secret(files["auth"], auth_config(files["auth"].parent, logins[-1][1], ttl))
        servers.append(Server(["server", "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{sub / 'mlflow.db'}",
                               "--artifacts-destination", str(sub / "artifacts")], read_env(files["server"]), sub / "server.log"))
    with mlflow_servers(*servers) as bases:
        yield {ttl: (base, *login) for ttl, base, login in zip(cache_ttls, bases, logins)}


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The HTTP basic-auth header of a login."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def status(url: str, user: str | None = None, password: str | None = None) -> int | None:
    """The HTTP status of a GET, with a basic-auth header where ``user`` is given; None where nothing answers."""
    request = urllib.request.Request(url, headers=basic_auth(user, password) if user is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def post(url: str, user: str, password: str, body: dict) -> dict:
    """An authenticated JSON POST to MLflow's REST API; its JSON answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **basic_auth(user, password)})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def time_requests(base: str, user: str, password: str, requests: int) -> tuple[float, float, int | None]:
    """(s per authenticated request, s for one request with a wrong password, that request's status)."""
    api = base + "/api/2.0/mlflow"
    experiment = post(f"{api}/experiments/create", user, password, {"name": "bench"})["experiment_id"]
    run = post(f"{api}/runs/create", user, password, {"experiment_id": experiment})["run"]["info"]["run_id"]
    post(f"{api}/runs/log-metric", user, password, {"run_id": run, "key": "loss", "value": 1.0, "timestamp": 0})
    history = f"{api}/metrics/get-history?run_id={run}&metric_key=loss"
    start = time.perf_counter()
    for _ in range(requests):
        if status(history, user, password) != 200:
            raise RuntimeError(f"the server at {base} refused its own login")
    per_request = (time.perf_counter() - start) / requests
    start = time.perf_counter()
    wrong = status(history, user, "x" + password)
    return per_request, time.perf_counter() - start, wrong


def bench_mlflow_auth(requests: int) -> dict[int, float]:
    print(f"\n6. MLflow basic-auth server (--workers 1, as the Slurm job runs it): {requests} authenticated metric-history requests")
    per_request = {}
    with tempfile.TemporaryDirectory() as tmp, auth_servers(Path(tmp), (0, AUTH_CACHE_TTL_S)) as logins:
        for ttl, login in logins.items():  # one server at a time: the other only waits
            seconds, wrong_s, wrong = time_requests(*login, requests)
            per_request[ttl] = seconds
            label = "no login cache (MLflow's default)" if ttl == 0 else f"login cache {ttl} s (stresslab's auth.ini)"
            print(f"   {label:<42}{seconds * 1000:>8.1f} ms a request   (a wrong password after it: {wrong} in {wrong_s * 1000:.0f} ms)", flush=True)
    print(f"   the cache makes a request {per_request[0] / per_request[AUTH_CACHE_TTL_S]:.1f}x faster", flush=True)
    return per_request
