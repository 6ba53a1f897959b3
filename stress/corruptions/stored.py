"""Generated corrupted sets kept on disk, so that a sweep corrupts its test subset once, not once per trial.

Every trial of a launch tests the same class-balanced subset under the same 95 corrupted sets, and generating them
is CPU-bound numpy/SciPy/OpenCV work: 12 s for 500 images on one core, a third of the trial-end corruption test
(the rest is classifying them). The first trial to need a set writes it; later trials, later launches and the
analysis on the same subset read it (1.5 MB a set of 500 CIFAR images, 146 MB all 95).

A set is keyed by the images' bytes, the seed and the code that corrupts them (this package's files and the
libraries' versions), so a changed formula or library never serves an old set. Writes go to a temporary file that is
renamed, so a reader never sees half a set; two trials that generate the same set at once write identical bytes.
The cache never fails a trial: a set it cannot read is generated again, a folder it cannot write is warned about
once and skipped.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

LIBRARIES = ("numpy", "scipy", "opencv-python-headless", "pillow")
"""The libraries whose versions can change a generated set (and that ``source`` records)."""


def library_versions() -> dict[str, str]:
    """The installed version of each of ``LIBRARIES``."""
    return {lib: md.version(lib) for lib in LIBRARIES}


@functools.cache
def code_version() -> str:
    """A digest of everything that decides a generated set's bytes: this package's files and the libraries' versions."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".png")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    digest.update(repr(sorted(library_versions().items())).encode())
    return digest.hexdigest()[:16]


class SetCache:
    """Corrupted sets of one image batch under ``folder``/corruptions/<code>-<images>/<name>-<severity>.npy."""

    def __init__(self, folder: str | Path, x: np.ndarray, seed: int):
        images = hashlib.sha256(f"{x.dtype}{x.shape}{seed}".encode() + np.ascontiguousarray(x).tobytes()).hexdigest()[:16]
        self.folder = Path(folder).expanduser() / "corruptions" / f"{code_version()}-{images}"
        self.shape, self.seed, self.read, self.written, self.writable = x.shape, seed, 0, 0, True

    def get(self, name: str, severity: int, generate) -> np.ndarray:
        """The set ``name`` at ``severity``: read from the cache, else ``generate()``d and stored."""
        path = self.folder / f"{name}-{severity}.npy"
        if path.exists():
            try:
                images = np.load(path, allow_pickle=False)
                if images.shape == self.shape and images.dtype == np.uint8:
                    self.read += 1
                    return images
                problem = f"shape {images.shape}, dtype {images.dtype}"
            except (OSError, ValueError, EOFError) as err:
                problem = f"{type(err).__name__}: {err}"
            print(f"warning: cached corrupted set {path} is unreadable ({problem}); generating it again", file=sys.stderr)
        images = generate()
        self.store(path, images)
        return images

    def store(self, path: Path, images: np.ndarray) -> None:
        """Write ``images`` to ``path`` through a temporary file; on failure warn once and stop writing."""
        if not self.writable:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, images, allow_pickle=False)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)  # gone after the rename; removed if the write failed (a full disk)
            self.written += 1
        except OSError as err:
            self.writable = False
            print(f"warning: cannot store corrupted sets under {self.folder} ({err}); they are generated without a cache", file=sys.stderr)

    def record(self) -> dict:
        """What the cache did, for robustness.json: its folder, the sets read from it and those generated and stored."""
        return {"folder": str(self.folder), "read": self.read, "stored": self.written}

    def summary(self) -> str:
        """The same as one line for a log."""
        return f"corrupted sets: {self.read} read from the cache, {self.written} generated and stored ({self.folder})"
