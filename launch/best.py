"""The best run of an experiment, chosen on validation: rerun it with exactly its config, or register its model.

Selection uses the experiment's own ``metric``/``mode`` (``val/acc``) unless ``--metric`` names another; a
``test/...`` metric works but prints a warning, since choosing on the test set biases its own test numbers.
Runs without test predictions (pruned, killed, failed) are skipped with a one-line note each.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Callable

import tracking
from config.errors import InputError
from config.settings import ExperimentConfig
from config.yaml12 import load_yaml
from launch.data_check import prepare_data
from tracking import EPOCHS_TAG, STOPPED_BY_TAG, metrics


def registry_problems(model: str, alias: str) -> list[str]:
    """What MLflow 3's Model Registry would refuse in ``--register-best NAME --alias ALIAS``, found before anything is
    registered (MLflow checks the alias only after it has created the version, so a bad alias left a version without it)."""
    out = []
    if not model.strip() or "/" in model or ":" in model or model == "." or model.startswith(".."):  # MLflow: no path-like name
        out.append(f"--register-best {model!r}: a registered model name must be non-empty, without '/' or ':', and not a relative path (.. or .)")
    if not re.fullmatch(r"[\w\-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        out.append(f"--alias {alias!r}: an alias is 1-255 letters, digits, '_' or '-', and neither 'latest' nor a version (v1)")
    return out


def best_run(uri: str, name: str, metric: str, mode: str):
    """The finished trial run of experiment ``name`` with the best ``metric`` (a pandas row; an epoch metric taken at the
    tested epoch), among runs with test predictions; every run skipped for lacking them (pruned, killed, failed) gets a
    one-line note."""
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(uri)
    runs = tracking.retry(lambda: mlflow.search_runs(experiment_names=[name], filter_string=f"tags.`{tracking.KIND_TAG}` = 'trial'"))
    column, tested = f"metrics.{metric}", f"metrics.{metrics.TEST_ACC}"
    if not runs.empty:
        usable = (runs.status == "FINISHED") & (runs[tested].notna() if tested in runs else False)
        for _, run in runs[~usable].iterrows():
            stopped = run.get(f"tags.{STOPPED_BY_TAG}")
            why = f", stopped by {stopped} at epoch {run.get(f'tags.{EPOCHS_TAG}')}" if isinstance(stopped, str) and stopped else ""
            print(f"note: skipping {run['tags.mlflow.runName']} ({run.status}{why}): no test predictions")
        runs = runs[usable]
    if runs.empty or column not in runs or runs[column].isna().all():
        raise InputError(f"experiment {name!r} has no finished run with metric {metric!r} at {uri}; run the sweep first")
    runs = runs[runs[column].notna()].copy()
    if metric in metrics.EPOCH_METRICS:  # early stopping tested an earlier epoch than its last: rank on that epoch's value
        client = mlflow.MlflowClient(uri)
        for i, run in runs[runs.get(f"metrics.{metrics.TEST_EPOCH}", np.nan) < runs.get(f"metrics.{metrics.EPOCH}", np.nan)].iterrows():
            history = tracking.retry(lambda: client.get_metric_history(run.run_id, metric))
            runs.loc[i, column] = metrics.at_epoch([(m.step, m.value) for m in history], run[f"metrics.{metrics.TEST_EPOCH}"], run[column])
    return runs.sort_values(column, ascending=mode == "min", kind="stable").iloc[0]


def selection(cfg: ExperimentConfig, metric: str | None) -> tuple[str, str]:
    """(metric, mode) that picks the best run: the experiment's own unless ``--metric`` names another; warns on test-set selection."""
    metric = metric or cfg.metric
    if metric.startswith("test/"):
        print(f"warning: selecting the best run by {metric} is selection on the test set: its test metrics are then optimistically "
              f"biased and no longer an unbiased estimate; select by {cfg.metric} (the default) for a claim about unseen data", file=sys.stderr)
    return metric, cfg.mode if metric == cfg.metric else ("min" if "loss" in metric or "errors" in metric else "max")


