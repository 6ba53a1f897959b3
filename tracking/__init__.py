"""MLflow plumbing shared by the driver, the trials and the analysis.

The default store is ``mlruns/`` at the project root: an SQLite database (``mlruns/mlflow.db``,
MLflow 3 no longer accepts a plain file store) with artifacts beside it (``mlruns/artifacts``). The
driver resolves it to an absolute URI and creates it, and the experiment, before any trial starts:
trials run in Ray's working directories and would otherwise race on the schema migration.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from unittest import mock

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
SWEEP_TAG = "stresslab.sweep_id"
TRIAL_TAG = "stresslab.trial_id"
KIND_TAG = "stresslab.kind"  # sweep | trial | rerun | analysis
DRIVER_TAG = "stresslab.driver"  # host:pid:start time of the process that launched the run
STOPPED_BY_TAG = "stopped_by"  # the scheduler that stopped a trial before its last epoch
EPOCHS_TAG = "epochs_completed"
STOP_TAGS = (STOPPED_BY_TAG, EPOCHS_TAG, "killed_because")
PACKAGES = ("torch", "torchvision", "ray", "mlflow", "numpy", "grad-cam")


def default_tracking_uri(root: Path = PROJECT_ROOT) -> str:
    """``sqlite:////abs/path/mlruns/mlflow.db``."""
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the project's local store; local paths made absolute."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


# Where a resumed sweep logs now: {sweep id: tracking URI}, set by the driver of a resume for itself and (runtime_env)
# for its trials. The same store may be served at a new address (a Slurm job's server moves with each allocation),
# while Tune restores the trials' configs and the driver's callbacks with the address of the first launch. Keyed by
# sweep id: a process that launches several sweeps (the tests) keeps its first runtime_env for all of them.
SWEEP_URI_ENV = "STRESSLAB_SWEEP_TRACKING_URI"


def sweep_uri(sweep: dict) -> str:
    """The tracking URI the runs of ``sweep`` are logged to now: the resume's, else the one recorded in ``sweep``."""
    moved = json.loads(os.environ.get(SWEEP_URI_ENV) or "{}")
    return moved.get(sweep.get("sweep_id", ""), sweep["tracking_uri"])


def artifact_root(uri: str) -> str | None:
    """Artifact folder beside a local SQLite store (None for a server, which has its own)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "artifacts").as_uri()


def check_store(uri: str, creating: bool) -> None:
    """Refuse, in seconds, a tracking URI that cannot work, naming it: a server that does not answer (the MLflow client
    retries one for minutes), a SQLite store whose folder's parent is missing (a typo would create a new, empty store
    there) or, when only reading (``creating`` False), a SQLite file that does not exist."""
    import urllib.error
    import urllib.request

    from config.schema import InputError

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()  # (no login needed: /health is open)
        except urllib.error.HTTPError:
            pass  # it answers: whatever it says about /health, the calls that follow say more
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise InputError(f"the MLflow tracking server {uri} does not answer ({reason}); start it, or pass another --tracking-uri "
                             f"(or leave it out for the local store {default_tracking_uri()})") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not creating and not db.is_file():
            raise InputError(f"no MLflow store at {uri} ({db} does not exist); pass the --tracking-uri of the sweep's store")
        if creating and not db.parent.parent.is_dir():
            raise InputError(f"the MLflow store {uri} would be created in {db.parent}, whose parent folder does not exist: a typo? "
                             f"create it first, or pass another --tracking-uri")


def client(uri: str):
    """An ``MlflowClient`` on ``uri``, creating the local store folder first."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"cannot create the MLflow store folder {db.parent} ({err.strerror}); pass --tracking-uri") from err
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(mlflow_client, name: str, description: str, uri: str) -> str:
    """Id of MLflow experiment ``name``, created (with its artifact folder) when missing."""
    found = mlflow_client.get_experiment_by_name(name)
    exp_id = found.experiment_id if found else mlflow_client.create_experiment(name, artifact_location=_experiment_artifacts(uri, name))
    if description:
        mlflow_client.set_experiment_tag(exp_id, NOTE_TAG, description)
    mlflow_client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")  # UI opens on the runs table
    return exp_id


def _experiment_artifacts(uri: str, name: str) -> str | None:
    root = artifact_root(uri)
    return f"{root}/{name}" if root else None


