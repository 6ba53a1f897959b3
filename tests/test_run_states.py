"""Every run ends in the state that happened: schedulers, stale clusters, loopback, exceptions, a locked store, no data.

Real Ray and MLflow on synthetic data; faults injected for real where the process allows it.
"""
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from tracking import metrics
import launch.tuner
import sweep
import tracking
from tests.conftest import ROOT, write_experiments

SMALL = ["--set", "data.name=synthetic", "--set", "data.n_train=600", "--set", "data.n_test=100", "--set", "model.widths=[8, 16, 16]"]


def runs(uri: str, experiment: str, kind: str | None = None) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`{tracking.KIND_TAG}` = '{kind}'" if kind else ""
    return client.search_runs([exp.experiment_id], query, max_results=1000) if exp else []


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory):
    """The issue's ASHA command on the project's own experiments.yaml (smaller images and model), in-process."""
    tmp = tmp_path_factory.mktemp("asha")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    argv = ["--config", str(ROOT / "experiments.yaml"), "--experiment", "lr-search", "--tracking-uri", uri, "--storage", str(tmp / "ray"),
            "--set", "num_samples=6", "--set", "epochs=4", "--set", "scheduler.grace_period=1", "--set", "resources.gpu=0",
            "--set", "resources.cpu=1", *SMALL]
    return argv, uri, tmp


def test_asha_completed_runs_finish_and_pruned_runs_say_so(asha_sweep, capsys):
    argv, uri, _ = asha_sweep
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    trials = runs(uri, "lr-search", "trial")
    assert len(trials) == 6
    client = mlflow.MlflowClient(uri)
    finished = [r for r in trials if r.info.status == "FINISHED"]
    pruned = [r for r in trials if r.info.status != "FINISHED"]
    assert finished and pruned, [(r.info.status, r.data.tags.get("stopped_by")) for r in trials]
    for run in finished:  # trained all 4 epochs, tested, predictions logged, no error
        assert run.data.metrics[metrics.EPOCH] == 4 and metrics.TEST_ACC in run.data.metrics and "error" not in run.data.tags
        assert metrics.PREDICTIONS_FILE in {a.path for a in client.list_artifacts(run.info.run_id)}
    for run in pruned:
        epochs = int(run.data.tags["epochs_completed"])
        assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "asha" and 1 <= epochs < 4
        assert run.data.metrics[metrics.EPOCH] == epochs and metrics.TEST_ACC not in run.data.metrics and "error" not in run.data.tags
        assert f"pruned at epoch {epochs} (asha)" in out
    assert f"{len(finished)}/6 trials finished, {len(pruned)} pruned by asha" in out
    # where a finished trial's time went: the means of what the finished runs logged last (the pruned ones left out);
    # a stage under 0.05 s is not printed, and lr-search runs neither stress test
    line = next(s for s in out.splitlines() if s.startswith("time per finished trial"))
    head, stages = line.split(": ", 1)
    assert head == f"time per finished trial (mean of {len(finished)})"
    printed = dict(stage.removesuffix(" s").rsplit(" ", 1) for stage in stages.split(", "))  # label -> seconds as printed
    logged = {"last epoch": metrics.EPOCH_SECONDS, "rest of an epoch": metrics.TIME_EPOCH_REST, "test set": metrics.TIME_TEST,
              "corruption test": metrics.TIME_ROBUSTNESS, "FGSM/PGD": metrics.TIME_ADVERSARIAL, "artifacts": metrics.TIME_ARTIFACTS}
    for label, key in logged.items():
        mean = sum(r.data.metrics[key] for r in finished) / len(finished)
        assert printed.get(label) == (f"{mean:.1f}" if mean >= 0.05 else None), (label, mean, line)
    assert "last epoch" in printed and "corruption test" not in printed and "FGSM/PGD" not in printed, line
    assert runs(uri, "lr-search", "sweep")[0].info.status == "FINISHED"


def test_analysis_and_rerun_work_on_an_asha_sweep(asha_sweep, tmp_path, capsys):
    from analysis.pipeline import run_analysis

    argv, uri, _ = asha_sweep
    if not runs(uri, "lr-search", "trial"):
        sweep.main(argv)
    capsys.readouterr()
    report = run_analysis("lr-search", uri, tmp_path, max_cams=4, log_to_mlflow=False, corruption_images=0, road_images=4)
    skipped = [r for r in runs(uri, "lr-search", "trial") if r.info.status != "FINISHED"]
    out = capsys.readouterr().out
    assert report.exists() and out.count("note: skipping") == len(skipped) and "stopped by asha at epoch" in out
    assert len(list((tmp_path / "runs").iterdir())) == 6 - len(skipped)
    assert sweep.main(argv + ["--rerun-best"]) == 0
    out = capsys.readouterr().out
    assert out.count("note: skipping") == len(skipped)
    (rerun,) = runs(uri, "lr-search", "rerun")
    assert rerun.info.status == "FINISHED"


