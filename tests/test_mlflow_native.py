"""MLflow-native artifacts: the logged PyTorch model, the registry, dataset inputs, system metrics, the UI."""
import getpass
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
import json

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch

from launch import best
from tracking import metrics
import sweep
import tracking
from data_zoo import load_bundle
from tests.conftest import mlflow_service


def best_trial(finished_sweep):
    runs = finished_sweep["runs"]
    trials = runs[runs[f"tags.{tracking.KIND_TAG}"] == "trial"]
    return trials.sort_values(f"metrics.{metrics.TEST_ACC}", ascending=False).iloc[0]


def test_logged_model_loads_without_pickle_and_reproduces_the_logged_predictions(finished_sweep, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # as the README loads models from a shared store
    run = best_trial(finished_sweep)
    mlflow.set_tracking_uri(finished_sweep["uri"])
    model = mlflow.pytorch.load_model(f"runs:/{run.run_id}/model")
    folder = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path=metrics.PREDICTIONS_FILE)
    logged = np.load(folder)
    bundle = load_bundle({"name": "synthetic", "n_train": 400, "n_test": 120, "val_fraction": 0.2})
    with torch.no_grad():
        probs = torch.softmax(model(bundle.normalise(bundle.test.x)), 1).numpy()
    assert probs.shape == logged["probs"].shape
    assert (probs.argmax(1) == logged["preds"]).all()
    np.testing.assert_allclose(probs, logged["probs"], atol=1e-4)


def test_every_trial_logs_one_mlflow_3_logged_model(finished_sweep):
    client = mlflow.MlflowClient(finished_sweep["uri"])
    experiment = client.get_experiment_by_name("tiny")
    trials = finished_sweep["runs"][finished_sweep["runs"][f"tags.{tracking.KIND_TAG}"] == "trial"]
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(trials.run_id)  # one per trial run
    assert all(m.name == "model" and str(m.status) == "READY" for m in models), [(m.name, m.status) for m in models]
    run = client.get_run(trials.run_id.iloc[0])
    assert [o.model_id for o in run.outputs.model_outputs] == [m.model_id for m in models if m.source_run_id == run.info.run_id]


BAD_NAMES = ["", " ", "team/model", "models:best", ".", "..x"]
BAD_ALIASES = ["", "best model", "latest", "LATEST", "v3", "champion!", "a" * 256]


def test_names_and_aliases_the_registry_refuses_are_refused_before_anything_is_registered(finished_sweep, tmp_path, capsys):
    client = mlflow.MlflowClient(finished_sweep["uri"])
    before = [m.name for m in client.search_registered_models()]
    for name, alias in [(n, "champion") for n in BAD_NAMES] + [("tiny-ok", a) for a in BAD_ALIASES]:
        with pytest.raises(SystemExit) as exit_:
            sweep.main(finished_sweep["argv"] + ["--register-best", name, "--alias", alias])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and (f"--register-best {name!r}" in err if alias == "champion" else f"--alias {alias!r}" in err), err
    assert [m.name for m in client.search_registered_models()] == before  # not even a version without its alias
    reference = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # MLflow's own registry refuses every one of them
    for name in BAD_NAMES:
        with pytest.raises(mlflow.exceptions.MlflowException):
            reference.create_registered_model(name)
    reference.create_registered_model("tiny-ok")
    version = reference.create_model_version("tiny-ok", source=str(tmp_path))
    for alias in BAD_ALIASES:
        with pytest.raises(mlflow.exceptions.MlflowException):
            reference.set_registered_model_alias("tiny-ok", alias, version.version)
    reference.set_registered_model_alias("tiny-ok", "champion-2_b", version.version)  # and takes what stresslab lets through
    assert best.registry_problems("tiny-ok", "champion-2_b") == []
    with pytest.raises(SystemExit):
        sweep.main(finished_sweep["argv"] + ["--rerun-best", "--register-best", "tiny-ok"])
    assert "not allowed with argument --rerun-best" in capsys.readouterr().err


