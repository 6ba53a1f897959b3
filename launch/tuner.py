"""One launch of a sweep through Ray Tune: the parent run and the trials' context, the Tuner over the grid, its fit
(or restore), the results table, and the runs closed on every exit path."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tracking
from config.errors import InputError
from config.grid import expand_grid
from config.settings import ExperimentConfig
from launch import records
from launch.checks import check_gpus, shared_storage_warnings
from launch.ray_cluster import init_ray
from tracking import EPOCHS_TAG, STOPPED_BY_TAG, metrics


def sweep_context(name: str, cfg: ExperimentConfig, args: argparse.Namespace, kind: str, extra_tags: dict | None = None) -> dict:
    """Create store, experiment and parent run (driver side, before any trial) and describe them for the trials."""
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    mlflow_client = tracking.client(uri)
    exp_id = tracking.ensure_experiment(mlflow_client, name, cfg.description, uri)
    reaped = tracking.reap_orphans(mlflow_client, exp_id)
    if reaped:
        print(f"note: {reaped} run(s) of {name!r} were left RUNNING by a driver that is gone; marked KILLED (tag killed_because)")
    sweep_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {**tracking.environment_tags(), tracking.DRIVER_TAG: tracking.driver_id(), **(extra_tags or {})}
    parent = tracking.retry(lambda: mlflow_client.create_run(exp_id, run_name=sweep_id, tags={
        **tags, tracking.SWEEP_TAG: sweep_id, tracking.KIND_TAG: "sweep" if kind == "trial" else kind + "-launch", tracking.NOTE_TAG: cfg.description}))
    tracking.log_params(mlflow_client, parent.info.run_id, {"grid": str(cfg.grid), "num_samples": cfg.num_samples, "config": args.config,
                                                            "search_seed": cfg.search_seed})
    diff = tracking.git_diff() if tags["git.dirty"] == "true" else ""
    if diff:  # the uncommitted changes the runs were made with, beside the commit (the trials log it too)
        tracking.retry(lambda: mlflow_client.log_text(parent.info.run_id, diff, tracking.GIT_DIFF_FILE))
    return {"tracking_uri": uri, "experiment_id": exp_id, "experiment": name, "sweep_id": sweep_id, "parent_run_id": parent.info.run_id,
            "tags": tags, "kind": kind, "threads": max(1, int(cfg.resources.cpu)), "scheduler": cfg.scheduler.name, "git_diff": diff}


def build_tuner(cfg: ExperimentConfig, sweep: dict, storage: str, verbose: bool = False):
    """A Tuner over the grid with ``trainable.train`` and the experiment's resources and scheduler."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    import trainable
    from launch.callbacks import MlflowStatusCallback
    from launch.console import SweepView

    scheduler = None
    if cfg.scheduler.name == "asha":
        scheduler = ASHAScheduler(metric=cfg.metric, mode=cfg.mode, max_t=cfg.epochs, grace_period=cfg.scheduler.grace_period,
                                  reduction_factor=cfg.scheduler.reduction_factor)
    resources = {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}
    # The grid is expanded here, random draws seeded by search_seed, so every launch (and --dry-run) has exactly these points.
    points = expand_grid(cfg.grid, cfg.num_samples, cfg.search_seed)
    param_space = {"trial": cfg.trial_dict(), "overrides": tune.grid_search(points), "sweep": sweep}
    return tune.Tuner(
        tune.with_resources(trainable.train, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=1, scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=sweep["sweep_id"], storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[MlflowStatusCallback(sweep["tracking_uri"], cfg.scheduler.name), SweepView(len(points), cfg.epochs, cfg.metric, cfg.mode)],
            verbose=1 if verbose else 0,
        ),
    )


def trial_name(trial) -> str:
    """Ray trial (and folder) name: the MLflow run name plus Ray's short id."""
    return f"{tracking.run_name(trial.config['trial'] | _point(trial.config), trial.config.get('overrides', {}))}_{trial.trial_id.split('_')[-1]}"


def _point(config: dict) -> dict:
    overrides = config.get("overrides", {})
    return {k: overrides[k] for k in ("arch", "augment", "seed") if k in overrides}


