"""Fault injection on small synthetic sweeps: nothing finished is lost, nothing is left RUNNING.

Each test adds a summary line (fault, trials affected, results lost) printed at the end of the run.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pytest

from tracking import metrics
import sweep
import tracking
from config.settings import TrialConfig
from config.schema import build
from tests.conftest import FAULT_SUMMARY, ROOT, TINY, write_experiments
from tracking import TrialRun
from trainable import fit


def runs_of(uri: str, experiment: str, kind: str = "trial"):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], f"tags.`{tracking.KIND_TAG}` = '{kind}'") if exp else []


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def kill_when_training(uri: str, experiment: str, name: str, epoch: int, killed: list) -> None:
    """Watch MLflow; once run ``name`` has logged ``epoch``, SIGKILL its worker process (mid-epoch)."""
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        try:
            client, runs = runs_of(uri, experiment)
            for run in runs:
                if run.info.run_name == name and run.data.metrics.get(metrics.EPOCH, 0) >= epoch:
                    pid = int(run.data.tags["pid"])
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
        except Exception:  # the store may be busy or not created yet
            pass
        time.sleep(0.2)


def test_raise_nan_and_sigkill_in_one_sweep(tmp_path, monkeypatch):
    # The data of the n_test=121 trials passes the driver's check, then its decoded cache is corrupted before they load it
    # (another job on a shared cache, a full disk): those trials raise in their setup.
    grid = {"data.n_test": [120, 121], "optimizer.lr": [0.05, 1.0e6]}
    cache = tmp_path / "cache"
    path = write_experiments(tmp_path / "e.yaml", {"faults": {"epochs": 4, "max_failures": 1, "schedule": {"name": "constant"}, "augment": "cropflip",
                                                              "data": {**TINY["data"], "cache_dir": str(cache)}, "grid": grid}})
    checked = sweep.prepare_data

    def check_then_corrupt(cfg, *args, **kwargs):
        checked(cfg, *args, **kwargs)
        for decoded in cache.glob("synthetic-*.npz"):
            with np.load(decoded) as f:
                if len(f["test_y"]) == 121:
                    decoded.write_bytes(b"not a zip")
                    corrupted.append(decoded)

    corrupted: list = []
    monkeypatch.setattr(sweep, "prepare_data", check_then_corrupt)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    killed: list = []
    watcher = threading.Thread(target=kill_when_training, args=(uri, "faults", "plain_cnn-cropflip-s42-n_test120-lr0.05", 2, killed), daemon=True)
    watcher.start()
    code = sweep.main(["--config", str(path), "--experiment", "faults", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
    watcher.join(timeout=5)
    assert code == 1  # some trials failed; the sweep itself ran to the end
    client, runs = runs_of(uri, "faults")
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    assert all(len(v) == 1 for v in by_name.values()), "a restarted trial must keep its one MLflow run"
    assert {r.info.status for r in runs} == {"FINISHED", "FAILED"}

    # SIGKILL mid-training: restarted from its checkpoint, same run, same final metrics as an uninterrupted run.
    (survivor,) = by_name["plain_cnn-cropflip-s42-n_test120-lr0.05"]
    assert killed and survivor.info.status == "FINISHED" and survivor.data.tags["pid"] != str(killed[0])
    assert steps(client, survivor.info.run_id, metrics.TRAIN_LOSS) == [1, 2, 3, 4]  # no duplicate steps
    problems: list = []
    cfg = build(TrialConfig, {k: v for k, v in TINY.items() if k not in ("resources", "max_failures")} | {"epochs": 4, "schedule": {"name": "constant"}, "augment": "cropflip"}, "", problems)
    expected = fit(cfg, TrialRun(), lambda values, state: None, threads=1)
    for key in (metrics.TEST_ACC, metrics.TEST_LOSS, metrics.TRAIN_LOSS):
        assert survivor.data.metrics[key] == expected[key], key
    FAULT_SUMMARY.append("worker SIGKILL mid-epoch   trials affected: 1  restarted from checkpoint: yes  results lost: 0")

    # NaN loss: stops at once, FAILED, not retried into the same divergence.
    (diverged,) = by_name["plain_cnn-cropflip-s42-n_test120-lr1e+06"]
    assert diverged.info.status == "FAILED" and "training loss is" in diverged.data.tags["error"] and "diverged" in diverged.data.tags
    assert steps(client, diverged.info.run_id, metrics.TRAIN_LOSS) == []
    FAULT_SUMMARY.append("loss NaN/inf               trials affected: 1  stopped at epoch 1, FAILED  results lost: 0")

    # A trial that raises: FAILED with its error kept, the others unaffected.
    raised = by_name["plain_cnn-cropflip-s42-n_test121-lr0.05"] + by_name["plain_cnn-cropflip-s42-n_test121-lr1e+06"]
    assert len(corrupted) == 1
    for run in raised:
        assert run.info.status == "FAILED" and f"RuntimeError: corrupt data cache {corrupted[0]}" in run.data.tags["error"]
    FAULT_SUMMARY.append(f"trial raises               trials affected: {len(raised)}  marked FAILED with error  results lost: 0")
    parent = runs_of(uri, "faults", "sweep")[1][0]
    assert parent.info.status == "FAILED"


def sweep_cmd(path, uri, storage, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "sweep.py"), "--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(storage), *extra]


@pytest.mark.slow  # the default suite covers SIGTERM -> resume with no step twice in tests/test_slurm.py (a requeued job)
def test_driver_sigterm_then_resume_loses_and_duplicates_nothing(tmp_path):
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 3, "max_concurrent_trials": 1, "data": {**TINY["data"], "n_train": 1200},
                                                           "grid": {"seed": [1, 2, 3]}}})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    driver = subprocess.Popen(sweep_cmd(path, uri, tmp_path / "ray"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finished_before = {}
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        try:
            client, runs = runs_of(uri, "tiny")
            finished_before = {r.info.run_id: r.info.end_time for r in runs if r.info.status == "FINISHED"}
            if finished_before and any(r.info.status == "RUNNING" for r in runs):
                break
        except Exception:
            pass
        time.sleep(0.3)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 1 and "interrupted" in out, out[-3000:]
    assert "stopping: the sweep's state is saved; the 1 running trial(s) get up to 10 s to stop" in out, out[-3000:]
    client, runs = runs_of(uri, "tiny")
    assert not any(r.info.status == "RUNNING" for r in runs)
    (interrupted,) = [p for p in (tmp_path / "ray").iterdir() if p.name.startswith("tiny-")]
    # a --rerun-best in between is a newer launch of the same experiment; --resume must still pick the interrupted sweep
    rerun = subprocess.run(sweep_cmd(path, uri, tmp_path / "ray", "--rerun-best"), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert len(list((tmp_path / "ray").iterdir())) == 2
    resumed = subprocess.run(sweep_cmd(path, uri, tmp_path / "ray", "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming {interrupted}" in resumed.stdout
    client, runs = runs_of(uri, "tiny")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # none duplicated, none left RUNNING
    for run in runs:
        assert steps(client, run.info.run_id, metrics.TRAIN_LOSS) == [1, 2, 3]
        if run.info.run_id in finished_before:
            assert run.info.end_time == finished_before[run.info.run_id]  # not re-run
    assert runs_of(uri, "tiny", "sweep")[1][0].info.status == "FINISHED"
    FAULT_SUMMARY.append(f"driver SIGTERM, rerun, --resume  trials affected: {3 - len(finished_before)}  finished kept: {len(finished_before)}  results lost: 0")


def test_unwritable_output_folders_are_refused_with_the_path(tmp_path, capsys):
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {}})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = sweep.main(["--config", str(path), "--experiment", "tiny", "--storage", str(blocker / "ray"), "--tracking-uri", f"sqlite:///{tmp_path}/m/mlflow.db"])
    assert code == 2 and f"cannot write to {blocker / 'ray'}" in capsys.readouterr().err
    from analysis.__main__ import main as analysis_main

    assert analysis_main(["--experiment", "tiny", "--out", str(blocker / "out")]) == 2
    assert f"cannot write the report to {blocker / 'out'}" in capsys.readouterr().err
    FAULT_SUMMARY.append("unwritable output folder   trials affected: 0  refused before start, path named  results lost: 0")


def launch_with_address(tmp_path, capsys, address: str):
    """A CLI launch with --address: (exit code, stderr, the launch's parent run, seconds it took)."""
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {}})
    uri = f"sqlite:///{tmp_path}/m/mlflow.db"
    started = time.monotonic()
    code = sweep.main(["--config", str(path), "--experiment", "tiny", "--address", address, "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
    _, (parent,) = runs_of(uri, "tiny", kind="sweep")
    return code, capsys.readouterr().err, parent, time.monotonic() - started


def test_unreachable_ray_cluster_is_refused_at_once_and_leaves_no_running_run(tmp_path, capsys):
    """Nothing listens at the address: exit 2 in seconds (ray.init itself retries such an address for minutes)."""
    from bench.servers import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, err, parent, seconds = launch_with_address(tmp_path, capsys, address)
    assert code == 2 and f"cannot reach a Ray cluster at --address {address}: nothing answers there" in err
    assert seconds < 60 and parent.info.status == "FAILED"
    FAULT_SUMMARY.append(f"unreachable Ray cluster    trials affected: 0  refused with exit 2 in {seconds:.0f} s, parent run FAILED  results lost: 0")


def test_a_cluster_refusing_our_token_is_named_as_authentication_not_as_absent(tmp_path, capsys, monkeypatch):
    """Something listens, and the GCS answers InvalidAuthToken (here: the probe's RPC, as Ray raises it): the error
    names authentication and the fix. The real refusal, by a Ray cluster with a token of its own: tests/test_slurm.py."""
    import socket

    from ray.exceptions import AuthenticationError

    def refuse(*args, **kwargs):
        raise AuthenticationError("InvalidAuthToken: Authentication token is missing or incorrect")

    monkeypatch.setattr("ray._raylet.GcsClient", refuse)
    with socket.create_server(("127.0.0.1", 0)) as server:
        code, err, parent, _ = launch_with_address(tmp_path, capsys, f"127.0.0.1:{server.getsockname()[1]}")
    assert code == 2 and "refused this driver's authentication" in err and "RAY_AUTH_MODE=token" in err and "cannot reach" not in err
    assert parent.info.status == "FAILED"


def test_a_tracking_server_refusing_the_sweep_is_named_and_nothing_starts(tmp_path, capsys):
    """An MLflow server that answers 403 (as one started without this host in --allowed-hosts does): exit 2 naming the
    store and its answer, raised while Ray starts beside it; no trial runs."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def refuse(self):
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error_code": "PERMISSION_DENIED", "message": "Invalid Host header"}')

        do_GET = do_POST = do_PATCH = refuse

        def log_message(self, *args):
            pass

    path = write_experiments(tmp_path / "e.yaml", {"tiny": {}})
    with ThreadingHTTPServer(("127.0.0.1", 0), Refuse) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        code = sweep.main(["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
        server.shutdown()
    err = capsys.readouterr().err
    assert code == 2 and f"the MLflow tracking store {uri} refused to set up the sweep" in err and "Invalid Host header" in err, err
    assert not list((tmp_path / "ray").glob("*/*/params.json"))  # no trial started
