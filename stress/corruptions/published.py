"""The published CIFAR-10-C / CIFAR-100-C arrays (Hendrycks & Dietterich, ICLR 2019), read instead of generating.

A folder holds ``<corruption>.npy`` (uint8, (5 n, H, W, 3): severity 1's n images first, each block the n test
images in the official test order) and ``labels.npy`` ((5 n,), the test labels five times). Its authors prefer
these files to corruptions generated in memory: libraries, interpolation and random draws move the numbers. Corruptions
without a file in the folder are generated (``__init__.py``), and the source of each is recorded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stress.corruptions.registry import CORRUPTIONS, SEVERITIES

LABELS = "labels.npy"


class PublishedArraysError(ValueError):
    """A published-arrays folder that cannot be used; the message names the file and what is wrong with it."""


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PublishedArraysError(f"{path}: not a readable .npy array ({err})") from None


def _arrays(folder: Path, n: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """{corruption: memory-mapped array} for every known corruption with a file, each checked for shape and dtype."""
    present = {name: folder / f"{name}.npy" for name in sorted(CORRUPTIONS) if (folder / f"{name}.npy").exists()}
    if not present:
        raise PublishedArraysError(f"{folder}: holds no <corruption>.npy of the {len(CORRUPTIONS)} known ({', '.join(sorted(CORRUPTIONS))})")
    out = {}
    for name, path in present.items():
        array, expected = _load(path), (len(SEVERITIES) * n, *image_shape, 3)
        if array.shape != expected or array.dtype != np.uint8:
            raise PublishedArraysError(f"{path}: {array.dtype} {array.shape}, expected uint8 {expected} "
                                       f"(5 severities x {n} test images, height x width x RGB)")
        out[name] = array
    return out


def _labels(folder: Path) -> np.ndarray:
    if not folder.is_dir():
        raise PublishedArraysError(f"{folder}: no such folder (the folder of CIFAR-10-C's .npy files: robustness_data in a trial, "
                                   "--corruption-data in the analysis)")
    if not (folder / LABELS).exists():
        raise PublishedArraysError(f"{folder / LABELS}: missing; the published arrays come with it (the test labels, 5 times)")
    labels = _load(folder / LABELS)
    if labels.ndim != 1 or len(labels) % len(SEVERITIES) or not np.issubdtype(labels.dtype, np.integer):
        raise PublishedArraysError(f"{folder / LABELS}: {labels.dtype} {labels.shape}, expected integers (5 n,): 5 severities x the n test images")
    return np.asarray(labels)


def check_labels(folder: str | Path) -> None:
    """Before any work: the folder is there and holds a well-formed labels.npy (PublishedArraysError otherwise)."""
    _labels(Path(folder))


def check_folder(folder: str | Path, test_labels: np.ndarray, image_shape: tuple[int, int]) -> list[str]:
    """The corruptions the folder holds, after checking every file against the whole test set (``test_labels`` in
    the official order, images ``image_shape`` = (H, W)); raises PublishedArraysError naming the first bad file."""
    folder = Path(folder)
    labels, n = _labels(folder), len(test_labels)
    if labels.shape != (len(SEVERITIES) * n,) or not (labels.reshape(len(SEVERITIES), n) == np.asarray(test_labels)).all():
        raise PublishedArraysError(f"{folder / LABELS}: does not list the {n} test labels in order, 5 times; the arrays follow the official "
                                   "test order, which the CIFAR pickles (data.name cifar10 / cifar100) keep and an image folder does not")
    return list(_arrays(folder, n, tuple(image_shape)))


def published_sets(folder: str | Path, index: np.ndarray, labels: np.ndarray, image_shape: tuple[int, int]) -> dict[tuple[str, int], np.ndarray]:
    """{(corruption, severity): uint8 (len(index), 3, H, W)} for the test images at ``index`` (positions in the
    official test order), whose own ``labels`` must agree with labels.npy there, for every corruption the folder holds."""
    folder = Path(folder)
    all_labels = _labels(folder)
    n = len(all_labels) // len(SEVERITIES)
    index = np.asarray(index)
    if index.max(initial=-1) >= n or not (all_labels[index] == labels).all():
        raise PublishedArraysError(f"{folder / LABELS}: disagrees with the test images' labels at their official positions")
    return {(name, s): np.ascontiguousarray(array[(s - 1) * n + index].transpose(0, 3, 1, 2))
            for name, array in _arrays(folder, n, tuple(image_shape)).items() for s in SEVERITIES}
