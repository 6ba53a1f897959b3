"""How trials are launched: ``python sweep.py --config experiments.yaml [--experiment NAME]``.

Validates the whole YAML, creates the MLflow store, experiment and a parent run, then hands the
grid to Ray Tune with ``trainable.train`` as the one trainable. Also resumes interrupted sweeps
and reruns the best trial of an experiment with exactly its config.

Exit codes: 0 every trial finished, 1 some trial failed, 2 bad input (nothing started).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import urllib.parse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launch import best
from launch import records as launches
from tracking import metrics
import tracking
from launch import secret_files
from tracking import EPOCHS_TAG, STOPPED_BY_TAG
from config.settings import ExperimentConfig
from config.schema import ConfigError, InputError, as_dict, expand_grid, resolve, trial_configs

RESULTS_DIR = tracking.PROJECT_ROOT / "ray_results"
EPILOG = """examples:
  tar xzf ../shared/datasets/cifar10-jpeg.tar.gz   # once, offline: the JPEG copy of CIFAR-10 into ./cifar10-jpeg
  python sweep.py --config experiments.yaml --experiment quick --set data.name=imagefolder --set data.root=cifar10-jpeg
  python sweep.py --experiment cifar10-stress --dry-run
  python sweep.py --experiment quick --resume
  python sweep.py --experiment quick --rerun-best
  python sweep.py --experiment quick --register-best quick-best
  python sweep.py --experiment cifar10-stress --address auto --tracking-uri http://127.0.0.1:5000

exit codes: 0 all trials finished, 1 some trial failed, 2 bad input (nothing started)"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments.yaml", help="experiment file (default: experiments.yaml)")
    p.add_argument("--experiment", help="experiment name (default: the file's default_experiment)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting by dotted path, e.g. --set epochs=2 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trial table; start nothing")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted launch of this experiment")
    p.add_argument("--resume-if-interrupted", action="store_true",
                   help="what a requeued batch job runs (slurm/sweep.sbatch, with a --storage per job): resume this experiment's latest sweep "
                        "under --storage if it was interrupted, exit 0 if it finished, start one if there is none")
    p.add_argument("--rerun-best", action="store_true", help="rerun the best finished trial of the experiment with exactly its config")
    p.add_argument("--register-best", metavar="NAME", help="register the best finished run's model in the MLflow Model Registry as NAME")
    p.add_argument("--alias", default="champion", help="alias --register-best sets on the new version (default: %(default)s; it moves from any older version)")
    p.add_argument("--metric", help="metric that picks the best run for --rerun-best/--register-best (default: the experiment's own metric, "
                                    "val/acc; a test/... metric selects on the test set and prints a warning)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto or ray://head:10001)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in ./mlruns)")
    p.add_argument("--storage", default=str(RESULTS_DIR), help=f"Ray results folder; shared storage on a cluster (default: {RESULTS_DIR})")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output (trial tables, worker logs) instead of sending it to "
                                                          "<storage>/<sweep id>/launch.log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.address:  # a local Ray binds every server to 127.0.0.1 (read when Ray is imported, so set first)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        name, cfg = resolve(args.config, args.experiment, args.set)
        cfg = absolute_paths(cfg)
        if args.dry_run:
            print_trial_table(name, cfg)
            return 0
        if not args.address:
            check_gpus(name, cfg, available_gpus())
    except ConfigError as err:
        return refuse(args, err)
    try:
        check_writable(args)
        if args.register_best:
            return best.register_best(name, cfg, args)
        if args.resume_if_interrupted and not args.resume:
            latest = (launches.sweeps(args.storage, name) or [None])[-1]
            if latest and latest["status"] == launches.FINISHED:
                print(f"sweep {latest['sweep_id']} under {args.storage} has finished; nothing to resume")
                return 0
            args.resume = latest is not None
        if not args.resume and not args.rerun_best:  # one download or check by the driver, not one failure per trial
            launches.prepare_data(cfg)  # (a rerun checks the data of the logged config it reruns)
        if args.rerun_best:
            return best.rerun_best(name, cfg, args, launch)
        return launch(name, cfg, args)
    except ConfigError as err:  # found once the cluster is known (a GPU request no node can meet); the launch closed its runs
        return refuse(args, err)
    except (PermissionError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def refuse(args: argparse.Namespace, err: ConfigError) -> int:
    print(f"error: invalid configuration ({args.config}):\n  " + "\n  ".join(err.problems), file=sys.stderr)
    return 2


def check_writable(args: argparse.Namespace) -> None:
    """The tracking store must answer (or, local, be where it can be made), and Ray's results folder (unless only a model
    is registered) and a local MLflow store must be writable, before anything starts."""
    if "://" in args.storage:  # Path() would make "s3:" a local folder, where the launch record and --resume then look
        raise InputError(f"--storage {args.storage}: a URI; stresslab keeps its launch records (for --resume) beside Ray's results, "
                         "in a folder: pass a local or shared folder (a bucket mounted as a folder works)")
    folders = [] if args.register_best else [Path(args.storage)]
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_store(uri, creating=not (args.register_best or args.rerun_best))
    if uri.startswith("sqlite:///"):
        folders.append(Path(uri[len("sqlite:///"):]).parent)
        if not args.register_best:  # the runs' artifacts (weights, predictions): written at each trial's end
            folders.append(Path(urllib.parse.urlparse(tracking.artifact_root(uri)).path))
    need = float(os.environ.get("STRESSLAB_MIN_FREE_MB", "100")) * 2**20
    for folder in folders:
        flag = "--storage" if folder == Path(args.storage) else "--tracking-uri"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_bytes(b"\0" * 65536)
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"cannot write to {folder} ({err.strerror}); choose a writable folder with {flag}") from err
        if (free := shutil.disk_usage(folder).free) < need:
            raise PermissionError(f"{folder} has {free / 2**20:.0f} MB free, below the {need / 2**20:.0f} MB a sweep needs "
                                  f"(STRESSLAB_MIN_FREE_MB); free some space or choose another folder with {flag}")