def launch(name: str, cfg: ExperimentConfig, args: argparse.Namespace, kind: str = "trial", extra_tags: dict | None = None):
    """Run (or resume) the sweep; print the results table; return the exit code. No run is left RUNNING on any exit path."""
    from mlflow.exceptions import MlflowException

    record = records.resume_target(args.storage, name) if args.resume else None
    if record and args.tracking_uri:  # a resume logs to the store given now (the same store at a new address), else the recorded one
        record = record | {"tracking_uri": tracking.resolve_tracking_uri(args.tracking_uri)}
    # The MLflow store (a fresh SQLite one migrates its schema: seconds of CPU) is set up while Ray starts.
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-setup") as setup:
        context = None if record else setup.submit(sweep_context, name, cfg, args, kind, extra_tags)
        try:
            init_ray(args.address, record)
        except BaseException:  # no Ray: the parent run just created must not stay RUNNING
            if context and context.exception() is None:
                close_runs(context.result()["tracking_uri"], context.result(), "FAILED")
            raise
        try:
            sweep = context.result() if context else record  # on a resume the record names the sweep and its parent run
        except MlflowException as err:  # e.g. a tracking server that refuses this host, or a store of a newer MLflow
            raise InputError(f"the MLflow tracking store {tracking.resolve_tracking_uri(args.tracking_uri)} refused to set up the sweep: "
                             f"{err.message}") from None
    records.write_record(args.storage, sweep, "running")
    try:
        results = run_tuner(name, cfg, args, sweep, record)
    except BaseException as err:  # build_tuner, Tuner.restore, tuner.fit: close what this launch opened
        close_runs(sweep["tracking_uri"], sweep, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", err)
        records.write_record(args.storage, sweep, "failed")
        raise
    return finish_launch(name, cfg, results, sweep, args.storage)


def run_tuner(name: str, cfg: ExperimentConfig, args: argparse.Namespace, sweep: dict, record: dict | None):
    """Build (or restore) the Tuner and fit it."""
    from ray import tune

    import trainable

    if args.address:
        import ray

        check_gpus(name, cfg, max([n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]] or [0]), per="node")
        for warning in shared_storage_warnings(sweep["tracking_uri"], args.storage):
            print(f"warning: {warning}", file=sys.stderr)
    if record:
        print(f"resuming {record['path']}")
        if frozen := [s for s in args.set if not s.partition("=")[0].strip().startswith("resources.")]:  # Tune restores the trials' configs
            print(f"warning: a resumed sweep continues its trials with the settings they were launched with; "
                  f"{', '.join('--set ' + s for s in frozen)} does not change them (only resources.* does, for the trials it restarts); "
                  f"start a new sweep, without --resume, to train with it", file=sys.stderr)
        tuner = tune.Tuner.restore(record["path"], trainable=tune.with_resources(trainable.train, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}),
                                   resume_unfinished=True, resume_errored=True)
    else:
        print(f"sweep {sweep['sweep_id']}: MLflow experiment {name!r} at {sweep['tracking_uri']}")
        tuner = build_tuner(cfg, sweep, args.storage, args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))  # Tune saves its state on SIGINT
    log = Path(args.storage) / sweep["sweep_id"] / "launch.log"
    if not args.verbose:
        print(f"Ray's own output (trial tables, worker logs): {log}", flush=True)
    from launch.console import ray_output_to  # (imports Ray: not before main() has set Ray's environment)

    with ray_output_to(log, enabled=not args.verbose):
        return tuner.fit()


def pruned_trials(sweep: dict) -> dict[str, str]:
    """Trial id -> 'pruned at epoch k (asha)' for the runs of ``sweep`` a scheduler stopped (their MLflow tags say so)."""
    mlflow_client = tracking.client(sweep["tracking_uri"])
    runs = tracking.search_all(mlflow_client, [sweep["experiment_id"]], f"tags.`{tracking.SWEEP_TAG}` = '{sweep['sweep_id']}'")
    return {r.data.tags.get(tracking.TRIAL_TAG, ""): f"pruned at epoch {r.data.tags.get(EPOCHS_TAG, '?')} ({r.data.tags[STOPPED_BY_TAG]})"
            for r in runs if r.data.tags.get(STOPPED_BY_TAG)}


def tested_value(result, metric: str) -> float | None:
    """A trial's ``metric`` for the weights it tested: an epoch metric at ``test/epoch`` (under early stopping the best
    epoch, not the last one reported), anything else as last reported."""
    m = result.metrics or {}
    tested = m.get(metrics.TEST_EPOCH)
    if metric not in metrics.EPOCH_METRICS or tested is None or tested == m.get(metrics.EPOCH) or result.metrics_dataframe is None:
        return m.get(metric)
    reported = result.metrics_dataframe
    return metrics.at_epoch(zip(reported[metrics.EPOCH], reported[metric].astype(float)), tested, m.get(metric))


