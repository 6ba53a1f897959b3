"""Ray Tune callbacks that keep MLflow consistent with what Ray knows about each trial.

A trial marks its own run FINISHED or FAILED, but a worker killed by a signal or stopped by a
scheduler never gets the chance; the driver sees it here and closes the run so none stays RUNNING.
"""
from __future__ import annotations

from ray.tune import Callback

import metrics
import tracking


class MlflowStatusCallback(Callback):
    """Close a trial's MLflow run from the driver when the trial ends, errs or is stopped."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri

    def _close(self, trial, status: str, error: str | None = None) -> None:
        mlflow_client = tracking.client(self.tracking_uri)
        sweep_id = trial.config.get("sweep", {}).get("sweep_id", "")
        runs = mlflow_client.search_runs(
            [trial.config["sweep"]["experiment_id"]],
            filter_string=f"tags.`{tracking.TRIAL_TAG}` = '{trial.trial_id}' and tags.`{tracking.SWEEP_TAG}` = '{sweep_id}' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            if error:
                mlflow_client.set_tag(run.info.run_id, "error", error[:5000])
            tracking.retry(lambda: mlflow_client.set_terminated(run.info.run_id, status=status))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FAILED", str(getattr(trial, "error_file", "") or "trial errored in Ray"))


class ProgressCallback(Callback):
    """One compact line per trial per epoch (Ray's own tables stay at status level)."""

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        keys = [k for k in (metrics.TRAIN_LOSS, metrics.TRAIN_ACC, metrics.VAL_ACC, metrics.TEST_ACC, metrics.IMAGES_PER_SECOND) if k in result]
        shown = "  ".join(f"{k}={result[k]:.4g}" for k in keys)
        epochs = trial.config.get("trial", {}).get("epochs", "?")
        print(f"[{trial}] epoch {result.get(metrics.EPOCH, '?')}/{epochs}  {shown}", flush=True)
