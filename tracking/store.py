"""The MLflow store: which one (URI), whether it can work, a client on it, experiments, and calls that are retried
(a SQLite store is locked while another process writes) or paged (a search returns one page)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tracking import NOTE_TAG, PROJECT_ROOT


def default_tracking_uri(root: Path = PROJECT_ROOT) -> str:
    """``sqlite:////abs/path/mlruns/mlflow.db``."""
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths as given); None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the project's local store; local paths made absolute."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    db = sqlite_path(uri)
    return f"{SQLITE}{db.resolve()}" if db else uri


# Where a resumed sweep logs now: {sweep id: tracking URI}, set by the driver of a resume for itself and (runtime_env)
# for its trials. The same store may be served at a new address (a Slurm job's server moves with each allocation),
# while Tune restores the trials' configs and the driver's callbacks with the address of the first launch. Keyed by
# sweep id: a process that launches several sweeps (the tests) keeps its first runtime_env for all of them.
SWEEP_URI_ENV = "STRESSLAB_SWEEP_TRACKING_URI"


def sweep_uri(sweep: dict) -> str:
    """The tracking URI the runs of ``sweep`` are logged to now: the resume's, else the one recorded in ``sweep``."""
    moved = json.loads(os.environ.get(SWEEP_URI_ENV) or "{}")
    return moved.get(sweep.get("sweep_id", ""), sweep["tracking_uri"])


def artifact_folder(uri: str) -> Path | None:
    """Artifact folder beside a local SQLite store (None for a server, which has its own)."""
    db = sqlite_path(uri)
    return db.parent / "artifacts" if db else None


def artifact_root(uri: str) -> str | None:
    """``artifact_folder`` as the file URI MLflow takes for an experiment's artifact location."""
    folder = artifact_folder(uri)
    return folder.as_uri() if folder else None


def check_store(uri: str, creating: bool) -> None:
    """Refuse, in seconds, a tracking URI that cannot work, naming it: a server that does not answer (the MLflow client
    retries one for minutes), a SQLite store whose folder's parent is missing (a typo would create a new, empty store
    there) or, when only reading (``creating`` False), a SQLite file that does not exist."""
    import urllib.error
    import urllib.request

    from config.errors import InputError

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()  # (no login needed: /health is open)
        except urllib.error.HTTPError:
            pass  # it answers: whatever it says about /health, the calls that follow say more
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise InputError(f"the MLflow tracking server {uri} does not answer ({reason}); start it, or pass another --tracking-uri "
                             f"(or leave it out for the local store {default_tracking_uri()})") from None
    elif db := sqlite_path(uri):
        if not creating and not db.is_file():
            raise InputError(f"no MLflow store at {uri} ({db} does not exist); pass the --tracking-uri of the sweep's store")
        if creating and not db.parent.parent.is_dir():
            raise InputError(f"the MLflow store {uri} would be created in {db.parent}, whose parent folder does not exist: a typo? "
                             f"create it first, or pass another --tracking-uri")
    else:  # a folder (MLflow 3's file store is frozen), an in-memory sqlite://, a database without a server, a typo
        raise InputError(f"the tracking URI {uri!r} is not a store stresslab logs to: give a SQLite file (sqlite:///path/mlflow.db; "
                         f"the default is {default_tracking_uri()}) or an MLflow server (http://host:5000, which may keep its runs "
                         "in PostgreSQL or MySQL: mlflow server --backend-store-uri postgresql://...)")


def client(uri: str):
    """An ``MlflowClient`` on ``uri``, creating the local store folder first."""
    from mlflow import MlflowClient

    if db := sqlite_path(uri):
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
