"""The corruption stress test: CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), generated on the fly or read from
the published arrays (``published.py``).

All 15 corruptions of the benchmark and its 4 extras, each following the formula and the CIFAR parameters of
hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py`` (float image in [0, 1], clipped, times 255, truncated
to uint8 as ``np.uint8`` does there), vectorised over the batch: ``noise.py``, ``blur.py``, ``weather.py`` and
``digital.py``. What differs from the published files: the random draws (a seeded ``numpy.random.Generator`` per
corruption and severity, not the global ``np.random`` state) and the libraries' versions (OpenCV, SciPy, PIL);
ImageMagick's motion blur is written out in numpy and equal to ImageMagick 6.9's. ``tests/test_corruptions.py``
checks every one against an independent per-image reference.

Images are uint8 (N, 3, H, W) numpy arrays throughout; severity 0 is the identity. Used by both the end-of-trial
robustness metrics (``trainable.py``) and the analysis, on the same subset.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator

import numpy as np

from stress.corruptions import blur, digital, noise, weather  # noqa: F401  (each registers its corruptions)
from stress.corruptions.registry import CORRUPTIONS, SEVERITIES
from stress.corruptions.stored import SetCache, library_versions

BENCHMARK = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow", "frost",
             "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
"""The 15 corruptions whose mean the literature reports (RobustBench, the CIFAR-10-C paper), in the paper's order."""
EXTRAS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""CIFAR-10-C's 4 held-out corruptions: reported apart, never in the 15-corruption mean."""
ANCHOR = {"name": "RobustBench CIFAR-10-C, Standard WideResNet-28-10", "clean": 0.9478, "mean_corruption_acc": 0.7346,
          "per_severity": [0.869, 0.813, 0.749, 0.676, 0.565], "source": "published CIFAR-10-C arrays, 15 corruptions x 5 severities"}
"""The published figure a CIFAR-10 model's 15-corruption mean is set beside (RobustBench leaderboard, "Standard")."""


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``x`` under corruption ``name`` at ``severity`` (0-5), reproducibly for a given ``seed``."""
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(sorted(CORRUPTIONS))}")
    return CORRUPTIONS[name](x, severity, np.random.default_rng([seed, severity, zlib.crc32(name.encode())]))


def first_per_class(labels: np.ndarray, num_classes: int, n_images: int) -> np.ndarray:
    """Positions of the first ``n_images // num_classes`` test images of every class (at least one each).

    The one subset definition: the end-of-trial metrics and the analysis both call it on the test
    labels in prediction order, so ``robustness/*`` in MLflow and ``robustness.json`` use the same images."""
    per_class = max(1, n_images // num_classes)
    return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)])


def corrupted_sets(x: np.ndarray, seed: int = 0, published: dict[tuple[str, int], np.ndarray] | None = None,
                   cache: SetCache | None = None) -> Iterator[tuple[str, int, np.ndarray]]:
    """(name, severity, images) for every corruption at severities 1-5, in a fixed order: from ``published``
    (``published.published_sets`` of the same images) where it holds the corruption, else generated from ``x`` (or
    read from ``cache``, a ``SetCache`` of the same ``x`` and ``seed``, where an earlier call stored it)."""
    if cache is not None and cache.seed != seed:
        raise ValueError(f"a SetCache of seed {cache.seed} for the sets of seed {seed}")
    for name in sorted(CORRUPTIONS):
        for severity in SEVERITIES:
            if published and (name, severity) in published:
                yield name, severity, published[name, severity]
            elif cache is not None:
                yield name, severity, cache.get(name, severity, lambda: corrupt(x, name, severity, seed))
            else:
                yield name, severity, corrupt(x, name, severity, seed)


def source(published: dict[tuple[str, int], np.ndarray] | None = None, folder: str | None = None) -> dict:
    """Where each corruption's images came from, for robustness.json and the report: the published arrays' folder
    and the corruptions read from it, the rest generated here with these libraries' versions."""
    read = sorted({name for name, _ in published}) if published else []
    return {"kind": "published" if len(read) == len(CORRUPTIONS) else "generated" if not read else "mixed",
            "published": read, "published_folder": folder if read else None,
            "generated": sorted(set(CORRUPTIONS) - set(read)), "libraries": library_versions()}


def summarise(accuracy: dict[str, list[float]]) -> dict:
    """The figures the literature reports, from accuracy per corruption and severity: the mean over the 15 benchmark
    corruptions and 5 severities, its per-severity profile, and the 4 extras' mean apart (None where absent)."""
    bench = np.array([accuracy[c] for c in BENCHMARK if c in accuracy])
    extras = [np.mean(accuracy[c]) for c in EXTRAS if c in accuracy]
    full = len(bench) == len(BENCHMARK)
    return {"mean": float(bench.mean()) if full else None, "per_severity": [float(v) for v in bench.mean(0)] if full else None,
            "extras_mean": float(np.mean(extras)) if len(extras) == len(EXTRAS) else None}


def classifier(model, mean, std, batch_size: int = 500, device="cpu") -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images (N, C, H, W) -> the class ids ``model`` predicts, in fp32 batches on ``device``: what the
    corruption test (in a trial and in the analysis) calls on every corrupted set."""
    import torch

    from data_zoo.loader import normalise

    @torch.inference_mode()
    def classify(images: np.ndarray) -> np.ndarray:
        model.eval()
        out = [model(normalise(torch.as_tensor(images[i : i + batch_size]).to(device), mean, std)).argmax(1).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()

    return classify


def corruption_accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray | None, labels: np.ndarray, seed: int = 0,
                        sets: list[tuple[str, int, np.ndarray]] | None = None) -> dict[str, list[float]]:
    """Accuracy per corruption at severities 1-5; ``predict`` maps uint8 images to class ids. Pass ``sets``
    (from ``corrupted_sets``) to reuse images generated once for many models."""
    out: dict[str, list[float]] = {}
    for name, _, images in sets if sets is not None else corrupted_sets(x, seed):
        out.setdefault(name, []).append(float((predict(images) == labels).mean()))
    return out


def mean_corruption_error(errors: dict[str, list[float]], baseline: dict[str, list[float]]) -> float:
    """mCE: per corruption, summed error over severities relative to the baseline's, averaged over corruptions."""
    return float(np.mean([sum(errors[c]) / max(sum(baseline[c]), 1e-12) for c in errors]))
