"""A real sweep on local Ray with synthetic data: MLflow runs, metric names, rerun of the best."""
import io
import os
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from ray.tune.result import AUTO_RESULT_KEYS

from tracking import metrics
import sweep
import tracking
from tests.conftest import write_experiments

RAY_BOOKKEEPING = set(AUTO_RESULT_KEYS) | {"trial_id", "done", "experiment_tag", "should_checkpoint", "time_this_iter_s"}


def trial_runs(runs):
    return runs[runs[f"tags.{tracking.KIND_TAG}"] == "trial"]


def test_every_trial_is_a_finished_child_run_with_a_readable_name(finished_sweep):
    runs = finished_sweep["runs"]
    trials, parents = trial_runs(runs), runs[runs[f"tags.{tracking.KIND_TAG}"] == "sweep"]
    assert len(trials) == 4 and len(parents) == 1
    assert set(trials.status) == {"FINISHED"} and parents.status.iloc[0] == "FINISHED"
    assert set(trials[f"tags.{tracking.PARENT_TAG}"]) == {parents.run_id.iloc[0]}
    assert set(trials["tags.mlflow.runName"]) == {"plain_cnn-none-s1", "plain_cnn-none-s2", "residual_cnn-none-s1", "residual_cnn-none-s2"}
    assert trials["tags.git.commit"].str.len().min() >= 7 and set(trials["tags.version.torch"]) == {torch.__version__.split("+")[0]}


def test_mlflow_metric_names_equal_the_tune_results(finished_sweep):
    from ray import tune

    results = tune.ExperimentAnalysis(str(next((finished_sweep["tmp"] / "ray").iterdir())))
    client = mlflow.MlflowClient(finished_sweep["uri"])
    for trial in results.trials:
        columns = results.trial_dataframes[trial.trial_id].columns  # every epoch's report (and Ray's flattened config)
        reported = {c for c in columns if not c.startswith("config/")} - RAY_BOOKKEEPING
        run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], f"tags.`{tracking.TRIAL_TAG}` = '{trial.trial_id}'")[0]
        logged = {k for k in run.data.metrics if not k.startswith("system/")}  # MLflow's own system metrics are extra
        assert logged == reported
        assert run.data.metrics[metrics.TEST_ACC] == pytest.approx(trial.last_result[metrics.TEST_ACC])
        assert [m.step for m in client.get_metric_history(run.info.run_id, metrics.VAL_ACC)] == [1, 2]


def test_runs_log_params_and_the_artifacts_analysis_needs(finished_sweep):
    client = mlflow.MlflowClient(finished_sweep["uri"])
    run_id = trial_runs(finished_sweep["runs"]).run_id.iloc[0]
    run = client.get_run(run_id)
    assert run.data.params["optimizer.lr"] == "0.05" and run.data.params["data.name"] == "synthetic"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {metrics.PREDICTIONS_FILE, metrics.CONFIG_FILE, "training_curves.png", "confusion_matrix.png"} <= names
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=finished_sweep["uri"])
    # The weights are stored once: the logged model's exported program (log_model: true), no weights.pt beside it.
    (output,) = run.outputs.model_outputs
    model = Path(client.get_logged_model(output.model_id).artifact_location.removeprefix("file://"))
    state = torch.export.load(model / metrics.MODEL_PT2).state_dict
    assert "head.weight" in state and metrics.WEIGHTS_FILE not in names
    files = [p for where in (Path(folder), model) for p in where.rglob("*") if p.suffix in (".pt", ".pt2", ".pth", ".bin", ".safetensors")]
    assert [p.name for p in files] == ["model.pt2"]
    with zipfile.ZipFile(files[0]) as archive:  # the program's tensors; beside them the graph (~150 KB, whatever the model's size)
        stored = sum(i.file_size for i in archive.infolist() if "/data/weights/" in i.filename or "/data/constants/" in i.filename)
    saved = io.BytesIO()
    torch.save(dict(state), saved)  # what weights.pt held: the state dict, saved
    assert stored <= 1.2 * len(saved.getvalue()), (stored, len(saved.getvalue()))
    preds = np.load(f"{folder}/{metrics.PREDICTIONS_FILE}")
    assert preds["probs"].shape == (120, 10) and np.allclose(preds["probs"].sum(1), 1, atol=1e-4)
    assert (preds["probs"].argmax(1) == preds["labels"]).mean() == pytest.approx(run.data.metrics[metrics.TEST_ACC])
    assert preds["index"].tolist() == list(range(120))
    config = yaml.safe_load(open(f"{folder}/{metrics.CONFIG_FILE}"))
    assert config["arch"] in ("plain_cnn", "residual_cnn") and config["data"]["name"] == "synthetic"


