"""Corruption stress test in the spirit of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), generated on the fly.

The published CIFAR-10-C files cannot be downloaded here, so each corruption is applied to the test
images with a fixed seed. Noise, blur, contrast, brightness, JPEG and pixelate use the CIFAR
parameters of hendrycks/robustness ``make_cifar_c.py``. Two deviate, so that severity grows
monotonically: ``saturate`` (CIFAR-10-C's severities alternate between desaturating and
oversaturating; here saturation falls steadily towards grey) and ``haze`` (a fog-like blend towards
a smooth random bright field, in place of the plasma-fractal fog). Severity 0 is the identity.
Images are uint8 (N, 3, H, W) numpy arrays throughout.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
CORRUPTIONS: dict[str, Corruption] = {}


def register(fn: Corruption) -> Corruption:
    """Decorator: the corruption applies ``fn`` for severity >= 1 and is the identity at 0."""

    def apply(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        if severity == 0:
            return x.copy()
        out = fn(x.astype(np.float32) / 255.0, severity, rng)
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)

    CORRUPTIONS[fn.__name__] = apply
    return apply


def _per_image(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply an HWC float32 image function to each CHW image."""
    return np.stack([fn(img.transpose(1, 2, 0)).reshape(img.shape[1], img.shape[2], -1).transpose(2, 0, 1) for img in x])


@register
def gaussian_noise(x, severity, rng):
    return x + rng.normal(0, [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1], x.shape)


@register
def shot_noise(x, severity, rng):
    c = [500, 250, 100, 75, 50][severity - 1]
    return rng.poisson(x * c) / c


@register
def impulse_noise(x, severity, rng):
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    out = x.copy()
    hit = rng.random(x.shape) < amount
    out[hit] = (rng.random(int(hit.sum())) < 0.5).astype(np.float32)  # salt or pepper
    return out


@register
def gaussian_blur(x, severity, rng):
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1]
    return _per_image(x, lambda img: cv2.GaussianBlur(img, (0, 0), sigma))


@register
def defocus_blur(x, severity, rng):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    size = int(np.ceil(radius)) * 2 + 3
    yy, xx = np.mgrid[-size // 2 + 1 : size // 2 + 1, -size // 2 + 1 : size // 2 + 1]
    disk = ((xx**2 + yy**2) <= max(radius, 0.5) ** 2 + 1e-6).astype(np.float32)
    disk = cv2.GaussianBlur(disk / disk.sum(), (3, 3), alias)
    return _per_image(x, lambda img: cv2.filter2D(img, -1, disk / disk.sum()))


@register
def contrast(x, severity, rng):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    means = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - means) * c + means


@register
def brightness(x, severity, rng):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]

    def lift(img):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    return _per_image(x, lift)


@register
def saturate(x, severity, rng):
    keep = [0.8, 0.6, 0.4, 0.2, 0.0][severity - 1]
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    return grey + (x - grey) * keep


@register
def jpeg_compression(x, severity, rng):
    quality = [80, 65, 58, 50, 40][severity - 1]

    def recode(img):
        bgr = cv2.cvtColor(np.uint8(np.rint(img * 255)), cv2.COLOR_RGB2BGR)
        _, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0

    return _per_image(x, recode)


@register
def pixelate(x, severity, rng):  # box down and box up, as PIL's BOX filter in the original
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[2:]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    return _per_image(x, lambda img: cv2.resize(cv2.resize(img, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_AREA))


@register
def haze(x, severity, rng):
    strength = [0.15, 0.25, 0.35, 0.45, 0.6][severity - 1]
    h, w = x.shape[2:]
    coarse = rng.random((len(x), 1, 4, 4)).astype(np.float32)
    field = np.stack([cv2.resize(c[0], (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse])[:, None]
    veil = 0.75 + 0.25 * field  # bright, smooth, uneven
    return x * (1 - strength) + veil * strength


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``x`` under corruption ``name`` at ``severity`` (0-5), reproducibly."""
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(sorted(CORRUPTIONS))}")
    return CORRUPTIONS[name](x, severity, np.random.default_rng([seed, severity, sorted(CORRUPTIONS).index(name)]))


def balanced_subset(labels: np.ndarray, num_classes: int, n_images: int) -> np.ndarray:
    """Positions of the first ``n_images // num_classes`` test images of every class (at least one each)."""
    per_class = max(1, n_images // num_classes)
    return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)])


def corruption_accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, list[float]]:
    """Accuracy per corruption at severities 1-5; ``predict`` maps uint8 images to class ids."""
    return {name: [float((predict(corrupt(x, name, s, seed)) == labels).mean()) for s in SEVERITIES] for name in sorted(CORRUPTIONS)}


def mean_corruption_error(errors: dict[str, list[float]], baseline: dict[str, list[float]]) -> float:
    """mCE: per corruption, summed error over severities relative to the baseline's, averaged over corruptions."""
    return float(np.mean([sum(errors[c]) / max(sum(baseline[c]), 1e-12) for c in errors]))
