"""One trial's MLflow run (opened, or reopened on a restart, by the trial itself), its readable name, and the model it
logs as an MLflow 3 logged model."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tracking import GIT_DIFF_FILE, KIND_TAG, PARENT_TAG, STOP_TAGS, SWEEP_TAG, TEST_IMAGES_TAG, TRIAL_TAG
from tracking.provenance import images_digest
from tracking.store import TRANSIENT, client, log_metrics, log_params, retry, set_tags, sweep_uri


def run_name(trial: dict, overrides: dict[str, Any]) -> str:
    """Readable run name: ``resnet18-cutout-s42``, plus any other searched setting (``-lr0.031``)."""
    from config.settings import PATH_SETTINGS  # (here: the settings module imports tracking's metric names)

    augment = trial.get("augment", "none")
    augment = augment if isinstance(augment, str) else "+".join(augment) or "none"
    parts = [str(trial.get("arch")), augment, f"s{trial.get('seed')}"]
    for key, value in overrides.items():
        if key not in ("arch", "augment", "seed"):
            if isinstance(value, str):  # data.name=imagefolder -> "imagefolder"; a path by its last part (a trial name holds no '/')
                parts.append(Path(value).name if key in PATH_SETTINGS else value.replace("/", "_"))
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
            from tracking.private_apis import system_metrics_monitor

            interval = float(os.environ.get("STRESSLAB_SYSTEM_METRICS_INTERVAL", 10))
            return system_metrics_monitor(self.run_id, interval, self.logged_steps > 0, self.client.tracking_uri)
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


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    """Logger ``name`` shows only ``level`` and above inside the block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


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
    with quiet_logger("mlflow.utils.requirements_utils"):  # its mismatch warning (the CUDA torch build vs the pin) means nothing here
        retry(lambda: mlflow.pytorch.log_model(model, name="model", model_id=created.model_id, run_id=run.run_id, signature=signature,
                                               input_example=example, serialization_format="pt2",
                                               pip_requirements=[f"torch=={metadata.version('torch')}"], validate_serving_input=False))
    return created.model_id
