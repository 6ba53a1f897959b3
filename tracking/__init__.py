"""MLflow plumbing shared by the driver, the trials and the analysis.

The default store is ``mlruns/`` at the project root: an SQLite database (``mlruns/mlflow.db``,
MLflow 3 no longer accepts a plain file store) with artifacts beside it (``mlruns/artifacts``). The
driver resolves it to an absolute URI and creates it, and the experiment, before any trial starts:
trials run in Ray's working directories and would otherwise race on the schema migration.
"""
from __future__ import annotations

from pathlib import Path

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
TEST_IMAGES_TAG = "stresslab.test_images_sha256"  # SHA-256 of the test pixels, in the order of the logged predictions
GIT_DIFF_FILE = "git_diff.patch"

# The package's API: store.py (which store, its client, retried and paged calls), provenance.py (code, environment,
# driver), trial_run.py (a trial's run and its logged model).
from tracking.provenance import (  # noqa: E402
    driver_alive,
    driver_id,
    environment_tags,
    git_diff,
    git_state,
    images_digest,
    reap_orphans,
)
from tracking.store import (  # noqa: E402
    SWEEP_URI_ENV,
    TRANSIENT,
    artifact_root,
    check_store,
    client,
    default_tracking_uri,
    ensure_experiment,
    log_metrics,
    log_params,
    resolve_tracking_uri,
    retry,
    search_all,
    set_tags,
    sweep_uri,
)
from tracking.trial_run import TrialRun, log_pytorch_model, run_name  # noqa: E402

__all__ = [
    "PROJECT_ROOT", "PARENT_TAG", "NOTE_TAG", "SWEEP_TAG", "TRIAL_TAG", "KIND_TAG", "DRIVER_TAG", "STOPPED_BY_TAG", "EPOCHS_TAG", "STOP_TAGS",
    "TEST_IMAGES_TAG", "GIT_DIFF_FILE", "SWEEP_URI_ENV", "TRANSIENT", "artifact_root", "check_store", "client", "default_tracking_uri",
    "ensure_experiment", "log_metrics", "log_params", "resolve_tracking_uri", "retry", "search_all", "set_tags", "sweep_uri", "driver_alive",
    "driver_id", "environment_tags", "git_diff", "git_state", "images_digest", "reap_orphans", "TrialRun", "log_pytorch_model", "run_name",
]
