"""Finished runs from MLflow: search, artifacts (read in place or through the user cache: ``artifacts.py``),
predictions, weights and test images.

Works the same against the local SQLite store and a tracking server (``mlflow server``): only
``search_runs`` and artifact download are used. Nothing is re-trained.
"""
from __future__ import annotations

import json
import re
import sys
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

import tracking
from analysis import integrity, log
from analysis.artifacts import ArtifactReader
from config.errors import InputError
from config.yaml12 import load_yaml
from tracking import metrics


@dataclass
class Predictions:
    """A run's test-set predictions, in the order of ``index`` (official test indices)."""

    probs: np.ndarray  # (N, C) softmax
    labels: np.ndarray
    index: np.ndarray
    classes: list[str]
    logits: np.ndarray | None = None  # raw test logits (for temperature scaling)
    val_logits: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    val_index: np.ndarray | None = None  # the validation images' source indices (training set), in the order of val_logits

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.labels

    def confident_failures(self, threshold: float) -> np.ndarray:
        """Bool mask: the high-confidence failures (``metrics.confident_errors``)."""
        return metrics.confident_errors(self.probs, self.labels, threshold)

    @classmethod
    def load(cls, path: str | Path) -> "Predictions":
        """The predictions file a trial wrote; InputError saying what is wrong where it is not one (a file from the store
        is data: it is read without unpickling and checked before anything indexes with it)."""
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not an npz, truncated, or object arrays
            raise InputError(f"{metrics.PREDICTIONS_FILE} is not readable as arrays ({err})") from None
        if problems := integrity.predictions_problems(arrays):
            raise InputError(f"{metrics.PREDICTIONS_FILE} is not what a trial writes: {'; '.join(problems)}")
        optional = {k: arrays[k] for k in ("logits", "val_logits", "val_labels", "val_index") if k in arrays}
        return cls(arrays["probs"].astype(np.float64), arrays["labels"], arrays["index"], [str(c) for c in arrays["classes"]], **optional)


@dataclass
class RunRecord:
    """One finished trial: identity, settings, final metrics, curves and its downloaded artifacts."""

    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    reader: ArtifactReader
    artifact_uri: str | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: frozenset[str] = frozenset()  # the run's top-level artifact paths
    slug: str = ""  # the run's name as a folder name of the report (safe_names: unique, no path in it)
    test_images_sha256: str | None = None  # what the trial was tested on (tracking.TEST_IMAGES_TAG; None for older runs)
    model: tuple[str, str] | None = None  # the run's MLflow logged model: (model id, artifact location), where its weights are

    def tested(self, name: str) -> float | None:
        """Epoch metric ``name`` (``val/acc``) of the weights the trial tested: its value at ``test/epoch``, which under
        early stopping is the best validation epoch, not the last; else the latest."""
        return metrics.at_epoch(self.history.get(name, []), self.metrics.get(metrics.TEST_EPOCH), self.metrics.get(name))

    def artifact(self, path: str) -> Path:
        """A local path of one of the run's artifacts: in the store itself, or in the user cache."""
        return self.reader.run_file(self.run_id, self.artifact_uri, path)

    @cached_property
    def config(self) -> dict:
        return load_yaml(self.artifact(metrics.CONFIG_FILE).read_text())

    @cached_property
    def predictions(self) -> Predictions:
        return Predictions.load(self.artifact(metrics.PREDICTIONS_FILE))

    def state_dict(self) -> dict:
        """The trial's final weights, from their one copy: ``weights.pt`` (``log_model: false``) or the logged model's
        exported program (``torch.export.load``); neither unpickles anything."""
        import torch

        if metrics.WEIGHTS_FILE in self.artifacts:
            return torch.load(self.artifact(metrics.WEIGHTS_FILE), map_location="cpu", weights_only=True)
        if self.model is None:
            raise InputError(f"run {self.name} ({self.run_id}) has neither {metrics.WEIGHTS_FILE} nor a logged model: its weights are not in the store")
        program = torch.export.load(self.reader.model_file(*self.model, metrics.MODEL_PT2))
        return dict(program.state_dict)

    @cached_property
    def trial_robustness(self) -> dict | None:
        """The corruption test the trial ran on its own device (``robustness: true``) with accuracy per severity, or None
        (not run, or logged by an older version as means only)."""
        if metrics.ROBUSTNESS_FILE not in self.artifacts:
            return None
        logged = json.loads(self.artifact(metrics.ROBUSTNESS_FILE).read_text())
        if not {"accuracy", "images", "requested"} <= set(logged):
            return None
        return well_formed(self, metrics.ROBUSTNESS_FILE, logged, {"requested": int, "images": int, "accuracy": dict})

    @cached_property
    def trial_adversarial(self) -> dict | None:
        """The FGSM/PGD test the trial ran on its own device (``adversarial: true``), or None."""
        from stress import adversarial

        if metrics.ADVERSARIAL_FILE not in self.artifacts:
            return None
        logged = adversarial.from_json(self.artifact(metrics.ADVERSARIAL_FILE).read_text())
        return well_formed(self, metrics.ADVERSARIAL_FILE, logged, {"requested": int, "images": int, "steps": int, "step_size": float,
                                                                   "epsilons": list, "accuracy": dict, "clean": float})


