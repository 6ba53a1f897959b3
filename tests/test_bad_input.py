"""Bad input through the CLIs: each case exits 2 in seconds naming the setting, file or URI, with no traceback and no
MLflow run; folders as people have them (hidden files, read-only copies) train normally."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from launch.data_check import prepare_data
import sweep
from analysis.__main__ import main as analysis_main
from bench.servers import free_port
from config.errors import InputError
from config.schema import resolve
from tests.conftest import write_cifar, write_experiments


def image_folder(root: Path, classes=("cat", "dog", "ship"), per_class: int = 8) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg of random 32x32 images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                cv2.imwrite(str(root / split / c / f"{i:03d}.jpg"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


def refused(tmp_path, capsys, argv: list[str], main=sweep.main) -> str:
    """Run a CLI; assert exit 2 within 30 s, no traceback, no MLflow store made; return its stderr."""
    start = time.monotonic()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 30, err
    assert "Traceback" not in err and not (tmp_path / "mlruns" / "mlflow.db").exists()  # no store, so no run
    return err


def sweep_argv(tmp_path, *sets: str, uri: str | None = None) -> list[str]:
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 1}})
    argv = ["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri or f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
            "--storage", str(tmp_path / "ray")]
    return argv + [arg for s in sets for arg in ("--set", s)]


def test_the_analysis_answers_help_and_refuses_a_bad_flag_before_loading_torch_grad_cam_or_matplotlib():
    """They load the analysis' models and figures (8-10 s on 2 cores): --help and a refused flag must not wait for them."""
    import sys

    probe = ("import sys\nfrom analysis.__main__ import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('exit', code, 'loaded', sorted(m for m in ('torch', 'matplotlib', 'pytorch_grad_cam') if m in sys.modules))")
    for argv, code in ((["--help"], 0), (["--experiment", "x", "--baseline", "augment=none"], 2), (["--experiment", "x", "--threshold", "1.5"], 2),
                       (["--experiment", "x", "--max-cams", "-1"], 2), (["--experiment", "x", "--pgd-step-size", "0"], 2),
                       (["--experiment", "x", "--classes", ","], 2)):
        out = subprocess.run([sys.executable, "-c", probe, *argv], cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().endswith(f"exit {code} loaded []"), out.stdout[-500:] + out.stderr[-2000:]
        assert code == 0 or "error: --" in out.stderr, out.stderr


@pytest.mark.parametrize("flags, message", [
    (["--baseline", "arch=plain_cnn", "--variant", "arch=vgg"], "--variant arch=vgg: no run has it; arch takes plain_cnn, residual_cnn in this sweep"),
    (["--baseline", "archh=plain_cnn", "--variant", "archh=residual_cnn"], "no run logs a param 'archh'; the params are: adversarial,"),
    (["--baseline", "arch=plain_cnn", "--variant", "seed=2"], "--baseline and --variant must select the same setting, got 'arch' and 'seed'"),
    (["--classes", "class1,cat"], "--classes: 'cat' not a class of this data set; its classes: class0, class1,"),
    (["--corruption-data", "{tmp}/no-such-folder"], "{tmp}/no-such-folder: no such folder"),
])
def test_analysis_choices_that_match_nothing_are_refused_before_any_run_is_analysed(finished_sweep, tmp_path, capsys, flags, message):
    out = tmp_path / "report"
    argv = ["--experiment", "tiny", "--tracking-uri", finished_sweep["uri"], "--out", str(out), "--no-log"]
    err = refused(tmp_path, capsys, argv + [f.format(tmp=tmp_path) for f in flags], main=analysis_main)
    assert message.format(tmp=tmp_path) in err
    assert not (out / "runs").exists() and not (out / "label_issues.json").exists()  # nothing analysed


def test_a_download_that_fails_leaves_no_folder_behind_and_keeps_what_was_there(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)  # what torchvision's download calls, after making its folder
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 1}})
    for root in (tmp_path / "typo" / "cifar", tmp_path / "kept" / "cifar"):
        if root.parent.name == "kept":
            (root / "notes").mkdir(parents=True)
            (root / "notes" / "README").write_text("mine")
        _, cfg = resolve(path, "tiny", ["data.name=cifar10", f"data.root={root}", "data.download=true"])
        with pytest.raises(InputError, match=f"data set 'cifar10' is not usable at {root}"):
            prepare_data(cfg, log=lambda *_: None)
    assert not (tmp_path / "typo").exists()  # made by the download, removed with it
    assert (tmp_path / "kept" / "cifar" / "notes" / "README").read_text() == "mine"


def test_a_subset_below_the_number_of_classes_is_refused_with_the_setting_that_works(tmp_path, capsys):
    err = refused(tmp_path, capsys, sweep_argv(tmp_path, "data.subset=5"))
    assert "data.subset 5 is below the number of classes (10): 0 images per class; use --set data.subset=100" in err
    err = refused(tmp_path, capsys, sweep_argv(tmp_path, "data.num_classes=1"))
    assert "1 class: a classifier needs at least two" in err