def git(*args: str, root: Path = PROJECT_ROOT) -> str:
    """Output of a git command in the checkout ('' outside git)."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside git)."""
    commit = git("rev-parse", "HEAD", root=root)
    if not commit:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": "true" if git("status", "--porcelain", "--untracked-files=no", root=root) else "false"}


def git_diff(root: Path = PROJECT_ROOT, limit: int = 1_000_000) -> str:
    """``git diff HEAD`` of a dirty checkout (tracked files), cut at ``limit`` characters; '' when clean."""
    diff = git("diff", "HEAD", root=root)
    return diff if len(diff) <= limit else diff[:limit] + f"\n[cut at {limit} characters of {len(diff)}]\n"


GIT_DIFF_FILE = "git_diff.patch"


def environment_tags(entry_point: str = "sweep.py") -> dict[str, str]:
    """Code version, package versions, host and Python: what reproducing a run needs. The ``mlflow.source.*`` and
    ``mlflow.user`` tags fill the MLflow UI's Source, Version and User columns (runs made through the client get none)."""
    import getpass

    tags = git_state()
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "missing"
    tags.update({"host": socket.gethostname(), "python": platform.python_version(),
                 "mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL", "mlflow.user": getpass.getuser()})
    if tags["git.commit"] != "unknown":
        tags.update({"mlflow.source.git.commit": tags["git.commit"], "mlflow.source.git.branch": git("rev-parse", "--abbrev-ref", "HEAD")})
    return tags


def driver_id() -> str:
    """This process as host:pid:start time (the start time tells a reused pid apart)."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.0f}"


def driver_alive(driver: str) -> bool | None:
    """Whether the driver that tagged a run still runs; None when it ran on another host (unknowable here)."""
    import psutil

    host, _, rest = driver.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" == started
    except psutil.Error:
        return False


TEST_IMAGES_TAG = "stresslab.test_images_sha256"


def images_digest(images) -> str:
    """SHA-256 of a uint8 image array's bytes (C order)."""
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


PAGE_SIZE = 1000  # runs per search request (MLflow's own default and cap of one page)