def register_best(name: str, cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    """Register the best run's logged model, tagged with the run, the metric and the sweep it came from."""
    import mlflow

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    metric, mode = selection(cfg, args.metric)
    best = best_run(uri, name, metric, mode)
    mlflow.set_tracking_uri(uri)
    value = float(best[f"metrics.{metric}"])
    tags = {"run_id": best.run_id, "selected_by": metric, "selection_mode": mode, "metric": metric, "metric_value": repr(value),
            "test_set_selection": str(metric.startswith("test/")).lower(), "experiment": name,
            "sweep_id": best.get(f"tags.{tracking.SWEEP_TAG}"), "run_name": best["tags.mlflow.runName"]}
    client = mlflow.MlflowClient(uri)
    outputs = client.get_run(best.run_id).outputs
    logged = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    if not logged and not client.list_artifacts(best.run_id, "model"):
        raise InputError(f"the best run {best.run_id} ({best['tags.mlflow.runName']}) logged no model (its trials ran with log_model: false); "
                         "sweep with log_model: true (the default) to register its best model")
    # The run's MLflow 3 logged model (the version then links to it); runs logged before it had only a model/ artifact folder.
    version = tracking.retry(lambda: mlflow.register_model(f"models:/{logged[-1]}" if logged else f"runs:/{best.run_id}/model",
                                                           args.register_best, tags=tags))
    description = f"{best['tags.mlflow.runName']} from sweep {tags['sweep_id']}, selected by {metric} = {value:.4f}"
    tracking.retry(lambda: client.update_model_version(args.register_best, version.version, description=description))
    tracking.retry(lambda: client.set_registered_model_alias(args.register_best, args.alias, version.version))
    print(f"registered {args.register_best} version {version.version} as @{args.alias}: run {best.run_id} ({best['tags.mlflow.runName']}), "
          f"selected by {metric} = {value:.4f}; load it without unpickling anything (it is an exported program):\n"
          f"  MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false python -c \"import mlflow.pytorch; "
          f"model = mlflow.pytorch.load_model('models:/{args.register_best}@{args.alias}')\"")
    return 0


def rerun_best(name: str, cfg: ExperimentConfig, args: argparse.Namespace, launch: Callable[..., int]) -> int:
    """Rerun the best trial with exactly its logged config (``launch``: sweep.py's) as a new run tagged ``rerun_of``; print both."""
    import mlflow

    from config.schema import build
    from config.settings import TrialConfig

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    metric, mode = selection(cfg, args.metric)
    best = best_run(uri, name, metric, mode)
    path = tracking.retry(lambda: mlflow.artifacts.download_artifacts(run_id=best.run_id, artifact_path=metrics.CONFIG_FILE, tracking_uri=uri))
    problems: list = []
    trial = build(TrialConfig, load_yaml(Path(path).read_text()), "", problems)
    if problems:
        raise InputError(f"the logged config of run {best.run_id} no longer validates: {problems}")
    rerun = dataclasses.replace(cfg, **{f.name: getattr(trial, f.name) for f in dataclasses.fields(TrialConfig)}, grid={}, num_samples=1)
    prepare_data(rerun)  # the data the best run was trained on, not the YAML's current data settings
    for problem in (precision_mismatch(best.get("tags.precision"), trial.amp, rerun.resources.gpu), cpu_mismatch(best.get("tags.cpu"), rerun.resources.gpu)):
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
    print(f"rerunning {best['tags.mlflow.runName']} ({best.run_id}), selected by {metric} = {best[f'metrics.{metric}']:.4f}")
    code = launch(name, rerun, args, kind="rerun", extra_tags={"rerun_of": best.run_id})
    rerun_filter = f"tags.rerun_of = '{best.run_id}' and tags.`{tracking.KIND_TAG}` = 'rerun'"
    new = tracking.retry(lambda: mlflow.search_runs(experiment_names=[name], filter_string=rerun_filter, order_by=["attributes.start_time DESC"])).iloc[0]
    print(f"\n{'metric':<26}{'original':>12}{'rerun':>12}")
    for key in dict.fromkeys((metric, *metrics.FINAL_METRICS)):
        a, b = best.get(f"metrics.{key}"), new.get(f"metrics.{key}")
        print(f"{key:<26}{a:>12.4f}{b:>12.4f}" if a == a and b == b and a is not None and b is not None else f"{key:<26}{a!s:>12}{b!s:>12}")
    print(f"original run {best.run_id}, rerun {new.run_id}")
    original_cpu, rerun_cpu = best.get("tags.cpu"), new.get("tags.cpu")
    if original_cpu and rerun_cpu and best.get("tags.device") == new.get("tags.device") == "cpu":  # (runs logged before the tag have none)
        print(f"both on the CPU {original_cpu}" if original_cpu == rerun_cpu else f"original on the CPU {original_cpu}\nrerun on the CPU    {rerun_cpu}")
    return code


def precision_mismatch(logged: str | None, amp: bool, gpus: float) -> str | None:
    """Why a rerun here cannot repeat a run exactly that trained in ``logged`` precision (its tag), or None: a CPU rerun
    picks its precision from this machine's CPU, as the trial did from its own."""
    import torch

    from training.engine import pick_precision

    if not logged or gpus > 0:  # (runs logged before the tag; a GPU rerun's precision depends on the GPU it lands on)
        return None
    here = pick_precision(torch.device("cpu"), amp).name
    if here == logged:
        return None
    return (f"the best run trained in {logged}; this machine's CPU trains the rerun in {here} "
            f"({'it has no native bf16' if here == 'fp32' else 'it has native bf16'}), so the rerun cannot repeat the run exactly")


def cpu_mismatch(logged: str | None, gpus: float) -> str | None:
    """Why a CPU rerun here may not repeat a run's digits, or None: the run trained on another CPU (its ``cpu`` tag), where
    torch and oneDNN may pick other kernels and round differently, even in fp32."""
    from training.engine import cpu_identity

    here = cpu_identity()
    if not logged or gpus > 0 or logged == here:  # (runs logged before the tag; a GPU rerun computes on its GPU)
        return None
    return (f"the best run trained on the CPU {logged!r}, this machine's is {here!r}: their kernels may round differently, "
            f"so the rerun may not repeat the run exactly (a rerun on the same CPU does)")