NUMBER = (int, float)


def well_formed(record: RunRecord, artifact: str, logged: dict, types: dict[str, type]) -> dict | None:
    """``logged`` if each field has its type (a float may be an int; the lists and dicts hold numbers, or lists of
    them), else None with a note: a file from the store is data, and one that is not what a trial writes is measured
    again by the analysis rather than trusted."""
    def ok(value, kind) -> bool:
        if kind is float:
            return isinstance(value, NUMBER) and not isinstance(value, bool)
        if kind is list:
            return isinstance(value, list) and all(ok(v, float) for v in value)
        if kind is dict:
            return isinstance(value, dict) and all(isinstance(k, str) and ok(v, list) for k, v in value.items())
        return isinstance(value, kind) and not isinstance(value, bool)

    bad = [key for key, kind in types.items() if not ok(logged.get(key), kind)]
    if bad:
        print(f"note: {record.name}'s {artifact} is not what a trial writes ({', '.join(bad)}); the analysis measures it again", file=sys.stderr)
        return None
    return logged


def safe_names(names: list[str]) -> list[str]:
    """Each name (read from the store: anyone who can write there chooses it) as one folder name: letters, digits, '-',
    '_' and '.' kept, anything else '_', no leading dot, at most 100 characters; made unique with -2, -3, ...."""
    out: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")[:100] or "run"
        slug, n = base, 1
        while slug in out:
            n += 1
            slug = f"{base}-{n}"
        out.append(slug)
    return out


