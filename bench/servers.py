"""MLflow servers on this machine's loopback, for the bench and the tests: each on a free 127.0.0.1 port with one
worker, in its own process group (stopping the group stops its worker too), started side by side (a server takes
10-20 s to import MLflow) and waited for until ``/health`` answers."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Server:
    """``python -m mlflow <args> --host 127.0.0.1 --port <free> --workers 1``, with ``env`` added to this process's
    environment, its output in ``log`` (discarded where None)."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether anything answers a GET of ``url`` with a success status."""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_servers(*servers: Server, timeout_s: float = 120):
    """Start ``servers`` and yield their base URLs, in order, once each answers ``/health``; stop them all on the way
    out. Raises RuntimeError naming the server (and its log) that exits or does not answer within ``timeout_s``."""
    started: list[tuple[subprocess.Popen, str, Server]] = []
    try:
        for server in servers:
            port = free_port()
            command = [sys.executable, "-m", "mlflow", *server.args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **server.env}  # no job-runner processes: stresslab runs no MLflow jobs
            with open(server.log, "ab") if server.log else open(os.devnull, "wb") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            started.append((process, f"http://127.0.0.1:{port}", server))
        deadline = time.monotonic() + timeout_s
        for process, base, server in started:
            while not answers(base + "/health"):
                if process.poll() is not None or time.monotonic() > deadline:
                    where = f"; its log: {server.log}" if server.log else ""
                    raise RuntimeError(f"`mlflow {' '.join(server.args)}` did not start at {base}{where}")
                time.sleep(0.5)
        yield [base for _, base, _ in started]
    finally:
        for process, _, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the server and its worker
            process.wait(timeout=30)
