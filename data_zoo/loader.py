"""From decoded images to device-resident batches: split, subset, normalise, augment, iterate.

The whole (train, val, test) set lives on the training device as uint8; each batch is converted,
normalised and augmented there. No DataLoader, no worker processes: in-memory tensors need none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from data_zoo.augment import Augmenter
from data_zoo.cache import load_images


@dataclass
class Split:
    """uint8 images, int64 labels and each image's index in its source split, on one device."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    """Train/val/test splits with the normalisation statistics of the training images, all on one device."""

    train: Split
    val: Split | None
    test: Split
    classes: list[str]
    mean: torch.Tensor  # per channel, in [0, 1]
    std: torch.Tensor
    digest: str = ""  # of the source files, so runs on different data are never compared by mistake

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, standardised per channel."""
        return normalise(x, self.mean, self.std)

    def black(self) -> torch.Tensor:
        """Normalised value of a black pixel (crop's zero padding)."""
        return -self.mean / self.std


def standardise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Pixels in [0, 1] (N, C, H, W) -> the model's input: standardised per channel by the training set's mean and std.
    The one definition of the model's input; attacks work in pixel space and call it inside the attacked function."""
    return (x - _per_channel(mean, x)) / _per_channel(std, x)


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    """(C,) statistics shaped (1, C, 1, 1) as ``like``'s dtype and device (no copy where they are already: a training
    step moves nothing between host and device)."""
    if not isinstance(values, torch.Tensor) or values.dtype != like.dtype or values.device != like.device:
        values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return values.view(1, -1, 1, 1)


def normalise(images, mean, std) -> torch.Tensor:
    """uint8 images (N, C, H, W; a tensor or an array) -> the model's input."""
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return standardise(images.float() / 255.0, mean, std)


def channel_stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] of a uint8 (N, 3, H, W) array."""
    t = torch.from_numpy(x).float().div_(255.0)
    return t.mean(dim=(0, 2, 3)), t.std(dim=(0, 2, 3))


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified (train, val) index arrays; val is empty when the fraction is 0."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(members) * val_fraction))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def random_balanced_subset(indices: np.ndarray, labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Seeded subset of ``indices`` with (as near as possible) ``size / num_classes`` per class."""
    rng = np.random.default_rng(seed + 1)
    classes = np.unique(labels[indices])
    per_class = size // len(classes)
    picked = [rng.permutation(indices[labels[indices] == c])[:per_class] for c in classes]
    return np.sort(np.concatenate(picked))


def source_options(data: dict) -> dict:
    """The ``data`` settings the source itself takes (the rest choose where, how it is cached and how it is split)."""
    return {k: v for k, v in data.items() if k not in ("name", "root", "cache_dir", "val_fraction", "subset", "test_subset", "split_seed")}


def load_bundle(data: dict, device: torch.device | str = "cpu") -> DataBundle:
    """Load, split and move a data set to ``device`` from the YAML's ``data`` section."""
    images = load_images(data["name"], data.get("root"), data.get("cache_dir"), **source_options(data))
    seed = data.get("split_seed", 0)
    train_idx, val_idx = split_indices(images.train_y, data.get("val_fraction", 0.0), seed)
    if data.get("subset"):  # the validation split shrinks with it: val_fraction of the subset, not of the whole set
        train_idx = random_balanced_subset(train_idx, images.train_y, data["subset"], seed)
        if len(val_idx):
            val_idx = random_balanced_subset(val_idx, images.train_y, max(1, round(data["subset"] * data.get("val_fraction", 0.0))), seed)
    test_idx = np.arange(len(images.test_y))
    if data.get("test_subset"):
        test_idx = random_balanced_subset(test_idx, images.test_y, data["test_subset"], seed)

    def split(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Split:
        return Split(torch.from_numpy(x[idx]).to(device), torch.from_numpy(y[idx]).to(device), torch.from_numpy(idx).to(device))

    mean, std = channel_stats(images.train_x[train_idx])
    return DataBundle(
        split(images.train_x, images.train_y, train_idx),
        split(images.train_x, images.train_y, val_idx) if len(val_idx) else None,
        split(images.test_x, images.test_y, test_idx),
        images.classes, mean.to(device), std.to(device), images.digest,
    )


def iterate_batches(
    bundle: DataBundle,
    split: Split,
    batch_size: int,
    gen: torch.Generator | None = None,
    augment: Augmenter | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (normalised images, labels, source indices); shuffled and augmented only when given a generator and an augmenter."""
    device = split.x.device  # ``gen`` lives there too: the order is drawn without a host-device copy
    order = torch.randperm(len(split), generator=gen, device=device) if gen is not None else torch.arange(len(split), device=device)
    for start in range(0, len(split), batch_size):
        take = order[start : start + batch_size]
        x = bundle.normalise(split.x[take])
        if augment is not None:
            x = augment(x, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, split.y[take], split.index[take]
