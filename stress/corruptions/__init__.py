"""The corruption stress test: CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), generated on the fly.

The published CIFAR-10-C files cannot be downloaded here, so the corruptions are applied to the test
images with a fixed seed. Each follows the formula and the CIFAR parameters of hendrycks/robustness
``ImageNet-C/create_c/make_cifar_c.py`` (float image in [0, 1], clipped, times 255, truncated to
uint8 as ``np.uint8`` does there), vectorised over the batch. What differs from the published files:
the random draws (a seeded ``numpy.random.Generator`` per corruption and severity, not the global
``np.random`` state) and the subset of corruptions (those needing ImageMagick or the frost images are
left out). ``tests/test_corruptions.py`` checks every one against an independent per-image reference.

Images are uint8 (N, 3, H, W) numpy arrays throughout; severity 0 is the identity. Used by both the
end-of-trial robustness metrics (``trainable.py``) and the analysis, on the same subset.
"""
from __future__ import annotations

import io
from typing import Callable, Iterator

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
CORRUPTIONS: dict[str, Corruption] = {}


def register(fn: Callable) -> Corruption:
    """Decorator: ``fn`` maps float64 NHWC images in [0, 1] to float (clipped, x255, truncated) or to uint8 NHWC."""

    def apply(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        if severity == 0:
            return x.copy()
        out = fn(x.transpose(0, 2, 3, 1) / 255.0, severity, rng)
        if out.dtype != np.uint8:
            out = (np.clip(out, 0, 1) * 255).astype(np.uint8)  # truncation, as np.uint8(...) in make_cifar_c.py
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))

    CORRUPTIONS[fn.__name__] = apply
    return apply


def _each(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(img) for img in x])


# --- noise ------------------------------------------------------------------------------------


@register
def gaussian_noise(x, severity, rng):
    return x + rng.normal(size=x.shape, scale=[0.04, 0.06, 0.08, 0.09, 0.10][severity - 1])


@register
def shot_noise(x, severity, rng):
    c = [500, 250, 100, 75, 50][severity - 1]
    return rng.poisson(x * c) / c


@register
def impulse_noise(x, severity, rng):  # skimage.util.random_noise(mode='s&p'): each value flipped with p=amount, salt or pepper evenly
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    flipped, salted = rng.random(x.shape) < amount, rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted], out[flipped & ~salted] = 1.0, 0.0
    return out


# --- blur -------------------------------------------------------------------------------------


@register
def gaussian_blur(x, severity, rng):  # skimage.filters.gaussian: scipy's filter, 'nearest' border, 4 sigma
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1]
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """A normalised disk on a 17x17 grid (radius <= 8), anti-aliased by a 3x3 Gaussian, float32."""
    half, ksize = (8, (3, 3)) if radius <= 8 else (int(radius), (5, 5))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    return cv2.GaussianBlur(disk / disk.sum(), ksize=ksize, sigmaX=alias_blur)


@register
def defocus_blur(x, severity, rng):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    kernel = disk_kernel(radius, alias)
    return _each(x, lambda img: cv2.filter2D(img, -1, kernel))


# --- weather ----------------------------------------------------------------------------------


def plasma_fractal(n: int, mapsize: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` diamond-square height maps (n, mapsize, mapsize) scaled to [0, 1]; ``mapsize`` a power of two."""
    maps = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def jitter(total: np.ndarray) -> np.ndarray:  # mean of four neighbours plus a random offset
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        squares = corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, half::step] = jitter(squares + np.roll(squares, -1, axis=2))
        centres = maps[:, half::step, half::step]
        maps[:, 0::step, half::step] = jitter(centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2))
        maps[:, half::step, 0::step] = jitter(centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1))
        step, wibble = half, wibble / decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def fog_blend(x: np.ndarray, plasma: np.ndarray, strength: float) -> np.ndarray:
    """make_cifar_c.py's fog: add the height map, rescale by the image's maximum over (maximum + strength)."""
    top = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + strength * plasma[..., None]) * top / (top + strength)


@register
def fog(x, severity, rng):
    strength, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    n, h, w, _ = x.shape
    size = 1 << (max(h, w) - 1).bit_length()  # the smallest power of two that covers the image
    return fog_blend(x, plasma_fractal(n, size, decay, rng)[:, :h, :w], strength)


# --- digital ----------------------------------------------------------------------------------


@register
def contrast(x, severity, rng):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    means = x.mean(axis=(1, 2), keepdims=True)  # one mean per image and channel
    return (x - means) * c + means


def _value_saturation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV value and saturation (skimage's rgb2hsv: S = (max - min) / max, 0 where max == min)."""
    v = x.max(axis=-1, keepdims=True)
    delta = v - x.min(axis=-1, keepdims=True)
    return v, np.divide(delta, v, out=np.zeros_like(v), where=delta > 0)


@register
def brightness(x, severity, rng):  # HSV value + c: with hue and saturation fixed, RGB scales with V
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    v, _ = _value_saturation(x)
    lifted = np.clip(v + c, 0, 1)
    return np.where(v > 0, lifted - (v - x) * np.divide(lifted, v, out=np.zeros_like(v), where=v > 0), lifted)  # max channel exactly V


@register
def saturate(x, severity, rng):  # HSV saturation x c0 + c1: with hue and value fixed, V - RGB scales with S
    c0, c1 = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]
    v, s = _value_saturation(x)
    s_new = np.clip(s * c0 + c1, 0, 1)
    scaled = v - (v - x) * np.divide(s_new, s, out=np.zeros_like(s), where=s > 0)
    grey = np.concatenate([v, v * (1 - s_new), v * (1 - s_new)], axis=-1)  # skimage gives grey pixels hue 0 (red)
    return np.where(s > 0, scaled, grey)


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray((img * 255).round().astype(np.uint8))


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(img).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


@register
def jpeg_compression(x, severity, rng):
    quality = [80, 65, 58, 50, 40][severity - 1]
    return _each(x, lambda img: _jpeg(img, quality))


@register
def pixelate(x, severity, rng):  # PIL BOX down to int(side * c), BOX back up
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[1:3]
    return _each(x, lambda img: np.asarray(_pil(img).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)))


# --- applying them ----------------------------------------------------------------------------


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``x`` under corruption ``name`` at ``severity`` (0-5), reproducibly for a given ``seed``."""
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(sorted(CORRUPTIONS))}")
    return CORRUPTIONS[name](x, severity, np.random.default_rng([seed, severity, sorted(CORRUPTIONS).index(name)]))


def first_per_class(labels: np.ndarray, num_classes: int, n_images: int) -> np.ndarray:
    """Positions of the first ``n_images // num_classes`` test images of every class (at least one each).

    The one subset definition: the end-of-trial metrics and the analysis both call it on the test
    labels in prediction order, so ``robustness/*`` in MLflow and ``robustness.json`` use the same images."""
    per_class = max(1, n_images // num_classes)
    return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)])


def corrupted_sets(x: np.ndarray, seed: int = 0) -> Iterator[tuple[str, int, np.ndarray]]:
    """(name, severity, images) for every corruption at severities 1-5, in a fixed order."""
    for name in sorted(CORRUPTIONS):
        for severity in SEVERITIES:
            yield name, severity, corrupt(x, name, severity, seed)


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
