"""Decode a data set once, keep it as one uint8 ``.npz`` on disk, keyed by its source fingerprint.

60,000 JPEGs take tens of seconds to decode; the cached arrays load in well under a second, so
every trial after the first pays only the load.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
from filelock import FileLock

from data_zoo.sources import ImageSet, get_source


def default_cache_dir() -> Path:
    """``$STRESSLAB_CACHE`` or ``~/.cache/stresslab``."""
    return Path(os.environ.get("STRESSLAB_CACHE", Path.home() / ".cache" / "stresslab"))


def cache_key(name: str, root: str | None, **options) -> str:
    """Digest of the source's files (or generator settings): a changed source gets a new key."""
    source = get_source(name)
    text = f"{name}\n{source.fingerprint(root=root, **options)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write(path: Path, images: ImageSet) -> None:
    tmp = path.with_suffix(".npz.tmp")
    with open(tmp, "wb") as fh:  # a crash mid-write never leaves a truncated cache behind
        np.savez(fh, train_x=images.train_x, train_y=images.train_y, test_x=images.test_x,
                 test_y=images.test_y, classes=np.array(images.classes))
    os.replace(tmp, path)


def _read(path: Path) -> ImageSet:
    try:
        with np.load(path) as f:
            return ImageSet(f["train_x"], f["train_y"], f["test_x"], f["test_y"], [str(c) for c in f["classes"]])
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as err:
        raise RuntimeError(f"corrupt data cache {path} ({err}); delete it and it will be rebuilt") from err


def load_images(name: str, root: str | None = None, cache_dir: str | Path | None = None, **options) -> ImageSet:
    """The decoded images of data set ``name``, from the cache when the source is unchanged."""
    source = get_source(name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create data cache folder {cache} ({err}); set data.cache_dir or STRESSLAB_CACHE") from err
    root = str(Path(root).expanduser().resolve()) if root else None
    try:
        key = cache_key(name, root, **options)
    except FileNotFoundError as err:
        if not (name.startswith("cifar") and options.get("download") and root):
            raise FileNotFoundError(f"{err}; {source.hint}") from err
        source.decode(root=root, lock_dir=cache, **options)  # download what is missing, then fingerprint it (once: not on every call)
        key = cache_key(name, root, **options)
    path = cache / f"{name}-{key}.npz"
    with FileLock(str(path) + ".lock"):  # one trial decodes, the others wait and read
        if not path.exists():
            _write(path, source.decode(root=root, lock_dir=cache, **options))
    images = _read(path)
    images.digest = key
    return images