def test_an_early_stopped_run_is_ranked_by_the_epoch_it_was_tested_with(tmp_path):
    """Run "stopped" peaked at 0.90 in epoch 2, was tested with those weights (test/epoch 2) and stopped at epoch 4 with
    0.55; run "steady" reached 0.70 at its last epoch. By the tested weights "stopped" is the better one: --rerun-best's
    and --register-best's choice, the sweep's closing table and the report's ranking, its val acc column and its conclusion
    say so (ranked by the latest val/acc, "steady" had won)."""
    from types import SimpleNamespace

    from analysis import report
    from analysis.runs import RunRecord

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, "stopping", "", uri)
    histories = {"stopped": ([0.50, 0.90, 0.60, 0.55], 2), "steady": ([0.60, 0.70], 2)}
    records = []
    for name, (values, tested) in histories.items():
        run = client.create_run(experiment, run_name=name, tags={tracking.KIND_TAG: "trial"})
        for step, value in enumerate(values, 1):
            client.log_metric(run.info.run_id, metrics.VAL_ACC, value, step=step)
            client.log_metric(run.info.run_id, metrics.EPOCH, step, step=step)
        client.log_metric(run.info.run_id, metrics.TEST_EPOCH, tested, step=len(values))
        client.log_metric(run.info.run_id, metrics.TEST_ACC, 0.5, step=len(values))
        client.set_terminated(run.info.run_id)
        latest = client.get_run(run.info.run_id).data.metrics
        history = {metrics.VAL_ACC: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metrics.VAL_ACC)]}
        records.append(SimpleNamespace(run=RunRecord(run.info.run_id, name, {}, latest, None, None, history)))
    assert client.get_run(records[0].run.run_id).data.metrics[metrics.VAL_ACC] == 0.55  # what MLflow and Tune call its val/acc
    chosen = best.best_run(uri, "stopping", metrics.VAL_ACC, "max")
    assert chosen["tags.mlflow.runName"] == "stopped" and chosen[f"metrics.{metrics.VAL_ACC}"] == 0.90
    assert [a.run.name for a in sorted(records, key=report.selection_key, reverse=True)] == ["stopped", "steady"]
    assert [a.run.tested(metrics.VAL_ACC) for a in records] == [0.90, 0.70]
    import pandas as pd

    from launch.tuner import tested_value

    reported = pd.DataFrame({metrics.EPOCH: [1, 2, 3, 4], metrics.VAL_ACC: [0.50, 0.90, 0.60, 0.55]})  # Tune's results of "stopped"
    result = SimpleNamespace(metrics={metrics.EPOCH: 4, metrics.VAL_ACC: 0.55, metrics.TEST_EPOCH: 2, metrics.TEST_ACC: 0.5}, metrics_dataframe=reported)
    assert tested_value(result, metrics.VAL_ACC) == 0.90 and tested_value(result, metrics.TEST_ACC) == 0.5  # the sweep's own table


def test_register_best_selects_on_validation_and_says_so(finished_sweep, capsys, monkeypatch):
    assert sweep.main(finished_sweep["argv"] + ["--register-best", "tiny-best"]) == 0
    trials = finished_sweep["runs"][finished_sweep["runs"][f"tags.{tracking.KIND_TAG}"] == "trial"]
    best_val = trials[f"metrics.{metrics.VAL_ACC}"].max()
    client = mlflow.MlflowClient(finished_sweep["uri"])
    (version,) = client.search_model_versions("name = 'tiny-best'")
    assert version.tags["run_id"] == version.run_id
    assert client.get_run(version.run_id).data.metrics[metrics.VAL_ACC] == best_val  # a best run (ties broken by MLflow's order)
    assert version.tags["selected_by"] == metrics.VAL_ACC and float(version.tags["metric_value"]) == best_val
    assert version.tags["test_set_selection"] == "false" and version.tags["sweep_id"].startswith("tiny-")
    captured = capsys.readouterr()
    assert "registered tiny-best version 1 as @champion" in captured.out and "selected by val/acc" in captured.out and "warning" not in captured.err
    assert client.get_model_version_by_alias("tiny-best", "champion").version == version.version
    (logged,) = client.get_run(version.run_id).outputs.model_outputs
    assert version.source == f"models:/{logged.model_id}"  # the version is the run's MLflow 3 logged model
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in captured.out  # the hint loads without pickle
    mlflow.set_tracking_uri(finished_sweep["uri"])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    assert isinstance(mlflow.pytorch.load_model("models:/tiny-best@champion"), torch.nn.Module)
    assert sweep.main(finished_sweep["argv"] + ["--register-best", "tiny-best-test", "--metric", metrics.TEST_ACC]) == 0
    assert "warning: selecting the best run by test/acc is selection on the test set" in capsys.readouterr().err
    (version,) = client.search_model_versions("name = 'tiny-best-test'")
    assert version.tags["selected_by"] == metrics.TEST_ACC and version.tags["test_set_selection"] == "true"
    assert client.get_run(version.run_id).data.metrics[metrics.TEST_ACC] == trials[f"metrics.{metrics.TEST_ACC}"].max()