def test_a_truncated_jpeg_and_a_one_class_folder_are_refused_naming_them(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    for name in ("001.jpg", "002.jpg"):
        path = root / "train" / "dog" / name
        path.write_bytes(path.read_bytes()[:-200])  # cut short, as an interrupted copy leaves it
    err = refused(tmp_path, capsys, sweep_argv(tmp_path, "data.name=imagefolder", f"data.root={root}"))
    assert "2 unusable image(s)" in err and "train/dog/001.jpg: truncated JPEG" in err and "train/dog/002.jpg" in err
    one = image_folder(tmp_path / "one", classes=("cat",))
    err = refused(tmp_path, capsys, sweep_argv(tmp_path, "data.name=imagefolder", f"data.root={one}"))
    assert f"{one}/train has 1 class folder(s) (cat): a classifier needs at least two" in err


def test_a_dead_tracking_server_and_a_mistyped_store_are_refused_in_seconds_naming_the_uri(tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    err = refused(tmp_path, capsys, sweep_argv(tmp_path, uri=dead))
    assert f"the MLflow tracking server {dead} does not answer" in err
    for flag in ("--rerun-best", "--register-best"):
        err = refused(tmp_path, capsys, sweep_argv(tmp_path, uri=dead) + ([flag] if flag == "--rerun-best" else [flag, "m"]))
        assert f"{dead} does not answer" in err
    err = refused(tmp_path, capsys, ["--experiment", "tiny", "--tracking-uri", dead, "--out", str(tmp_path / "out")], main=analysis_main)
    assert f"{dead} does not answer" in err
    typo = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlruns' / 'mlflow.db'}"
    err = refused(tmp_path, capsys, sweep_argv(tmp_path, uri=typo))
    assert f"the MLflow store {typo} would be created in" in err and "whose parent folder does not exist" in err
    assert not (tmp_path / "no-such-folder").exists()


@pytest.mark.parametrize("kind", ["file", "folder", "sqlite-in-memory", "ftp", "database"])
def test_a_tracking_uri_that_names_no_usable_store_is_refused_with_the_kinds_that_are(tmp_path, capsys, kind):
    uri = {"file": (tmp_path / "store").as_uri(), "folder": str(tmp_path / "mlruns"), "sqlite-in-memory": "sqlite://",
           "ftp": "ftp://127.0.0.1/mlruns", "database": "postgresql://user@127.0.0.1:5432/mlflow"}[kind]
    for argv, main in ((sweep_argv(tmp_path, uri=uri), sweep.main), (sweep_argv(tmp_path, uri=uri) + ["--rerun-best"], sweep.main),
                       (["--experiment", "tiny", "--tracking-uri", uri, "--out", str(tmp_path / "out")], analysis_main)):
        err = refused(tmp_path, capsys, argv, main=main)
        assert f"the tracking URI {uri!r} is not a store stresslab logs to" in err and "an MLflow server (http://host:5000" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlruns").exists()


@contextlib.contextmanager
def read_only(source: Path, target: Path):
    """``source`` seen read-only at ``target`` (a bind mount: root, which tests run as in CI, ignores file modes)."""
    target.mkdir(parents=True)
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True).returncode == 0
    if not mounted:
        subprocess.run(["umount", str(target)], capture_output=True)
        if os.getuid() == 0:
            pytest.skip("cannot bind-mount read-only here")
        os.chmod(source, 0o555)  # a user other than root is held to the modes
    try:
        with pytest.raises(OSError):
            (target / "probe").write_text("")
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True) if mounted else os.chmod(source, 0o755)


def test_a_read_only_cifar_copy_is_used_as_it_is(tmp_path, monkeypatch):
    """The README's /shared/cifar10: complete, and not writable by its users. No lock or download is attempted there,
    with download true (the default) or false."""
    write_cifar(tmp_path / "cifar", monkeypatch, hundred=False)
    monkeypatch.setenv("STRESSLAB_CACHE", str(tmp_path / "cache"))
    path = write_experiments(tmp_path / "e.yaml", {"tiny": {}})
    with read_only(tmp_path / "cifar", tmp_path / "shared-cifar") as root:
        for download in ("true", "false"):
            _, cfg = resolve(path, "tiny", ["data.name=cifar10", f"data.root={root}", f"data.download={download}"])
            prepare_data(cfg, log=lambda *_: None)


