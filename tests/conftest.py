"""Shared fixtures: tiny synthetic experiment files, CIFAR-format pickles, an isolated cache."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_JPEG_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

TINY = {
    "arch": "plain_cnn",
    "model": {"widths": [8, 16, 16]},
    "epochs": 2,
    "batch_size": 64,
    "eval_batch_size": 256,
    "schedule": {"name": "onecycle"},
    "optimizer": {"lr": 0.05},
    "data": {"name": "synthetic", "n_train": 400, "n_test": 120, "val_fraction": 0.2},
    "resources": {"cpu": 1},
    "max_failures": 0,
    "log_model": False,  # the pt2 export (3 s a trial): on only where a test reads the logged model
}


# Set before anything starts Ray, so the trial workers inherit them: the tests decode into their own
# cache (never the user's), send no usage stats, listen on loopback, and sample system metrics often (tiny trials last seconds).
os.environ["STRESSLAB_CACHE"] = tempfile.mkdtemp(prefix="stresslab-test-cache-")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the tests' own Ray binds to loopback, as sweep.py's local one does
os.environ["STRESSLAB_SYSTEM_METRICS_INTERVAL"] = "1"


def write_experiments(path: Path, experiments: dict, defaults: dict | None = None) -> Path:
    """An experiments.yaml with TINY defaults (plus ``defaults``) and the given experiments."""
    path.write_text(yaml.safe_dump({"defaults": {**TINY, **(defaults or {})}, "experiments": experiments}))
    return path


def _pickle(path: Path, obj: dict) -> str:
    path.write_bytes(pickle.dumps(obj))
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, monkeypatch, hundred: bool, n_train: int = 60, n_test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 python-format batches under ``root``; torchvision's md5 table is pointed at them."""
    import torchvision

    rng = np.random.default_rng(0)
    k = 100 if hundred else 10
    train = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), rng.integers(0, k, n_train).tolist()
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, k, n_test).tolist()
    label_key = "fine_labels" if hundred else "labels"
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    if hundred:
        train_list = [["train", _pickle(folder / "train", {"data": train[0], label_key: train[1]})]]
        test_list = [["test", _pickle(folder / "test", {"data": test[0], label_key: test[1]})]]
        meta = {"filename": "meta", "key": "fine_label_names", "md5": _pickle(folder / "meta", {"fine_label_names": [f"c{i:02d}" for i in range(k)]})}
    else:
        chunks = np.array_split(np.arange(n_train), 5)
        train_list = [[f"data_batch_{i + 1}", _pickle(folder / f"data_batch_{i + 1}", {"data": train[0][c], label_key: [train[1][j] for j in c]})] for i, c in enumerate(chunks)]
        test_list = [["test_batch", _pickle(folder / "test_batch", {"data": test[0], label_key: test[1]})]]
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": _pickle(folder / "batches.meta", {"label_names": names})}
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", meta)
    return train[0].reshape(-1, 3, 32, 32), test[0].reshape(-1, 3, 32, 32)


OUTPUT_FOLDERS = ("ray_results", "mlruns", "reports", ".slurm", "data")  # the product's default outputs in the checkout


def _outputs() -> set[Path]:
    return {path for name in OUTPUT_FOLDERS for path in [ROOT / name, *(ROOT / name).glob("*")] if path.exists()}


@pytest.fixture(scope="session", autouse=True)
def checkout_left_alone():
    """Every test writes under its own temp dirs: the suite adds nothing to the checkout's default output folders (a
    user's sweeps live there)."""
    before = _outputs()
    yield
    added = sorted(str(path.relative_to(ROOT)) for path in _outputs() - before)
    assert not added, f"the suite wrote into the checkout: {added}"


@pytest.fixture(scope="session")
def shared_jpeg(tmp_path_factory) -> Path:
    """The shared real CIFAR-10 JPEG set, unpacked once per session (skipped where absent). GNU tar, as the README's
    command: 4 s for the 60,000 files, where Python's tarfile takes 55 s."""
    import subprocess

    if not SHARED_JPEG_TAR.exists():
        pytest.skip(f"{SHARED_JPEG_TAR} not present")
    out = tmp_path_factory.mktemp("jpeg")
    subprocess.run(["tar", "xzf", str(SHARED_JPEG_TAR), "-C", str(out), "--no-same-owner"], check=True)
    return out / "cifar10-jpeg"


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory):
    """A 4-trial sweep (2 models x 2 seeds) on synthetic data, run once for the session."""
    import mlflow

    import sweep

    tmp = tmp_path_factory.mktemp("sweep")
    path = write_experiments(tmp / "experiments.yaml", {"tiny": {"description": "tiny test sweep", "log_model": True, "grid": {"arch": ["plain_cnn", "residual_cnn"], "seed": [1, 2]}}})
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    argv = ["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(tmp / "ray")]
    assert sweep.main(argv) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    return {"argv": argv, "uri": uri, "runs": runs, "tmp": tmp}


FAULT_SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter):
    """One line per injected fault: what was done, how many trials it hit, how many results were lost."""
    if FAULT_SUMMARY:
        terminalreporter.section("fault injection summary")
        for line in FAULT_SUMMARY:
            terminalreporter.write_line(line)


@contextlib.contextmanager
def mlflow_service(command: str, uri: str, artifacts: Path | None = None):
    """``mlflow ui`` or ``mlflow server`` on the store ``uri`` (artifacts proxied into ``artifacts`` if given), on a free
    127.0.0.1 port, in its own process group; yields its base URL."""
    from bench.servers import Server, mlflow_servers

    extra = ["--artifacts-destination", str(artifacts)] if artifacts else []
    with mlflow_servers(Server([command, "--backend-store-uri", uri, *extra])) as (base,):
        yield base


def copy_store(source: Path, store: Path) -> dict[str, tuple[str, Path]]:
    """A copy of the SQLite store folder ``source`` (database and artifacts) at ``store``, its runs pointing at the copy's
    artifacts; returns {trial run name: (run id, artifact folder)}, for tests that tamper with a store."""
    import shutil
    import sqlite3

    import tracking

    shutil.copytree(source, store)
    with sqlite3.connect(store / "mlflow.db") as db:
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(source), str(store)))
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (str(source), str(store)))
        rows = db.execute("SELECT r.name, r.run_uuid, r.artifact_uri FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                          "WHERE t.key = ? AND t.value = 'trial'", (tracking.KIND_TAG,)).fetchall()
    return {name: (run_id, Path(uri.removeprefix("file://"))) for name, run_id, uri in rows}