def test_epochs_below_the_grace_period_are_refused(capsys):
    code = sweep.main(["--config", str(ROOT / "experiments.yaml"), "--experiment", "lr-search", "--set", "epochs=1", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "scheduler.grace_period" in err and "grace_period (2) must be <= epochs (1)" in err


def test_milestones_beyond_epochs_are_refused(capsys):
    code = sweep.main(["--config", str(ROOT / "experiments.yaml"), "--experiment", "cifar10-stress", "--set", "epochs=20", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "schedule.milestones: milestones [25, 40] are not inside epochs 1..19" in err
    assert "use --set schedule.milestones=[10,16]" in err


def test_a_one_epoch_smoke_test_of_the_main_study_is_told_the_setting_that_works(capsys):
    code = sweep.main(["--config", str(ROOT / "experiments.yaml"), "--experiment", "cifar10-stress", "--set", "epochs=1", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "milestones [25, 40] are not below epochs (1: no epoch is)" in err and "use --set schedule.milestones=[]" in err
    assert sweep.main(["--config", str(ROOT / "experiments.yaml"), "--experiment", "cifar10-stress", "--set", "epochs=1",
                       "--set", "schedule.milestones=[]", "--dry-run"]) == 0  # the fix it names works


# --- a stale cluster file, and what listens where ---------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@pytest.fixture(scope="module")
def local_sweep_beside_a_dead_cluster(tmp_path_factory):
    """A CLI sweep while /tmp/ray/ray_current_cluster points at a dead address; every listening socket of its tree."""
    tmp = tmp_path_factory.mktemp("local")
    stale = Path("/tmp/ray/ray_current_cluster")
    before = stale.read_text() if stale.exists() else None
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("127.0.0.1:1")  # nothing listens on port 1
    path = write_experiments(tmp / "e.yaml", {"tiny": {"epochs": 1}})  # one trial: its worker's sockets are watched too
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                            "RAY_AUTH_TOKEN_PATH")}
    token = tmp / "home" / ".ray" / "auth_token"  # as Ray 2.60 leaves it under umask 022: 0644 in a 0755 folder
    token.parent.mkdir(parents=True)
    token.write_text("e" * 64)
    os.chmod(token.parent, 0o755)
    os.chmod(token, 0o644)
    env["HOME"] = str(tmp / "home")
    listening: set[tuple[str, str, int]] = set()
    try:
        driver = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "--config", str(path), "--experiment", "tiny", "--tracking-uri", uri,
                                   "--storage", str(tmp / "ray")], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while driver.poll() is None and time.time() < deadline:
            for proc in process_tree(driver.pid):
                try:
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            listening.add((proc.name(), conn.laddr.ip, conn.laddr.port))
                except psutil.Error:
                    pass
            time.sleep(0.5)
        out, _ = driver.communicate(timeout=60)
    finally:
        if before is None:
            stale.unlink(missing_ok=True)
        else:
            stale.write_text(before)
    return driver.returncode, out, listening, uri


def test_after_a_local_sweep_its_ray_token_is_readable_by_its_owner_only(local_sweep_beside_a_dead_cluster):
    code, out, _, uri = local_sweep_beside_a_dead_cluster
    assert code == 0, out[-3000:]
    token = Path(uri[len("sqlite:///"):]).parents[1] / "home" / ".ray" / "auth_token"
    assert token.read_text() == "e" * 64  # the user's token, kept
    assert (stat.S_IMODE(token.stat().st_mode), stat.S_IMODE(token.parent.stat().st_mode)) == (0o600, 0o700)


def test_a_dead_cluster_file_does_not_stop_a_local_sweep(local_sweep_beside_a_dead_cluster):
    code, out, _, uri = local_sweep_beside_a_dead_cluster
    assert code == 0, out[-3000:]
    assert {r.info.status for r in runs(uri, "tiny", "trial")} == {"FINISHED"}


def test_a_local_sweep_listens_on_loopback_only(local_sweep_beside_a_dead_cluster):
    _, out, listening, _ = local_sweep_beside_a_dead_cluster
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the watcher saw Ray's servers
    exposed = {entry for entry in listening if entry[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    assert not exposed, exposed


# --- no run left RUNNING, whatever raises -----------------------------------------------------


def no_running(uri: str, experiment: str) -> bool:
    return not [r for r in runs(uri, experiment) if r.info.status == "RUNNING"]


@pytest.mark.parametrize("where", ["build_tuner", "fit"])
def test_exceptions_after_the_parent_run_leave_nothing_running(tmp_path, monkeypatch, where):
    from ray import tune

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure in {where}")

    monkeypatch.setattr(*(launch.tuner, "build_tuner", boom) if where == "build_tuner" else (tune.Tuner, "fit", boom))
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 1}})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="injected failure"):
        sweep.main(["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
    (parent,) = runs(uri, "tiny", "sweep")
    assert parent.info.status == "FAILED" and "injected failure" in parent.data.tags["error"] and no_running(uri, "tiny")


def run_of_a_gone_driver(uri: str) -> str:
    """A RUNNING trial run tagged with the driver id of a process that has exited; returns its id."""
    client = tracking.client(uri)
    exp_id = tracking.ensure_experiment(client, "tiny", "", uri)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    driver = f"{socket.gethostname()}:{gone.pid}:{psutil.Process().create_time():.0f}"
    return client.create_run(exp_id, tags={tracking.DRIVER_TAG: driver, tracking.KIND_TAG: "trial"}).info.run_id


def test_orphans_are_reaped_and_a_failed_restore_or_upload_leaves_nothing_running(tmp_path, monkeypatch, capsys):
    import json

    from ray import tune

    from analysis.logged import log_analysis_run

    path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 1}})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    argv = ["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]
    orphan = run_of_a_gone_driver(uri)
    assert sweep.main(argv) == 0
    reaped = mlflow.MlflowClient(uri).get_run(orphan)  # the launch closed what a dead driver had left RUNNING
    assert reaped.info.status == "KILLED" and "is gone" in reaped.data.tags["killed_because"]
    assert "left RUNNING by a driver that is gone" in capsys.readouterr().out
    (record,) = (tmp_path / "ray").glob("*/stresslab.json")
    record.write_text(json.dumps(json.loads(record.read_text()) | {"status": "interrupted"}))
    monkeypatch.setattr(tune.Tuner, "restore", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected failure in Tuner.restore")))
    with pytest.raises(RuntimeError, match="Tuner.restore"):
        sweep.main(argv + ["--resume", "--set", "epochs=3", "--set", "resources.cpu=1"])
    assert no_running(uri, "tiny") and runs(uri, "tiny", "sweep")[0].data.tags["error"].endswith("injected failure in Tuner.restore")
    warned = capsys.readouterr().err  # a --set that cannot reach the restored trials is named, not silently dropped
    assert "--set epochs=3 does not change them" in warned and "resources.cpu=1" not in warned.split("does not change")[0]

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", lambda *a, **k: (_ for _ in ()).throw(OSError("injected: disk full")))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").write_text("<html></html>")
    with pytest.raises(OSError, match="disk full"):
        log_analysis_run(uri, "tiny", tmp_path / "report", 0.9)
    (analysis,) = runs(uri, "tiny", "analysis")
    assert analysis.info.status == "FAILED" and no_running(uri, "tiny")


# --- a locked store while trials finish -------------------------------------------------------


def test_a_store_locked_while_trials_finish_still_ends_them_finished(tmp_path, monkeypatch):
    """The driver's MLflow calls fail with SQLite's 'database is locked' for 3 s from the moment the first trial completes."""
    from mlflow.exceptions import MlflowException

    from launch import callbacks

    locked_until, raised = [0.0], []

    def locked(method):
        def call(self, *args, **kwargs):
            if time.time() < locked_until[0]:
                raised.append(method.__name__)
                raise MlflowException("(sqlite3.OperationalError) database is locked")
            return method(self, *args, **kwargs)
        return call

    for name in ("search_runs", "set_terminated", "log_batch", "set_tag"):
        monkeypatch.setattr(mlflow.MlflowClient, name, locked(getattr(mlflow.MlflowClient, name)))
    complete = callbacks.MlflowStatusCallback.on_trial_complete

    def lock_then_complete(self, *args, **kwargs):
        if not locked_until[0]:
            locked_until[0] = time.time() + 3
        return complete(self, *args, **kwargs)

    monkeypatch.setattr(callbacks.MlflowStatusCallback, "on_trial_complete", lock_then_complete)
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 1, "grid": {"seed": [1, 2]}}})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert sweep.main(["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
    assert raised, "the injected lock never hit a driver call"
    trials = runs(uri, "tiny", "trial")
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}


# --- the data, checked once by the driver -----------------------------------------------------


def test_no_network_and_no_data_exits_2_at_once_with_one_message(tmp_path, monkeypatch, capsys):
    from urllib.error import URLError

    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    path = write_experiments(tmp_path / "e.yaml", {"quick": {"data": {"name": "cifar10", "root": str(tmp_path / "data"), "download": True},
                                                            "grid": {"arch": ["plain_cnn", "residual_cnn"], "augment": ["none", "cutout"]}}})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    start = time.perf_counter()
    code = sweep.main(["--config", str(path), "--experiment", "quick", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 30
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "data") in err and "name resolution" in err and "data.name=imagefolder" in err
    assert not (tmp_path / "ray").exists() or not list((tmp_path / "ray").iterdir())  # no trial started
    assert runs(uri, "quick") == []


def test_a_layer_missing_from_some_architecture_is_refused_with_each_ones_layers(finished_sweep, tmp_path, capsys):
    from analysis.__main__ import main as analysis_main

    code = analysis_main(["--experiment", "tiny", "--tracking-uri", finished_sweep["uri"], "--out", str(tmp_path), "--layer", "layer3", "--no-log"])
    err = capsys.readouterr().err
    assert code == 2 and "plain_cnn has no layer 'layer3'; its layers: stem" in err and "residual_cnn has no layer 'layer3'" in err
    assert "--layer resnet18=layer3" in err and "Traceback" not in err