def search_all(mlflow_client, experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string``, page after page (one search returns at most a page: past it, runs were
    silently missing), each page retried."""
    runs, token = [], None
    while True:
        page = retry(lambda: mlflow_client.search_runs(experiment_ids, filter_string, order_by=order_by, max_results=PAGE_SIZE, page_token=token))
        runs += list(page)
        token = page.token
        if not token:
            return runs


def reap_orphans(mlflow_client, experiment_id: str) -> int:
    """Mark KILLED, with a tag saying why, the RUNNING runs whose driver on this host is gone; returns how many."""
    runs = search_all(mlflow_client, [experiment_id], "attributes.status = 'RUNNING'")
    reaped = 0
    for run in runs:
        driver = run.data.tags.get(DRIVER_TAG)
        if driver and driver_alive(driver) is False:
            set_tags(mlflow_client, run.info.run_id, {"killed_because": f"its driver {driver} is gone (found by a later launch)"})
            retry(lambda: mlflow_client.set_terminated(run.info.run_id, status="KILLED"))
            reaped += 1
    return reaped


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (``optimizer.lr``), the form MLflow params and ``--set`` use."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_metrics(mlflow_client, run_id: str, values: dict[str, float], step: int) -> None:
    """Log a dict of metrics at one step in one batch (retried: SQLite may be busy with other trials)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in values.items()]
    retry(lambda: mlflow_client.log_batch(run_id, metrics=batch))


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    """Log flattened params in batches of 100 (MLflow's per-call limit)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for start in range(0, len(items), 100):
        chunk = items[start : start + 100]
        retry(lambda: mlflow_client.log_batch(run_id, params=chunk))


def set_tags(mlflow_client, run_id: str, tags: dict[str, Any]) -> None:
    """Tags in one batch (values as strings, cut to MLflow's 5,000-character limit), retried."""
    from mlflow.entities import RunTag

    if tags:
        batch = [RunTag(key, str(value)[:5000]) for key, value in tags.items()]
        retry(lambda: mlflow_client.log_batch(run_id, tags=batch))


TRANSIENT = ("locked", "busy")


def retry(fn, attempts: int = 8, delay: float = 0.25, transient: tuple[str, ...] = TRANSIENT):
    """Call ``fn``, retrying with backoff on store errors whose message contains one of ``transient``
    (by default SQLite's ``database is locked``)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps sqlite errors in several exception types
            message = str(err).lower()
            if attempt == attempts - 1 or not any(marker in message for marker in transient):
                raise
            time.sleep(delay * 2**attempt)
    return None


def run_name(trial: dict, overrides: dict[str, Any]) -> str:
    """Readable run name: ``resnet18-cutout-s42``, plus any other searched setting (``-lr0.031``)."""
    augment = trial.get("augment", "none")
    augment = augment if isinstance(augment, str) else "+".join(augment) or "none"
    parts = [str(trial.get("arch")), augment, f"s{trial.get('seed')}"]
    for key, value in overrides.items():
        if key not in ("arch", "augment", "seed"):
            if isinstance(value, str):  # data.name=imagefolder -> "imagefolder"; a path by its last part (a trial name holds no '/')
                parts.append(Path(value).name if key.endswith((".root", ".cache_dir")) else value.replace("/", "_"))
            elif isinstance(value, list):
                parts.append(f"{key.split('.')[-1]}{'x'.join(map(str, value))}")  # model.widths=[8, 16] -> "widths8x16"
            else:
                parts.append(f"{key.split('.')[-1]}{value:.3g}" if isinstance(value, float) else f"{key.split('.')[-1]}{value}")
    return "-".join(parts)


class TrialRun:
    """One trial's MLflow run; a no-op when the trial runs without a tracking context."""

    def __init__(self, mlflow_client=None, run_id: str | None = None, logged_steps: int = 0):
        self.client, self.run_id, self.logged_steps = mlflow_client, run_id, logged_steps

    @classmethod
    def open(cls, sweep: dict, trial: dict, name: str, trial_id: str, resume_run_id: str | None) -> "TrialRun":
        """Continue this trial's run (after a restart or resume) or start a child run of the sweep's parent run.

        A restarted trial finds its run by checkpoint or by (sweep id, trial id), so it never gets a
        second run; steps it had already logged are not logged again.
        """
        if not sweep:
            return cls()
        mlflow_client = client(sweep_uri(sweep))
        run_id = resume_run_id or cls._existing(mlflow_client, sweep, trial_id)
        if run_id:
            history = retry(lambda: mlflow_client.get_metric_history(run_id, "epoch"))
            stale = [k for k in STOP_TAGS if k in retry(lambda: mlflow_client.get_run(run_id)).data.tags]
            for key in stale:  # it was stopped before; now it runs again
                retry(lambda: mlflow_client.delete_tag(run_id, key))
            retry(lambda: mlflow_client.update_run(run_id, status="RUNNING"))
            found = cls(mlflow_client, run_id, max((int(m.step) for m in history), default=0))
            found.set_tags({"pid": os.getpid(), "host": socket.gethostname()})
            return found
        tags = {**sweep.get("tags", {}), SWEEP_TAG: sweep["sweep_id"], TRIAL_TAG: trial_id, KIND_TAG: sweep.get("kind", "trial"),
                "pid": str(os.getpid()), "host": socket.gethostname()}
        if sweep.get("parent_run_id"):
            tags[PARENT_TAG] = sweep["parent_run_id"]
        run = retry(lambda: mlflow_client.create_run(sweep["experiment_id"], tags=tags, run_name=name))
        log_params(mlflow_client, run.info.run_id, trial)
        if sweep.get("git_diff"):
            retry(lambda: mlflow_client.log_text(run.info.run_id, sweep["git_diff"], GIT_DIFF_FILE))
        return cls(mlflow_client, run.info.run_id)

    @staticmethod
    def _existing(mlflow_client, sweep: dict, trial_id: str) -> str | None:
        runs = retry(lambda: mlflow_client.search_runs(
            [sweep["experiment_id"]], f"tags.`{SWEEP_TAG}` = '{sweep['sweep_id']}' and tags.`{TRIAL_TAG}` = '{trial_id}'"))
        return runs[0].info.run_id if runs else None

    def tag(self, key: str) -> str | None:
        """A tag of this run (None when untracked or unset)."""
        return self.client.get_run(self.run_id).data.tags.get(key) if self.client else None

    def log_epoch(self, values: dict[str, float], step: int) -> None:
        """Per-epoch metrics at ``step``; steps already logged before a restart are not logged twice."""
        if self.client and step > self.logged_steps:
            log_metrics(self.client, self.run_id, values, step)
            self.logged_steps = step

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Final metrics (test set) at the last epoch's step."""
        if self.client:
            log_metrics(self.client, self.run_id, values, step)

    def log_dataset(self, data: dict, bundle) -> None:
        """The data set as an MLflow dataset input: name, source, digest, split sizes."""
        if not self.client:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        profile = {"train": len(bundle.train), "val": len(bundle.val) if bundle.val is not None else 0, "test": len(bundle.test),
                   "classes": len(bundle.classes), "val_fraction": data.get("val_fraction"), "subset": data.get("subset"), "split_seed": data.get("split_seed")}
        dataset = Dataset(name=data["name"], digest=f"{bundle.digest}-{data.get('split_seed')}-{data.get('subset')}",
                          source_type="local", source=str(data.get("root")), profile=json.dumps(profile))
        # Concurrent trials on the same data race to insert the same dataset row (UNIQUE constraint on experiment,
        # name, digest): the loser's retry finds the row and only links its run to it.
        retry(lambda: self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]),
              transient=(*TRANSIENT, "unique constraint failed: datasets"))
        # The test pixels themselves, in the order of the logged predictions: the analysis refuses other pixels.
        set_tags(self.client, self.run_id, {TEST_IMAGES_TAG: images_digest(bundle.test.x.cpu().numpy())})

    def system_metrics(self):
        """A started MLflow system-metrics monitor (CPU, memory, GPU where available), or None."""
        if not self.client:
            return None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            interval = float(os.environ.get("STRESSLAB_SYSTEM_METRICS_INTERVAL", 10))
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=self.logged_steps > 0, tracking_uri=self.client.tracking_uri)
            monitor.start()
            return monitor
        except Exception as err:  # psutil missing or platform unsupported: training goes on without
            print(f"system metrics unavailable: {err}")
            return None

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tags in one batch (values as strings, cut to MLflow's 5,000-character limit)."""
        if self.client:
            set_tags(self.client, self.run_id, tags)

    def log_artifacts(self, folder: str | Path) -> None:
        if not self.client:
            return
        try:
            retry(lambda: self.client.log_artifacts(self.run_id, str(folder)))
        except OSError as err:  # a full disk or a read-only artifact folder: say which folder
            where = self.client.get_run(self.run_id).info.artifact_uri
            raise OSError(err.errno, f"cannot store the run's artifacts in {where} ({err.strerror or err})") from err

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        """Mark the run ended; a failure keeps its error with the run. Called from error handlers, so it never raises: a
        store that refuses even this (a full disk) leaves the run to the driver, which closes what its trials left."""
        if not self.client:
            return
        try:
            if error is not None:
                self.set_tags({"error": f"{type(error).__name__}: {error}"})
        except Exception as err:  # the status below matters more than the error text
            print(f"warning: could not tag run {self.run_id} with its error ({err})", file=sys.stderr)
        try:
            retry(lambda: self.client.set_terminated(self.run_id, status=status))
        except Exception as err:
            print(f"warning: could not mark run {self.run_id} {status} ({err}); the driver closes it", file=sys.stderr)


def log_pytorch_model(run: "TrialRun", model, example) -> str | None:
    """Log ``model`` as the run's MLflow 3 logged model ``model`` (torch.export ``pt2``: loads without unpickling), with
    signature and input example: it shows in the run's "Logged models" and the Models tab, and ``runs:/<run>/model``
    and ``models:/<model id>`` load it. Returns the model id (None when untracked)."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    if not run.client:
        return None
    model = model.cpu().eval()
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    mlflow.set_tracking_uri(run.client.tracking_uri)  # log_model resolves the global URI; a trial process logs to one store
    # MLflow checks the requirements against the running environment by scanning every installed distribution
    # (2.4-3.3 s per process, in every trial actor). Ours pin the running torch, which cannot mismatch: skip it. Nor does it
    # load the pt2 back to run the input example (2 s a trial): tests/test_mlflow_native.py loads one and checks its predictions.
    logged = run.client.get_run(run.run_id)  # the model belongs to the run's experiment (log_model alone would use the default one)
    created = retry(lambda: run.client.create_logged_model(logged.info.experiment_id, name="model", source_run_id=run.run_id,
                                                           params=logged.data.params, model_type="pytorch"))
    with mock.patch("mlflow.utils.environment.warn_dependency_requirement_mismatches"):
        retry(lambda: mlflow.pytorch.log_model(model, name="model", model_id=created.model_id, run_id=run.run_id, signature=signature,
                                               input_example=example, serialization_format="pt2",
                                               pip_requirements=[f"torch=={metadata.version('torch')}"], validate_serving_input=False))
    return created.model_id