def test_dataset_input_and_system_metrics_are_logged(finished_sweep):
    client = mlflow.MlflowClient(finished_sweep["uri"])
    run = client.get_run(best_trial(finished_sweep).run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    profile = json.loads(dataset_input.dataset.profile)
    assert dataset_input.dataset.name == "synthetic" and profile["train"] + profile["val"] == 400
    assert abs(profile["val"] - 80) <= 2 and profile["test"] == 120  # 20% stratified per class
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium package is not installed (apt-get install chromium)")
def test_mlflow_ui_lists_every_trial_with_its_test_accuracy(finished_sweep, tmp_path):
    with mlflow_service("ui", finished_sweep["uri"]) as base:
        client = mlflow.MlflowClient(finished_sweep["uri"])
        exp_id = client.get_experiment_by_name("tiny").experiment_id
        trial_ids = [r.info.run_id for r in client.search_runs([exp_id], f"tags.`{tracking.KIND_TAG}` = 'trial'")]
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=15000"]
        experiment_dom = subprocess.run(["chromium", *flags, "--window-size=2600,1000", "--dump-dom", f"{base}/#/experiments/{exp_id}/runs"],
                                        capture_output=True, text=True, timeout=120).stdout
        trial_dom = subprocess.run(["chromium", *flags, "--dump-dom", f"{base}/#/experiments/{exp_id}/runs/{trial_ids[0]}"],
                                   capture_output=True, text=True, timeout=120).stdout
        compare = f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(trial_ids))}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
        dom = subprocess.run(["chromium", *flags, "--dump-dom", compare], capture_output=True, text=True, timeout=120).stdout
        shot = Path(os.environ.get("STRESSLAB_SCREENSHOT_DIR", tmp_path)) / "runs_table.png"
        if os.environ.get("STRESSLAB_SCREENSHOT_DIR"):  # the README's picture, refreshed on request (the DOM above is what is checked)
            subprocess.run(["chromium", *flags, "--window-size=1400,1000", f"--screenshot={shot}", compare], capture_output=True, timeout=120)
            assert shot.stat().st_size > 10_000
        body = json.dumps({"experiment_ids": [exp_id], "filter": f"tags.`{tracking.KIND_TAG}` = 'trial'"}).encode()
        request = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"})
        api_runs = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
    names = {"plain_cnn-none-s1", "plain_cnn-none-s2", "residual_cnn-none-s1", "residual_cnn-none-s2"}
    assert "Training runs" in experiment_dom and "tiny-20" in experiment_dom  # the sweep's parent run heads the runs table
    assert "sweep.py" in experiment_dom  # the runs table's Source column (the table renders only columns in view: a wide window)
    commit = tracking.git_state()["git.commit"]
    for shown in ("sweep.py", commit[:7], getpass.getuser(), "Logged models"):  # a trial's page: Source, its git commit, Created by
        assert shown in trial_dom, shown
    for name in names:
        assert name in dom, f"{name} not rendered"
    assert metrics.TEST_ACC in dom  # the rendered metrics table has a test/acc row for the runs
    accuracy = {r["info"]["run_name"]: {m["key"]: m["value"] for m in r["data"]["metrics"]}.get(metrics.TEST_ACC) for r in api_runs}
    assert set(accuracy) == names and all(isinstance(v, float) for v in accuracy.values())