def finish_launch(name: str, cfg: ExperimentConfig, results, sweep: dict, storage: str) -> int:
    """Print the trials sorted by the metric, close the parent run, say how to open the UI or resume."""
    outcomes, rows, finished = pruned_trials(sweep), [], []
    for result in results:
        m = result.metrics or {}
        outcome = outcomes.get(m.get("trial_id", ""), "")
        status = (f"ERROR: {str(result.error).splitlines()[0][:60]}" if result.error else outcome or ("done" if metrics.TEST_ACC in m else "unfinished"))
        rows.append((result.path and Path(result.path).name, tested_value(result, cfg.metric), m.get(metrics.TEST_ACC), m.get(metrics.EPOCH), status))
        if status == "done":
            finished.append(m)
    rows.sort(key=lambda r: (r[1] is None, -(r[1] or 0) if cfg.mode == "max" else (r[1] or 0)))
    width = max([len("trial"), *(len(str(r[0])) for r in rows)]) + 2  # full names, never cut
    print(f"\n{'trial':<{width}}{cfg.metric:>10}{metrics.TEST_ACC:>10}{'epochs':>8}  status")
    for folder, value, test_acc, epochs, status in rows:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
        print(f"{str(folder):<{width}}{fmt(value):>10}{fmt(test_acc):>10}{str(epochs or '-'):>8}  {status}")
    if finished:
        print(phase_times(finished))
    failed = sum(r[4].startswith("ERROR") for r in rows)
    unfinished = sum(r[4] == "unfinished" for r in rows)
    pruned = sum(r[4].startswith("pruned") for r in rows)
    close_runs(sweep["tracking_uri"], sweep, "KILLED" if unfinished else "FAILED" if failed else "FINISHED")
    records.write_record(storage, sweep, "interrupted" if unfinished else "failed" if failed else records.FINISHED)
    if unfinished:
        print(f"\ninterrupted: {unfinished} trials unfinished; their state is saved. Continue with:\n  python sweep.py --experiment {name} --resume")
        return 1
    done = len(rows) - failed - pruned
    print(f"\n{done}/{len(rows)} trials finished" + (f", {pruned} pruned by {cfg.scheduler.name}" if pruned else "") + ". " + ui_hint(sweep))
    return 1 if failed else 0


PHASES = ((metrics.EPOCH_SECONDS, "last epoch"), (metrics.TIME_EPOCH_REST, "rest of an epoch"), (metrics.TIME_TEST, "test set"),
          (metrics.TIME_ROBUSTNESS, "corruption test"), (metrics.TIME_ADVERSARIAL, "FGSM/PGD"), (metrics.TIME_ARTIFACTS, "artifacts"))
"""A trial's stages as its final report holds them: its last epoch's training, the rest (validation, logging, checkpoint,
report) of the epoch before it, then each stage after the last epoch (their ``time/*`` metrics in MLflow, where each
run's whole history is)."""


def phase_times(finished: list[dict]) -> str:
    """Where a finished trial's time went, the mean over ``finished`` (each trial's last reported metrics); a stage that
    took under 0.05 s (a stress test the experiment does not run) is left out."""
    means = ((label, sum(m.get(key, 0.0) for m in finished) / len(finished)) for key, label in PHASES)
    return f"time per finished trial (mean of {len(finished)}): " + ", ".join(f"{label} {v:.1f} s" for label, v in means if v >= 0.05)


def ui_hint(sweep: dict) -> str:
    """How to open this experiment's runs table: the tracking server's own page, or the local UI command and its URL."""
    uri, route = sweep["tracking_uri"], f"#/experiments/{sweep['experiment_id']}/runs"
    if uri.startswith(("http://", "https://")):
        return f"Compare them in the MLflow UI:\n  {uri.rstrip('/')}/{route}"
    return (f"Compare them in the MLflow UI:\n  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
            f"then open http://127.0.0.1:5000/{route}")


def close_runs(uri: str, sweep: dict, parent_status: str, error: BaseException | None = None) -> None:
    """End the parent run; trial runs a killed worker left RUNNING are marked KILLED (a resume reopens them). Retried."""
    mlflow_client = tracking.client(uri)
    left = tracking.search_all(mlflow_client, [sweep["experiment_id"]], f"tags.`{tracking.SWEEP_TAG}` = '{sweep['sweep_id']}' and attributes.status = 'RUNNING'")
    for run in left:
        if run.info.run_id != sweep["parent_run_id"]:
            tracking.retry(lambda: mlflow_client.set_terminated(run.info.run_id, status="KILLED"))
    if error is not None:
        tracking.set_tags(mlflow_client, sweep["parent_run_id"], {"error": f"{type(error).__name__}: {error}"})
    tracking.retry(lambda: mlflow_client.set_terminated(sweep["parent_run_id"], status=parent_status))

