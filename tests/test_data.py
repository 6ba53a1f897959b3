"""Data sources through their real loaders, the decode cache, splits and subsets."""
import os
import time

import numpy as np
import pytest
import torch
import torchvision

from data_zoo import load_bundle, load_images, sources
from data_zoo.loader import random_balanced_subset, split_indices
from tests.conftest import write_cifar

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles_load_through_torchvision(tmp_path, monkeypatch, hundred):
    train, test = write_cifar(tmp_path, monkeypatch, hundred)
    images = load_images("cifar100" if hundred else "cifar10", str(tmp_path), cache_dir=tmp_path / "cache", download=False)
    assert images.train_x.shape == (60, 3, 32, 32) and images.train_x.dtype == np.uint8
    np.testing.assert_array_equal(images.train_x, train)  # official order kept
    np.testing.assert_array_equal(images.test_x, test)
    assert len(images.classes) == (100 if hundred else 10)
    if not hundred:
        assert images.classes == CIFAR10_CLASSES


def test_missing_cifar_without_download_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no data files under {tmp_path}"):
        load_images("cifar10", str(tmp_path), cache_dir=tmp_path / "cache", download=False)


def test_cache_decodes_once_and_notices_a_changed_source(tmp_path, monkeypatch):
    write_cifar(tmp_path, monkeypatch, hundred=False)
    calls = []
    real = sources.get_source("cifar10").decode
    monkeypatch.setitem(sources._SOURCES, "cifar10", sources.Source("cifar10", lambda **kw: calls.append(1) or real(**kw), sources.get_source("cifar10").fingerprint))
    for _ in range(2):
        load_images("cifar10", str(tmp_path), cache_dir=tmp_path / "cache", download=False)
    assert len(calls) == 1
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    os.utime(batch, ns=(time.time_ns(), time.time_ns() + 10**9))  # the source changed
    load_images("cifar10", str(tmp_path), cache_dir=tmp_path / "cache", download=False)
    assert len(calls) == 2


def test_corrupt_cache_names_the_file(tmp_path):
    load_images("synthetic", cache_dir=tmp_path, n_train=50, n_test=10)
    (npz,) = tmp_path.glob("*.npz")
    npz.write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match=f"corrupt data cache {npz}.*delete it"):
        load_images("synthetic", cache_dir=tmp_path, n_train=50, n_test=10)


def test_imagefolder_reads_sorted_classes_and_files(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for split in ("train", "test"):
        for c in ("b_class", "a_class"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                img = torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))
                torchvision.io.write_png(img, str(tmp_path / split / c / f"{i:04d}.png"))
                expected[(split, c, i)] = img.numpy()
    images = load_images("imagefolder", str(tmp_path), cache_dir=tmp_path / "cache")
    assert images.classes == ["a_class", "b_class"]
    assert images.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(images.test_x[4], expected[("test", "b_class", 1)])


def test_synthetic_is_deterministic_and_learnable_by_pattern():
    a, b = sources.synthetic(n_train=200, n_test=50), sources.synthetic(n_train=200, n_test=50)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    # The class pattern is visible: per-class mean images differ clearly.
    means = np.stack([a.train_x[a.train_y == c].mean(0) for c in range(10)])
    assert np.abs(means[0] - means[1]).max() > 50


def test_split_is_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    train, val = split_indices(labels, 0.2, seed=0)
    assert len(val) == 200 and np.bincount(labels[val]).tolist() == [20] * 10
    assert not set(train) & set(val) and len(train) + len(val) == 1000
    again, _ = split_indices(labels, 0.2, seed=0)
    other, _ = split_indices(labels, 0.2, seed=1)
    assert (train == again).all() and not np.array_equal(train, other)


def test_balanced_subset():
    labels = np.repeat(np.arange(10), 100)
    subset = random_balanced_subset(np.arange(1000), labels, 50, seed=0)
    assert np.bincount(labels[subset]).tolist() == [5] * 10


def test_bundle_keeps_test_indices_and_uses_train_statistics():
    bundle = load_bundle({"name": "synthetic", "n_train": 300, "n_test": 100, "val_fraction": 0.1, "subset": 100, "test_subset": 50})
    assert len(bundle.train) == 100 and len(bundle.val) == 10 and len(bundle.test) == 50  # val: val_fraction of the subset
    images = sources.synthetic(n_train=300, n_test=100)
    idx = bundle.test.index.numpy()
    np.testing.assert_array_equal(bundle.test.x.numpy(), images.test_x[idx])  # index names the image
    expected_mean = images.train_x[bundle.train.index.numpy()].astype(float).mean(axis=(0, 2, 3)) / 255
    np.testing.assert_allclose(bundle.mean.numpy(), expected_mean, atol=1e-5)
    expected_std = images.train_x[bundle.train.index.numpy()].astype(float).std(axis=(0, 2, 3)) / 255  # numpy's, population std
    np.testing.assert_allclose(bundle.std.numpy(), expected_std, rtol=1e-3)


def test_shared_cifar10_jpeg_set(shared_jpeg, tmp_path):
    images = load_images("imagefolder", str(shared_jpeg), cache_dir=tmp_path)
    assert images.train_x.shape == (50_000, 3, 32, 32) and images.test_x.shape == (10_000, 3, 32, 32)
    assert images.classes == CIFAR10_CLASSES
    assert np.bincount(images.test_y).tolist() == [1000] * 10
    # The statistics the trials normalise with, against CIFAR-10's published training-set figures (the JPEG copy
    # differs from the original PNGs by its compression only): not pytorch-cifar's wrong std (0.2023, 0.1994, 0.2010).
    bundle = load_bundle({"name": "imagefolder", "root": str(shared_jpeg), "cache_dir": str(tmp_path), "val_fraction": 0.0})
    np.testing.assert_allclose(bundle.mean.numpy(), [0.4914, 0.4822, 0.4465], atol=0.01)
    np.testing.assert_allclose(bundle.std.numpy(), [0.2470, 0.2435, 0.2616], atol=0.01)
