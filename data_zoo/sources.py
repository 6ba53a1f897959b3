"""Data sets by name: each source decodes its images once into uint8 (N, 3, 32, 32) arrays.

Test images stay in the source's official order, so a test index names one image for good.
Sources are registered like models; ``load_images`` adds the on-disk cache.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class ImageSet:
    """Decoded images of one data set, train and test, with their class names."""

    train_x: np.ndarray  # uint8 (N, 3, 32, 32)
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    digest: str = ""  # cache key: a digest of the source files (set by ``load_images``)


@dataclass(frozen=True)
class Source:
    """A registered data set: how to decode it and how to fingerprint its files."""

    name: str
    decode: Callable[..., ImageSet]
    fingerprint: Callable[..., str]
    hint: str = ""  # how to fix a missing data set


_SOURCES: dict[str, Source] = {}


def register_source(name: str, fingerprint: Callable[..., str], hint: str = "") -> Callable:
    """Decorator: register a decode function under ``name``."""

    def wrap(decode: Callable[..., ImageSet]) -> Callable[..., ImageSet]:
        _SOURCES[name] = Source(name, decode, fingerprint, hint)
        return decode

    return wrap


def list_datasets() -> list[str]:
    """Sorted names of every registered data set."""
    return sorted(_SOURCES)


def get_source(name: str) -> Source:
    """The source registered as ``name``; unknown names fail with the known ones."""
    if name not in _SOURCES:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    return _SOURCES[name]


def files_fingerprint(root: Path, depth: int | None = None) -> str:
    """Digest of relative path, size and mtime of every file under ``root``: changes when the source does."""
    digest, count = hashlib.sha256(), 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        if depth is not None and rel.count(os.sep) + (rel != ".") > depth:
            continue
        with os.scandir(folder) as entries:
            for entry in sorted((e for e in entries if e.is_file() and not e.name.startswith(".")), key=lambda e: e.name):
                st = entry.stat()
                digest.update(f"{rel}/{entry.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
                count += 1
    if not count:
        raise FileNotFoundError(f"no data files under {root}")
    return f"{count}:{digest.hexdigest()}"


# --- torchvision's CIFAR classes -------------------------------------------------------------


def _cifar(cls_name: str, root: str, download: bool) -> ImageSet:
    import torchvision
    from filelock import FileLock

    dataset_cls = getattr(torchvision.datasets, cls_name)
    Path(root).mkdir(parents=True, exist_ok=True)
    with FileLock(os.path.join(root, f".{cls_name}.lock")):  # parallel trials race to download
        try:
            train = dataset_cls(root, train=True, download=download)
            test = dataset_cls(root, train=False, download=download)
        except Exception as err:  # torchvision: RuntimeError when missing, URLError when the download fails
            raise FileNotFoundError(
                f"{cls_name} not found under {root} ({err}); set data.download=true on a machine with internet, "
                f"or point data.root at a folder holding the extracted batches"
            ) from err

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)

    return ImageSet(*arrays(train), *arrays(test), list(train.classes))


def _cifar_fingerprint(folder: str) -> Callable[..., str]:
    return lambda root, **_: files_fingerprint(Path(root) / folder)


CIFAR_HINT = ("set data.download=true on a machine with internet, or point data.root at the folder holding {}/; "
              "offline, the JPEG copy loads with data.name=imagefolder")


@register_source("cifar10", fingerprint=_cifar_fingerprint("cifar-10-batches-py"), hint=CIFAR_HINT.format("cifar-10-batches-py"))
def cifar10(root: str, download: bool = False, **_) -> ImageSet:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``."""
    return _cifar("CIFAR10", root, download)


@register_source("cifar100", fingerprint=_cifar_fingerprint("cifar-100-python"), hint=CIFAR_HINT.format("cifar-100-python"))
def cifar100(root: str, download: bool = False, **_) -> ImageSet:
    """CIFAR-100 (fine labels) through ``torchvision.datasets.CIFAR100``."""
    return _cifar("CIFAR100", root, download)


# --- any train/<class>/* + test/<class>/* tree -------------------------------------------------


def _decode_folder(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    files = [(label, p) for label, c in enumerate(classes) for p in sorted((split_dir / c).iterdir()) if p.is_file()]
    images = np.empty((len(files), 3, 32, 32), dtype=np.uint8)
    for i, (_, path) in enumerate(files):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR, HWC
        if image is None:
            raise ValueError(f"{path}: not a readable image")
        if image.shape[:2] != (32, 32):
            raise ValueError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected 32x32")
        images[i] = image[:, :, ::-1].transpose(2, 0, 1)
    return images, np.array([label for label, _ in files], dtype=np.int64)


@register_source("imagefolder", fingerprint=lambda root, **_: files_fingerprint(Path(root), depth=2),
                 hint="point data.root at a folder with train/<class>/* and test/<class>/* images")
def imagefolder(root: str, **_) -> ImageSet:
    """``root/train/<class>/*`` and ``root/test/<class>/*``; classes sorted, files sorted by name."""
    base = Path(root)
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise FileNotFoundError(f"{base / split} is missing: imagefolder expects {base}/train/<class>/* and {base}/test/<class>/*")
    classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in (base / "test").iterdir() if p.is_dir())
    if classes != test_classes:
        raise ValueError(f"{base}: train classes {classes} differ from test classes {test_classes}")
    return ImageSet(*_decode_folder(base / "train", classes), *_decode_folder(base / "test", classes), classes)


# --- generated, learnable ----------------------------------------------------------------------


def synthetic_images(n: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class is a bright square at a class-specific place in a class-specific colour."""
    labels = rng.integers(0, num_classes, n)
    images = rng.normal(96, 40, (n, 3, 32, 32))
    palette = np.random.default_rng(1234).uniform(0, 255, (num_classes, 3))
    corners = np.random.default_rng(4321).integers(0, 22, (num_classes, 2))
    for i, label in enumerate(labels):
        (r, c), jitter = corners[label], rng.integers(-2, 3, 2)
        r, c = np.clip([r + jitter[0], c + jitter[1]], 0, 22)
        images[i, :, r : r + 10, c : c + 10] = palette[label][:, None, None]
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


@register_source("synthetic", fingerprint=lambda root=None, num_classes=10, n_train=2000, n_test=500, **_: f"{num_classes}:{n_train}:{n_test}:v1")
def synthetic(root: str | None = None, num_classes: int = 10, n_train: int = 2000, n_test: int = 500, **_) -> ImageSet:
    """Small generated set for tests and smoke runs (fixed seed; same arrays every time)."""
    rng = np.random.default_rng(0)
    train = synthetic_images(n_train, num_classes, rng)
    test = synthetic_images(n_test, num_classes, rng)
    return ImageSet(*train, *test, [f"class{i}" for i in range(num_classes)])