PATH_SETTINGS = ("data.root", "data.cache_dir")


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Data root and cache made absolute, in the base settings and in the grid: trials run in Ray's own working
    directories, where a relative path means something else."""
    absolute = lambda path: path if path is None else str(Path(path).expanduser().resolve())
    data = dataclasses.replace(cfg.data, root=absolute(cfg.data.root), cache_dir=absolute(cfg.data.cache_dir))
    grid = dict(cfg.grid)
    for key in PATH_SETTINGS:
        spec = grid.get(key)
        if isinstance(spec, list):
            grid[key] = [absolute(v) for v in spec]
        elif isinstance(spec, dict) and isinstance(spec.get("choice"), list):
            grid[key] = {**spec, "choice": [absolute(v) for v in spec["choice"]]}
    return dataclasses.replace(cfg, data=data, grid=grid)


def available_gpus() -> float:
    """GPUs a local Ray will have: the CUDA devices, or what RAY_OVERRIDE_RESOURCES declares to Ray (its own override)."""
    import torch

    declared = json.loads(os.environ.get("RAY_OVERRIDE_RESOURCES") or "{}").get("GPU")
    return float(declared) if declared is not None else torch.cuda.device_count()


def check_gpus(name: str, cfg: ExperimentConfig, gpus: float, per: str = "machine") -> None:
    """Refuse a per-trial GPU request no single node can meet (a trial runs on one node; Ray would wait forever)."""
    if cfg.resources.gpu > gpus:
        where = "this machine has" if per == "machine" else "the largest node of this cluster has"
        raise ConfigError([f"experiments.{name}.resources.gpu: {cfg.resources.gpu:g} GPU per trial but {where} {gpus:g}; "
                           f"use --set resources.gpu=0 to run on CPU"])


# Filesystems every node of a cluster can see (a local disk of the head is not one of them).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "cephfs", "ceph", "glusterfs", "fuse.")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest mount point of /proc/mounts above it); '' if unknown."""
    path, best = path.resolve(), ("", "")
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and (path == Path(fields[1]) or Path(fields[1]) in path.parents) and len(fields[1]) > len(best[0]):
            best = (fields[1], fields[2])
    return best[1]


def shared_storage_warnings(uri: str, storage: str) -> list[str]:
    """With --address, trials on other nodes write to the MLflow store and to --storage: say so where they cannot."""
    local = []  # (what, path as given, folder whose filesystem counts, fix)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        local.append(("a local SQLite MLflow store", path, Path(path).parent, "start an MLflow server on the head and pass --tracking-uri http://HEAD:5000"))
    local.append(("--storage", storage, Path(storage), "use a folder every node sees"))
    found = []
    for what, path, folder, hint in local:
        kind = filesystem_type(folder)
        if not kind.startswith(SHARED_FILESYSTEMS):
            found.append(f"{what} ({path}, {kind or 'unknown'} filesystem) is visible to this node only; trials on other nodes "
                         f"of the cluster cannot write there ({hint})")
    return found


def print_trial_table(name: str, cfg: ExperimentConfig) -> None:
    trials = trial_configs(cfg)
    print(f"experiment {name}: {len(trials)} trials, {cfg.epochs} epochs, resources per trial {as_dict(cfg.resources)}")
    print(f"{'#':>3}  {'arch':<14}{'augment':<10}{'seed':>6}  {'lr':>9}  {'data':<12}")
    for i, t in enumerate(trials):
        augment = t.augment if isinstance(t.augment, str) else "+".join(t.augment)
        print(f"{i:>3}  {t.arch:<14}{augment:<10}{t.seed:>6}  {t.optimizer.lr:>9.4g}  {t.data.name:<12}")


