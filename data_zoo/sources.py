"""Data sets by name: each source decodes its images once into uint8 (N, 3, 32, 32) arrays.

Test images stay in the source's official order, so a test index names one image for good.
Sources are registered like models; ``load_images`` adds the on-disk cache.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
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


def _cifar(cls_name: str, root: str, download: bool, lock_dir: str | Path | None = None) -> ImageSet:
    import torchvision
    from filelock import FileLock

    dataset_cls = getattr(torchvision.datasets, cls_name)
    # Parallel trials race to download: a lock beside the decode cache (``lock_dir``), never in ``root``, which may be a
    # read-only shared copy that only needs reading.
    lock = Path(lock_dir or tempfile.gettempdir()) / f"{cls_name}-{hashlib.sha256(root.encode()).hexdigest()[:12]}.download.lock"
    with FileLock(str(lock)):
        try:
            if download:
                Path(root).mkdir(parents=True, exist_ok=True)
            train = dataset_cls(root, train=True, download=download)
            test = dataset_cls(root, train=False, download=download)
        except PermissionError as err:
            raise FileNotFoundError(f"{cls_name} is not complete under {root} and this user cannot write there to download it ({err}); "
                                    f"point data.root at a writable folder, or at one holding the extracted batches") from err
        except Exception as err:  # torchvision: RuntimeError when missing, URLError when the download fails
            fix = "check the network, or point data.root at a folder holding the extracted batches" if download else \
                "set data.download=true on a machine with internet, or point data.root at a folder holding the extracted batches"
            raise FileNotFoundError(f"{cls_name} not found under {root} ({err}); {fix}") from err

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)

    return ImageSet(*arrays(train), *arrays(test), list(train.classes))


def _cifar_fingerprint(folder: str) -> Callable[..., str]:
    return lambda root, **_: files_fingerprint(Path(root) / folder)


CIFAR_HINT = ("set data.download=true on a machine with internet, or point data.root at the folder holding {}/; "
              "offline, the JPEG copy loads with data.name=imagefolder")


@register_source("cifar10", fingerprint=_cifar_fingerprint("cifar-10-batches-py"), hint=CIFAR_HINT.format("cifar-10-batches-py"))
def cifar10(root: str, download: bool = False, lock_dir: str | None = None, **_) -> ImageSet:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``."""
    return _cifar("CIFAR10", root, download, lock_dir)


@register_source("cifar100", fingerprint=_cifar_fingerprint("cifar-100-python"), hint=CIFAR_HINT.format("cifar-100-python"))
def cifar100(root: str, download: bool = False, lock_dir: str | None = None, **_) -> ImageSet:
    """CIFAR-100 (fine labels) through ``torchvision.datasets.CIFAR100``."""
    return _cifar("CIFAR100", root, download, lock_dir)


# --- any train/<class>/* + test/<class>/* tree -------------------------------------------------


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's ImageFolder's


def visible(folder: Path, dirs: bool) -> list[Path]:
    """The sub-folders (or image files) of ``folder``, sorted; hidden ones (.DS_Store, .ipynb_checkpoints) and, for files,
    anything but images ignored, as torchvision's ImageFolder does."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                  (p.is_dir() if dirs else p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))


def _decode(path: Path):
    """The image at ``path`` as 32x32 RGB CHW uint8, or the reason it is not one. A JPEG must end with its end-of-image
    marker: OpenCV decodes a truncated one (grey below the cut) with only a warning."""
    import cv2

    data = path.read_bytes()
    if path.suffix.lower() in (".jpg", ".jpeg") and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR, HWC
    if image is None:
        return "not a readable image"
    if image.shape[:2] != (32, 32):
        return f"image is {image.shape[1]}x{image.shape[0]}, expected 32x32"
    return image[:, :, ::-1].transpose(2, 0, 1)


def _decode_folder(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    files = [(label, p) for label, c in enumerate(classes) for p in visible(split_dir / c, dirs=False)]
    images = np.empty((len(files), 3, 32, 32), dtype=np.uint8)
    bad = []
    for i, (_, path) in enumerate(files):
        image = _decode(path)
        if isinstance(image, str):
            bad.append(f"{path.relative_to(split_dir.parent)}: {image}")
        else:
            images[i] = image
    if bad:
        raise ValueError(f"{len(bad)} unusable image(s) under {split_dir}: {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                         "replace or remove them")
    return images, np.array([label for label, _ in files], dtype=np.int64)


@register_source("imagefolder", fingerprint=lambda root, **_: files_fingerprint(Path(root), depth=2),
                 hint="point data.root at a folder with train/<class>/* and test/<class>/* images")
def imagefolder(root: str, **_) -> ImageSet:
    """``root/train/<class>/*`` and ``root/test/<class>/*``; classes sorted, files sorted by name (hidden ones ignored)."""
    base = Path(root)
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise FileNotFoundError(f"{base / split} is missing: imagefolder expects {base}/train/<class>/* and {base}/test/<class>/*")
    classes = [p.name for p in visible(base / "train", dirs=True)]
    test_classes = [p.name for p in visible(base / "test", dirs=True)]
    if classes != test_classes:
        raise ValueError(f"{base}: train classes {classes} differ from test classes {test_classes}")
    if len(classes) < 2:
        raise ValueError(f"{base}/train has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}): a classifier needs at least two")
    empty = [f"{split}/{c}" for split in ("train", "test") for c in classes if not visible(base / split / c, dirs=False)]
    if empty:
        raise ValueError(f"{base}: no images in {', '.join(empty)}")
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