def find_runs(experiment: str, uri: str, sweep: str | None = "latest", log=print, reader: ArtifactReader | None = None) -> list[RunRecord]:
    """Finished trial runs of ``experiment`` with test predictions (of its latest launch unless ``sweep`` is 'all' or an id).

    Runs without test predictions (pruned by a scheduler, killed, failed) or whose predictions file is not what a trial
    writes are skipped with a one-line note each."""
    import mlflow

    mlflow_client = mlflow.MlflowClient(uri)
    reader = reader or ArtifactReader(uri)
    found = tracking.retry(lambda: mlflow_client.get_experiment_by_name(experiment))
    if found is None:
        names = [e.name for e in mlflow_client.search_experiments()]
        raise InputError(f"no MLflow experiment {experiment!r} at {uri}; known: {', '.join(names) or 'none'}. Run the sweep first.")
    runs = tracking.search_all(mlflow_client, [found.experiment_id], f"tags.`{tracking.KIND_TAG}` = 'trial'", order_by=["attributes.start_time ASC"])
    if sweep and sweep != "all":
        sweeps = [r.data.tags.get(tracking.SWEEP_TAG) for r in runs if r.info.status == "FINISHED"]
        wanted = sorted(s for s in sweeps if s)[-1] if sweep == "latest" and any(sweeps) else sweep
        runs = [r for r in runs if r.data.tags.get(tracking.SWEEP_TAG) == wanted]
    models, records = logged_models(mlflow_client, found.experiment_id), []
    for run in runs:
        if not RUN_ID.fullmatch(run.info.run_id):  # it names a folder of the download cache
            log(f"note: skipping a run whose id {run.info.run_id!r} is not an MLflow run id")
            continue
        listed = tracking.retry(lambda: mlflow_client.list_artifacts(run.info.run_id)) if run.info.status == "FINISHED" else []
        artifacts = frozenset(a.path for a in listed)
        if metrics.PREDICTIONS_FILE not in artifacts:  # pruned, killed or failed (a pruned run may end FINISHED without them)
            stopped = run.data.tags.get(tracking.STOPPED_BY_TAG)
            why = f", stopped by {stopped} at epoch {run.data.tags.get(tracking.EPOCHS_TAG, '?')}" if stopped else ""
            log(f"note: skipping {run.data.tags.get('mlflow.runName', run.info.run_id)} ({run.info.status}{why}): no test predictions")
            continue
        history = {k: [(m.step, m.value) for m in tracking.retry(lambda: mlflow_client.get_metric_history(run.info.run_id, k))]
                   for k in metrics.EPOCH_METRICS}
        record = RunRecord(run.info.run_id, run.data.tags.get("mlflow.runName", run.info.run_id), run.data.params, run.data.metrics,
                           reader, run.info.artifact_uri, history, artifacts, test_images_sha256=run.data.tags.get(tracking.TEST_IMAGES_TAG),
                           model=models.get(run.info.run_id))
        try:
            record.predictions  # read and checked once, here: every step after this one indexes with them
        except InputError as err:
            log(f"note: skipping {record.name} ({run.info.status}): {err}")
            continue
        records.append(record)
    if not records:
        raise InputError(f"experiment {experiment!r} has no finished trial runs with test predictions (sweep {sweep}) at {uri}")
    for record, slug in zip(records, safe_names([r.name for r in records])):
        record.slug = slug
    return records


RUN_ID = re.compile(r"[0-9a-f]{32}")


def logged_models(mlflow_client, experiment_id: str) -> dict[str, tuple[str, str]]:
    """{run id: (id, artifact location) of its newest MLflow 3 logged model} for the experiment, page after page: one
    search for every run, not two requests a run; a run with ``log_model: false`` has none."""
    models, token = {}, None
    while True:
        page = tracking.retry(lambda: mlflow_client.search_logged_models([experiment_id], order_by=[{"field_name": "creation_time", "ascending": True}],
                                                                        page_token=token))
        models.update({m.source_run_id: (m.model_id, m.artifact_location) for m in page if m.source_run_id})
        token = page.token
        if not token:
            return models


def load_model(record: RunRecord, device: str = "cpu"):
    """The run's final model, rebuilt from its config and weights (weights-only unpickling)."""
    from model_zoo import create_model

    cfg = record.config
    model = create_model(cfg["arch"], num_classes=len(record.predictions.classes), **cfg.get("model", {}))
    model.load_state_dict(record.state_dict())
    return model.to(device).eval()


def data_mismatch(record: RunRecord, labels: np.ndarray, digest: str | None) -> str | None:
    """How the test labels and the test images' SHA-256 (``digest``, None where the run logged none) loaded now, in
    prediction order, differ from what the run was tested on."""
    logged = record.predictions.labels
    if len(labels) != len(logged) or (labels != logged).any():
        differ = int((labels != logged).sum()) if len(labels) == len(logged) else "all"
        return f"its test labels differ from the logged ones ({differ} of {len(logged)})"
    if digest is not None and digest != record.test_images_sha256:
        return f"its test images differ: SHA-256 {record.test_images_sha256[:16]}... logged, {digest[:16]}... now"
    return None


