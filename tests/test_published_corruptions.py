"""The published CIFAR-10-C arrays: read instead of generating, by a sweep's trial-end test and by the analysis, with
the source recorded; a misshapen or missing file refused before anything starts, naming it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest

import sweep
from analysis.__main__ import main as analysis_main
from stress.corruptions import CORRUPTIONS, SEVERITIES, corrupted_sets, first_per_class
from stress.corruptions.published import PublishedArraysError, check_folder, published_sets
from tests.conftest import write_cifar, write_experiments
from tracking import metrics

READ = ("fog", "glass_blur")


def write_published(folder, test_x: np.ndarray, test_y: np.ndarray, images=None) -> None:
    """CIFAR-10-C's format for READ: (5 n, 32, 32, 3) uint8, severity by severity in test order; labels.npy (5 n,)."""
    folder.mkdir(parents=True, exist_ok=True)
    hwc = test_x.transpose(0, 2, 3, 1)
    for name in READ:
        np.save(folder / f"{name}.npy", np.concatenate([hwc] * 5) if images is None else images)
    np.save(folder / "labels.npy", np.tile(test_y, 5))


def test_rows_are_picked_by_severity_and_official_index(tmp_path):
    n = 12
    x = np.zeros((n, 3, 32, 32), np.uint8)
    rows = np.broadcast_to(np.arange(5 * n, dtype=np.uint8)[:, None, None, None], (5 * n, 32, 32, 3))  # each row holds its number
    labels = np.arange(n) % 3
    write_published(tmp_path, x, labels, images=rows)
    assert check_folder(tmp_path, labels, (32, 32)) == ["fog", "glass_blur"]
    sets = published_sets(tmp_path, np.array([3, 7]), labels[[3, 7]], (32, 32))
    assert sorted(sets) == sorted((name, s) for name in READ for s in SEVERITIES)
    assert sets["fog", 2].shape == (2, 3, 32, 32) and (sets["fog", 2][0] == n + 3).all() and (sets["glass_blur", 5][1] == 4 * n + 7).all()
    mixed = {(name, s): images for name, s, images in corrupted_sets(x[[3, 7]], published=sets)}
    assert len(mixed) == 19 * 5 and mixed["fog", 2] is sets["fog", 2]
    generated = {(name, s): images for name, s, images in corrupted_sets(x[[3, 7]])}
    assert all(np.array_equal(mixed[k], generated[k]) for k in mixed if k[0] not in READ)
    with pytest.raises(PublishedArraysError, match="disagrees with the test images' labels"):
        published_sets(tmp_path, np.array([3, 7]), np.array([0, 0]), (32, 32))


@pytest.mark.parametrize("damage, named", [
    (lambda f: np.save(f / "fog.npy", np.zeros((60, 32, 32), np.uint8)), "fog.npy: uint8 (60, 32, 32), expected uint8 (60, 32, 32, 3)"),
    (lambda f: np.save(f / "fog.npy", np.zeros((55, 32, 32, 3), np.uint8)), "fog.npy: uint8 (55, 32, 32, 3), expected uint8 (60, 32, 32, 3)"),
    (lambda f: np.save(f / "glass_blur.npy", np.zeros((60, 32, 32, 3), np.float32)), "glass_blur.npy: float32"),
    (lambda f: (f / "fog.npy").write_bytes(b"not numpy"), "fog.npy: not a readable .npy array"),
    (lambda f: (f / "labels.npy").unlink(), "labels.npy: missing"),
    (lambda f: np.save(f / "labels.npy", np.zeros(60, np.int64)), "labels.npy: does not list the 12 test labels in order"),
])
def test_a_bad_file_is_named(tmp_path, damage, named):
    labels = np.arange(12) % 3
    write_published(tmp_path, np.zeros((12, 3, 32, 32), np.uint8), labels)
    damage(tmp_path)
    with pytest.raises(PublishedArraysError) as err:
        check_folder(tmp_path, labels, (32, 32))
    assert named in str(err.value) and str(tmp_path) in str(err.value)


