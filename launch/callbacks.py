"""Ray Tune callbacks that keep MLflow consistent with what Ray knows about each trial.

A trial marks its own run FINISHED or FAILED, but a worker killed by a signal or stopped by a
scheduler never gets the chance; the driver sees it here and closes the run so none stays RUNNING.
Every MLflow call goes through ``tracking.retry``: Ray runs these hooks inside its trial-stop path,
so a transient "database is locked" must not turn a finished trial into an error.
"""
from __future__ import annotations

from ray.tune import Callback

import tracking
from tracking import EPOCHS_TAG, STOPPED_BY_TAG, metrics


class MlflowStatusCallback(Callback):
    """Close a trial's MLflow run from the driver when the trial ends, errs or is stopped."""

    def __init__(self, tracking_uri: str, scheduler: str = "none"):
        self.tracking_uri, self.scheduler = tracking_uri, scheduler

    def _runs(self, trial) -> list:
        sweep = trial.config.get("sweep", {})
        mlflow_client = tracking.client(self._uri(trial))
        return tracking.retry(lambda: mlflow_client.search_runs(
            [sweep["experiment_id"]], filter_string=f"tags.`{tracking.TRIAL_TAG}` = '{trial.trial_id}' and tags.`{tracking.SWEEP_TAG}` = '{sweep.get('sweep_id', '')}'"))

    def _uri(self, trial) -> str:
        sweep = trial.config.get("sweep")
        return tracking.sweep_uri(sweep) if sweep else self.tracking_uri

    def _close(self, trial, status: str, tags: dict | None = None, only_running: bool = True) -> None:
        mlflow_client = tracking.client(self._uri(trial))
        for run in self._runs(trial):
            if only_running and run.info.status != "RUNNING":
                continue
            if tags:
                tracking.set_tags(mlflow_client, run.info.run_id, tags)
            tracking.retry(lambda: mlflow_client.set_terminated(run.info.run_id, status=status))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        if metrics.TEST_ACC in result:  # trained every epoch (a scheduler may still stop it at max_t): finished
            self._close(trial, "FINISHED", only_running=False)
            return
        epochs = int(result.get(metrics.EPOCH, 0))
        stopped_by = self.scheduler if self.scheduler != "none" else "tune"
        self._close(trial, "KILLED", {STOPPED_BY_TAG: stopped_by, EPOCHS_TAG: epochs}, only_running=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FAILED", {"error": str(getattr(trial, "error_file", "") or "trial errored in Ray")})