def test_hidden_files_and_folders_are_ignored_and_a_read_only_folder_trains(tmp_path, capsys):
    import mlflow

    from data_zoo import load_images

    root = image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # what Finder leaves
    (root / "test" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # what Jupyter leaves: not a class
    (root / "test" / ".ipynb_checkpoints").mkdir()
    images = load_images("imagefolder", str(root), tmp_path / "cache")
    assert images.classes == ["cat", "dog", "ship"] and len(images.train_y) == len(images.test_y) == 24
    with read_only(root, tmp_path / "ro") as ro:
        path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 1, "data": {"name": "imagefolder", "val_fraction": 0.25},
                                                                "grid": {"data.root": [str(root), str(ro)]}}})
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
        assert sweep.main(["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
        # The data changed after the sweep: one test image rewritten. The analysis refuses, naming the run and both digests.
        cv2.imwrite(str(root / "test" / "dog" / "003.jpg"), np.full((32, 32, 3), 7, np.uint8))
        analyse = ["--experiment", "tiny", "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--no-log", "--corruption-images", "0",
                   "--adversarial-images", "0", "--road-images", "2", "--max-cams", "2", "--workers", "1"]
        capsys.readouterr()
        assert analysis_main(analyse) == 2
        err = capsys.readouterr().err
        assert "is not what run plain_cnn-none-s42-" in err and "its test images differ: SHA-256" in err and "--allow-data-mismatch" in err
        assert analysis_main(analyse + ["--allow-data-mismatch"]) == 0
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("tiny").experiment_id],
                                                "tags.`stresslab.kind` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == ["plain_cnn-none-s42-imgs", "plain_cnn-none-s42-ro"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_store_with_more_runs_than_a_page_gives_the_newest_sweep_and_every_run_of_it(tmp_path, monkeypatch):
    """Runs made directly (no training), a page of 4: the older sweep's 9 runs fill the first pages of a search sorted
    by start time; the newest sweep's 6 come after them."""
    from tracking import metrics
    import tracking
    from analysis.runs import find_runs

    monkeypatch.setattr(tracking.store, "PAGE_SIZE", 4)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, "paged", "", uri)
    files = tmp_path / "files"
    files.mkdir()
    np.savez(files / metrics.PREDICTIONS_FILE, probs=np.full((2, 2), 0.5), labels=np.array([0, 1]), index=np.array([0, 1]), classes=np.array(["a", "b"]))
    (files / metrics.CONFIG_FILE).write_text("arch: plain_cnn\n")
    for sweep_id, count in (("paged-20260101-000000", 9), ("paged-20260102-000000", 6)):
        for i in range(count):
            run = client.create_run(experiment, run_name=f"{sweep_id}-{i}", tags={tracking.KIND_TAG: "trial", tracking.SWEEP_TAG: sweep_id})
            client.log_artifact(run.info.run_id, str(files / metrics.PREDICTIONS_FILE))
            client.log_artifact(run.info.run_id, str(files / metrics.CONFIG_FILE))
            client.set_terminated(run.info.run_id)
    newest = find_runs("paged", uri, "latest", log=lambda *_: None)
    assert sorted(r.name for r in newest) == [f"paged-20260102-000000-{i}" for i in range(6)]
    assert len(find_runs("paged", uri, "all", log=lambda *_: None)) == 15
    assert len(tracking.search_all(client, [experiment], f"tags.`{tracking.SWEEP_TAG}` = 'paged-20260101-000000'")) == 9


def test_a_full_artifact_disk_mid_sweep_ends_every_run_failed_with_the_cause(tmp_path, monkeypatch):
    """The store's artifact folder on a 4 MB tmpfs, filled once the first epoch is logged: every trial's end (weights,
    predictions) hits ENOSPC. Every run ends FAILED or KILLED with the folder named, none RUNNING."""
    import threading

    import mlflow

    artifacts = tmp_path / "mlruns" / "artifacts"
    artifacts.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(artifacts)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setenv("STRESSLAB_MIN_FREE_MB", "1")  # the 4 MB folder passes the probe before the sweep
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
        path = write_experiments(tmp_path / "e.yaml", {"tiny": {"epochs": 3, "grid": {"seed": [1, 2]}}})
        filled = threading.Event()

        def fill_after_first_epoch() -> None:
            deadline = time.time() + 240
            while time.time() < deadline:
                try:
                    client = mlflow.MlflowClient(uri)
                    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "metrics.epoch >= 1")
                except Exception:
                    runs = []
                if runs:
                    with contextlib.suppress(OSError), open(artifacts / "filler", "wb") as f:
                        while True:
                            f.write(b"\0" * 65536)
                    filled.set()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=fill_after_first_epoch, daemon=True)
        watcher.start()
        code = sweep.main(["--config", str(path), "--experiment", "tiny", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
        watcher.join(timeout=5)
        assert filled.is_set() and code == 1
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        trials = [r for r in runs if r.data.tags.get("stresslab.kind") == "trial"]
        assert len(trials) == 2 and {r.info.status for r in runs} <= {"FAILED", "KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
        for run in trials:
            assert "cannot store the run's artifacts in" in run.data.tags["error"] and "No space left on device" in run.data.tags["error"]
    finally:
        subprocess.run(["umount", "-l", str(artifacts)], capture_output=True)


def test_a_read_only_artifact_folder_and_a_uri_storage_are_refused_before_anything_starts(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with read_only(tmp_path / "empty", tmp_path / "mlruns" / "artifacts") as artifacts:
        start = time.monotonic()
        assert sweep.main(sweep_argv(tmp_path)) == 2
        err = capsys.readouterr().err
        assert f"cannot write to {artifacts}" in err and time.monotonic() - start < 30 and not (tmp_path / "mlruns" / "mlflow.db").exists()
    argv = sweep_argv(tmp_path)
    argv[argv.index("--storage") + 1] = "s3://bucket/ray_results"
    err = refused(tmp_path, capsys, argv)
    assert "--storage s3://bucket/ray_results: a URI" in err and not Path("s3:").exists()