def test_a_sweep_and_the_analysis_read_the_published_arrays(tmp_path, monkeypatch, capsys):
    """The published fog and glass blur hold the clean test images, so their accuracy at every severity is the clean
    accuracy exactly, in the trial and in the analysis; the other 17 are generated, and the source says which."""
    _, test_x = write_cifar(tmp_path / "cifar", monkeypatch, hundred=False, n_train=200, n_test=40)
    test_y = np.array(__import__("pickle").loads((tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").read_bytes())["labels"])
    write_published(tmp_path / "c10c", test_x, test_y)
    # The driver decodes the pickles (torchvision's md5 table patched here) into the cache the trials read: data.cache_dir,
    # which travels with the config to Ray workers that may have started before this test.
    data = {"name": "cifar10", "root": str(tmp_path / "cifar"), "cache_dir": str(tmp_path / "cache"), "download": False, "val_fraction": 0.2}
    path = write_experiments(tmp_path / "e.yaml", {"pub": {"epochs": 1, "data": data, "robustness": True, "robustness_images": 40,
                                                           "robustness_data": str(tmp_path / "c10c")}})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    argv = ["--config", str(path), "--experiment", "pub", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]
    assert sweep.main(argv) == 0
    assert "corruptions: 2 read from the published arrays in" in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("pub").experiment_id], "tags.`stresslab.kind` = 'trial'")[0]
    trial = json.loads(open(client.download_artifacts(run.info.run_id, "robustness.json", str(tmp_path))).read())
    assert trial["source"]["published"] == list(READ) and trial["source"]["kind"] == "mixed"
    assert trial["source"]["published_folder"] == str(tmp_path / "c10c") and len(trial["source"]["generated"]) == 17
    stored = Path(trial["cache"]["folder"])  # the 17 generated corruptions' sets, stored in the data cache for later trials
    assert trial["cache"]["read"] == 0 and trial["cache"]["stored"] == 85 and stored.parent == tmp_path / "cache" / "corruptions"
    assert len(list(stored.glob("*.npy"))) == 85
    assert sweep.main(argv) == 0  # a second launch: its trial reads every generated set instead of generating it
    again = client.search_runs([client.get_experiment_by_name("pub").experiment_id], "tags.`stresslab.kind` = 'trial'", order_by=["start_time DESC"])[0]
    second = json.loads(open(client.download_artifacts(again.info.run_id, "robustness.json", str(tmp_path / "second"))).read())
    assert second["cache"] == {"folder": str(stored), "read": 85, "stored": 0} and second["accuracy"] == trial["accuracy"]

    out = tmp_path / "report"
    analyse = ["--experiment", "pub", "--tracking-uri", uri, "--out", str(out), "--no-log", "--adversarial-images", "0", "--road-images", "2",
               "--max-cams", "2", "--workers", "1"]
    capsys.readouterr()
    trials_cache = sorted((tmp_path / "cache").rglob("*"))
    assert analysis_main(analyse + ["--corruption-images", "20"]) == 0  # another subset: measured by the analysis, from the trials' folder
    logged = capsys.readouterr().out  # another subset, another key; stored in the analyst's cache, not in the one the store names
    assert f"corrupted sets: 0 read from the cache, 85 generated and stored ({os.environ['STRESSLAB_CACHE']}/corruptions/" in logged
    assert sorted((tmp_path / "cache").rglob("*")) == trials_cache
    report = json.loads((out / "robustness.json").read_text())
    measured = report["runs"][run.info.run_name]
    assert measured["measured"] == "analysis" and measured["source"]["published"] == list(READ)
    predictions = np.load(client.download_artifacts(run.info.run_id, metrics.PREDICTIONS_FILE, str(tmp_path)))
    pos = first_per_class(predictions["labels"], 10, 40)
    clean = float((predictions["preds"][pos] == predictions["labels"][pos]).mean())
    for name in READ:  # the clean images at every severity: the clean accuracy, exactly
        assert measured["accuracy"][name] == [measured["clean"]] * 5 and trial["accuracy"][name] == [clean] * 5, name
    assert set(CORRUPTIONS) == set(measured["accuracy"]) == set(trial["accuracy"])
    html = (out / "report.html").read_text()
    assert "RobustBench" in html and "73.46" in html and "mixed" in html

    np.save(tmp_path / "c10c" / "fog.npy", np.zeros((199, 32, 32, 3), np.uint8))  # misshapen: 199 rows for 5 x 40
    named = f"{tmp_path / 'c10c' / 'fog.npy'}: uint8 (199, 32, 32, 3), expected uint8 (200, 32, 32, 3)"
    capsys.readouterr()
    assert analysis_main(analyse + ["--corruption-images", "10"]) == 2
    assert named in capsys.readouterr().err
    assert sweep.main(argv) == 2
    assert named in capsys.readouterr().err
    assert len(client.search_runs([client.get_experiment_by_name("pub").experiment_id], "tags.`stresslab.kind` = 'trial'")) == 2  # none started