def run_data(record: RunRecord):
    """The run's data set (a ``DataBundle`` on the CPU) as its logged data settings load it here, through the analyst's
    own decode cache."""
    from data_zoo import load_bundle

    data = {**record.config["data"], "cache_dir": None}  # a folder named by the store is data, not a place to write to
    try:
        return load_bundle(data)
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"the test images of run {record.name} are not readable here ({err}); "
                         f"point data.root at a copy: {data.get('root')}") from err


def logged_order(record: RunRecord, split, logged: np.ndarray, what: str) -> np.ndarray:
    """Positions in ``split`` (a ``data_zoo.Split``) of the source indices ``logged``, in their logged order."""
    position = {int(i): p for p, i in enumerate(split.index.numpy())}
    try:
        return np.array([position[int(i)] for i in logged], dtype=int)
    except KeyError as err:
        raise InputError(f"run {record.name} was {what} on image {err.args[0]}, which the data at {record.config['data'].get('root')} "
                         f"does not have") from None


def test_images(record: RunRecord, labels: bool = False, bundle=None):
    """(uint8 test images in prediction order, train mean, train std) from the run's data config (``bundle``: already
    loaded); with ``labels``, the test labels in that order after them."""
    bundle = bundle or run_data(record)
    order = logged_order(record, bundle.test, record.predictions.index, "tested")
    loaded = (bundle.test.x.numpy()[order], bundle.mean.numpy(), bundle.std.numpy())
    return (*loaded, bundle.test.y.numpy()[order]) if labels else loaded


class ImageCache:
    """Test images per data config: runs on the same data share one decode."""

    def __init__(self):
        self._cache: dict[str, tuple] = {}
        self._digests: dict[str, str] = {}  # SHA-256 of each data config's test images, computed once
        self._val: dict[str, object] = {}  # each data config's validation split (kept in the main process only: not sent to workers)

    def get(self, run: RunRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._get(run)[:3]

    def validation(self, run: RunRecord) -> np.ndarray | None:
        """The run's uint8 validation images in the order of its logged ``val_logits``; None where it logged none."""
        if run.predictions.val_index is None:
            return None
        self._get(run)
        split = self._val[self._key(run)]
        return None if split is None else split.x.numpy()[logged_order(run, split, run.predictions.val_index, "validated")]

    def _get(self, run: RunRecord) -> tuple:
        key = self._key(run)
        if key not in self._cache:
            bundle = run_data(run)
            self._cache[key], self._val[key] = test_images(run, labels=True, bundle=bundle), bundle.val
        return self._cache[key]

    @staticmethod
    def _key(run: RunRecord) -> str:
        return yaml.safe_dump(run.config["data"], sort_keys=True)

    def _digest(self, run: RunRecord) -> str:
        key = self._key(run)
        if key not in self._digests:
            self._digests[key] = tracking.images_digest(self._get(run)[0])
        return self._digests[key]

    def check(self, runs: list[RunRecord], allow_mismatch: bool = False) -> list[RunRecord]:
        """Refuse (InputError naming the run) where the data loaded now is not what a run was tested on: Grad-CAM and
        the stress tests would explain other pixels than its logged predictions; with ``allow_mismatch``, a warning.
        Returns the runs whose data matches."""
        matching = []
        for run in runs:
            labels = self._get(run)[3]
            if problem := data_mismatch(run, labels, self._digest(run) if run.test_images_sha256 else None):
                message = f"the data at {run.config['data'].get('root')} is not what run {run.name} was tested on: {problem}"
                if not allow_mismatch:
                    raise InputError(f"{message}. Point data.root at the run's data (the analysis reads each run's logged data "
                                     f"settings), or pass --allow-data-mismatch if you know why")
                log(f"warning: {message} (--allow-data-mismatch)")
            else:
                matching.append(run)
        return matching