# --- launching ------------------------------------------------------------------------------


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
    from launch.callbacks import MlflowStatusCallback, SweepView

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
                 _system_config={"prestart_worker_first_driver": False})


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


def refuses_token(address: str) -> bool:
    """Whether the GCS at ``address`` answers this process's token with InvalidAuthToken (one RPC, seconds at most)."""
    from ray._raylet import GcsClient  # no public API asks this; any other outcome counts as "not a token problem"
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address).internal_kv_get(b"stresslab-probe", None, timeout=5)
    except AuthenticationError:
        return True
    except Exception:
        return False
    return False


def launch(name: str, cfg: ExperimentConfig, args: argparse.Namespace, kind: str = "trial", extra_tags: dict | None = None):
    """Run (or resume) the sweep; print the results table; return the exit code. No run is left RUNNING on any exit path."""
    from mlflow.exceptions import MlflowException

    record = launches.resume_target(args.storage, name) if args.resume else None
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
    launches.write_record(args.storage, sweep, "running")
    try:
        results = run_tuner(name, cfg, args, sweep, record)
    except BaseException as err:  # build_tuner, Tuner.restore, tuner.fit: close what this launch opened
        close_runs(sweep["tracking_uri"], sweep, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", err)
        launches.write_record(args.storage, sweep, "failed")
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
        tuner = tune.Tuner.restore(record["path"], trainable=tune.with_resources(trainable.train, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}),
                                   resume_unfinished=True, resume_errored=True)
    else:
        print(f"sweep {sweep['sweep_id']}: MLflow experiment {name!r} at {sweep['tracking_uri']}")
        tuner = build_tuner(cfg, sweep, args.storage, args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))  # Tune saves its state on SIGINT
    log = Path(args.storage) / sweep["sweep_id"] / "launch.log"
    if not args.verbose:
        print(f"Ray's own output (trial tables, worker logs): {log}", flush=True)
    with launches.ray_output_to(log, enabled=not args.verbose):
        return tuner.fit()


def pruned_trials(sweep: dict) -> dict[str, str]:
    """Trial id -> 'pruned at epoch k (asha)' for the runs of ``sweep`` a scheduler stopped (their MLflow tags say so)."""
    mlflow_client = tracking.client(sweep["tracking_uri"])
    runs = tracking.search_all(mlflow_client, [sweep["experiment_id"]], f"tags.`{tracking.SWEEP_TAG}` = '{sweep['sweep_id']}'")
    return {r.data.tags.get(tracking.TRIAL_TAG, ""): f"pruned at epoch {r.data.tags.get(EPOCHS_TAG, '?')} ({r.data.tags[STOPPED_BY_TAG]})"
            for r in runs if r.data.tags.get(STOPPED_BY_TAG)}


def finish_launch(name: str, cfg: ExperimentConfig, results, sweep: dict, storage: str) -> int:
    """Print the trials sorted by the metric, close the parent run, say how to open the UI or resume."""
    outcomes, rows = pruned_trials(sweep), []
    for result in results:
        m = result.metrics or {}
        outcome = outcomes.get(m.get("trial_id", ""), "")
        status = (f"ERROR: {str(result.error).splitlines()[0][:60]}" if result.error else outcome or ("done" if metrics.TEST_ACC in m else "unfinished"))
        rows.append((result.path and Path(result.path).name, m.get(cfg.metric), m.get(metrics.TEST_ACC), m.get(metrics.EPOCH), status))
    rows.sort(key=lambda r: (r[1] is None, -(r[1] or 0) if cfg.mode == "max" else (r[1] or 0)))
    width = max([len("trial"), *(len(str(r[0])) for r in rows)]) + 2  # full names, never cut
    print(f"\n{'trial':<{width}}{cfg.metric:>10}{metrics.TEST_ACC:>10}{'epochs':>8}  status")
    for folder, value, test_acc, epochs, status in rows:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
        print(f"{str(folder):<{width}}{fmt(value):>10}{fmt(test_acc):>10}{str(epochs or '-'):>8}  {status}")
    failed = sum(r[4].startswith("ERROR") for r in rows)
    unfinished = sum(r[4] == "unfinished" for r in rows)
    pruned = sum(r[4].startswith("pruned") for r in rows)
    close_runs(sweep["tracking_uri"], sweep, "KILLED" if unfinished else "FAILED" if failed else "FINISHED")
    launches.write_record(storage, sweep, "interrupted" if unfinished else "failed" if failed else launches.FINISHED)
    if unfinished:
        print(f"\ninterrupted: {unfinished} trials unfinished; their state is saved. Continue with:\n  python sweep.py --experiment {name} --resume")
        return 1
    done = len(rows) - failed - pruned
    print(f"\n{done}/{len(rows)} trials finished" + (f", {pruned} pruned by {cfg.scheduler.name}" if pruned else "") + ". " + ui_hint(sweep))
    return 1 if failed else 0


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


if __name__ == "__main__":
    sys.exit(main())