def test_rerun_best_reproduces_the_best_validation_run_exactly(finished_sweep, capsys):
    assert sweep.main(finished_sweep["argv"] + ["--rerun-best"]) == 0
    runs = mlflow.search_runs(experiment_names=["tiny"])
    trials = trial_runs(runs)
    rerun = runs[runs[f"tags.{tracking.KIND_TAG}"] == "rerun"]
    assert len(rerun) == 1 and rerun.status.iloc[0] == "FINISHED"
    best = trials[trials.run_id == rerun["tags.rerun_of"].iloc[0]].iloc[0]
    assert best[f"metrics.{metrics.VAL_ACC}"] == trials[f"metrics.{metrics.VAL_ACC}"].max()  # chosen on validation, not test
    for key in (metrics.TEST_ACC, metrics.TEST_LOSS, metrics.TRAIN_LOSS):
        assert rerun[f"metrics.{key}"].iloc[0] == best[f"metrics.{key}"], key
    captured = capsys.readouterr()
    assert "original" in captured.out and "selected by val/acc" in captured.out and best.run_id in captured.out
    assert "test set" not in captured.err and "CPU" not in captured.err  # the same CPU: no warning that the digits may differ
    assert rerun["tags.cpu"].iloc[0] == best["tags.cpu"] and "torch " in best["tags.cpu"] and "bf16 " in best["tags.cpu"]
    assert f"both on the CPU {best['tags.cpu']}" in captured.out


def test_git_commit_tag_is_the_checkout_head(finished_sweep):
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tracking.PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
    assert len(head) == 40 and set(trial_runs(finished_sweep["runs"])["tags.git.commit"]) == {head}


def test_dry_run_prints_exactly_the_seeded_points_ray_runs(tmp_path, capsys):
    from ray import tune

    from config.grid import expand_grid

    from config.schema import resolve
    from launch.tuner import build_tuner

    path = write_experiments(tmp_path / "e.yaml", {"search": {"num_samples": 3, "grid": {"arch": ["plain_cnn", "se_cnn"], "optimizer.lr": {"loguniform": [0.001, 0.1]}}}})
    name, cfg = resolve(path, "search")
    points = expand_grid(cfg.grid, cfg.num_samples, cfg.search_seed)
    assert points == expand_grid(cfg.grid, cfg.num_samples, cfg.search_seed) != expand_grid(cfg.grid, cfg.num_samples, 1)
    tuner = build_tuner(cfg, {"sweep_id": "x", "tracking_uri": "sqlite:///unused"}, str(tmp_path / "ray"))
    assert tuner._local_tuner.param_space["overrides"] == tune.grid_search(points)
    assert sweep.main(["--config", str(path), "--experiment", "search", "--dry-run"]) == 0
    table = capsys.readouterr().out
    for point in points:
        assert f"{point['optimizer.lr']:>9.4g}" in table


def test_worker_output_arriving_after_the_sweep_goes_to_its_log_not_the_terminal(finished_sweep, tmp_path, capfd):
    """Ray forwards trial output (and its "[repeated Nx]" batches) seconds after tune.fit returns: such a line, once the
    sweep's redirect has ended, lands in the launch log like the rest of Ray's output."""
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    from launch.console import ray_output_to

    assert ray.is_initialized()  # the in-process sweep's Ray, with log_to_driver on
    log = tmp_path / "launch.log"
    with ray_output_to(log):
        os.write(1, b"during the sweep\n")  # (at the file-descriptor level, as Ray's own output)
    late = {"pid": 4242, "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": False, "job": "", "task_name": "train",
            "actor_name": "", "lines": ["a line after the sweep (checkpoint_000007)"]}
    global_worker_stdstream_dispatcher.emit(late)
    global_worker_stdstream_dispatcher.emit({**late, "is_err": True, "lines": ["an error line after the sweep"]})
    shown = capfd.readouterr()
    assert "after the sweep" not in shown.out + shown.err
    text = log.read_text()
    assert "during the sweep" in text and "(train pid=4242" in text
    assert "checkpoint_000007" in text and "an error line after the sweep" in text


def test_importing_the_cli_does_not_import_ray():
    """sweep.main sets Ray's environment (a local Ray on loopback) before Ray is imported: the CLI module must not."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", "import sys, sweep; print('ray' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