RACE_DATA = {"name": "synthetic", "root": "data", "subset": None, "split_seed": 0, "val_fraction": 0.2}


def race_bundle():
    return load_bundle({"name": "synthetic", "n_train": 40, "n_test": 20, "val_fraction": 0.2})


def open_trial_runs(tmp_path, count: int) -> list[tracking.TrialRun]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client(uri)
    sweep_info = {"tracking_uri": uri, "experiment_id": tracking.ensure_experiment(client, "race", "", uri), "sweep_id": "race-1"}
    return [tracking.TrialRun.open(sweep_info, {"seed": i}, f"t{i}", f"trial_{i}", None) for i in range(count)]


def test_dataset_insert_lost_to_a_concurrent_trial_is_retried_and_linked(tmp_path, monkeypatch):
    """Two trials on the same data race to insert one dataset row; the loser gets SQLite's UNIQUE error."""
    winner, loser = open_trial_runs(tmp_path, 2)
    data, bundle = RACE_DATA, race_bundle()
    real = loser.client.log_inputs
    calls = []

    def race(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:  # the other trial inserts the row between our lookup and our insert
            winner.log_dataset(data, bundle)
            raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest")
        return real(run_id, datasets)

    monkeypatch.setattr(loser.client, "log_inputs", race)
    loser.log_dataset(data, bundle)
    assert len(calls) == 2
    digests = [loser.client.get_run(r.run_id).inputs.dataset_inputs[0].dataset.digest for r in (winner, loser)]
    assert digests[0] == digests[1] == f"{bundle.digest}-0-None"


def test_store_errors_that_are_not_transient_are_not_retried():
    calls = []

    def fail():
        calls.append(1)
        raise mlflow.exceptions.MlflowException("UNIQUE constraint failed: runs.run_uuid")

    with pytest.raises(mlflow.exceptions.MlflowException, match="runs.run_uuid"):
        tracking.retry(fail, transient=(*tracking.TRANSIENT, "unique constraint failed: datasets"))
    assert calls == [1]

    def locked_once():
        calls.append(2)
        if calls.count(2) == 1:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry(locked_once, delay=0.01) == "ok" and calls == [1, 2, 2]


def test_concurrent_trials_on_the_same_data_all_log_it(tmp_path):
    import threading

    runs = open_trial_runs(tmp_path, 6)
    data, bundle = RACE_DATA, race_bundle()
    start, errors = threading.Barrier(len(runs)), []

    def log(run):
        start.wait()
        try:
            run.log_dataset(data, bundle)
        except Exception as err:  # collected: an exception in a thread would not fail the test
            errors.append(err)

    threads = [threading.Thread(target=log, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(run.client.get_run(run.run_id).inputs.dataset_inputs) == 1 for run in runs)


def test_a_dirty_checkout_is_logged_as_its_diff_and_runs_carry_mlflow_source_tags(tmp_path):
    import subprocess as sp

    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: sp.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo, check=True, capture_output=True)
    git("init", "-q")
    (repo / "train.py").write_text("lr = 0.1\n")
    git("add", "train.py")
    git("commit", "-qm", "first")
    assert tracking.git_diff(repo) == "" and tracking.git_state(repo)["git.dirty"] == "false"
    (repo / "train.py").write_text("lr = 0.05\n")
    diff = tracking.git_diff(repo)
    assert tracking.git_state(repo)["git.dirty"] == "true" and "-lr = 0.1" in diff and "+lr = 0.05" in diff
    tags = tracking.environment_tags()
    assert tags["mlflow.source.name"] == "sweep.py" and tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.git.commit"] == tags["git.commit"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client(uri)
    sweep_info = {"tracking_uri": uri, "experiment_id": tracking.ensure_experiment(client, "dirty", "", uri), "sweep_id": "dirty-1", "git_diff": diff}
    run = tracking.TrialRun.open(sweep_info, {"seed": 1}, "t1", "trial_1", None)
    assert client.download_artifacts(run.run_id, tracking.GIT_DIFF_FILE, str(tmp_path)) and (tmp_path / tracking.GIT_DIFF_FILE).read_text() == diff
