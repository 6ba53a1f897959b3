"""Weather corruptions of CIFAR-10-C: snow, frost, fog and (an extra) spatter.

Random draws come from the generator the registry passes, in a documented order per corruption (the tests replay
them through per-image references of make_cifar_c.py)."""
from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from stress.corruptions.blur import motion_blur_uint8
from stress.corruptions.registry import clipped_zoom, register, skimage_gaussian

FROST_DIR = Path(__file__).with_name("frost")


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


@functools.cache
def frost_pictures() -> tuple[np.ndarray, ...]:
    """The five frost photographs as RGB uint8, already shrunk 5x as make_cifar_c.py does (``frost/README.md``)."""
    return tuple(cv2.imread(str(FROST_DIR / f"frost{i}.png"))[..., ::-1] for i in range(1, 6))


@register
def frost(x, severity, rng):
    """keep x image + amount x a random crop of one of the frost pictures. Draws: the pictures (N), then each crop's
    top row and left column."""
    keep, amount = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    n, h, w, _ = x.shape
    pictures = frost_pictures()
    which = rng.integers(5, size=n)
    tops = rng.integers(0, [pictures[k].shape[0] - h for k in which])
    lefts = rng.integers(0, [pictures[k].shape[1] - w for k in which])
    crops = np.stack([pictures[k][t : t + h, left : left + w] for k, t, left in zip(which, tops, lefts)])
    return np.clip(keep * np.rint(x * 255) + amount * crops, 0, 255).astype(np.uint8)  # in 0-255, as the reference


@register
def snow(x, severity, rng):
    """Flakes: N(loc, scale) noise zoomed in, thresholded, motion-blurred (ImageMagick's, ``blur.py``) and added twice
    (turned 180 degrees) over a whitened image. Draws: the noise (N, H, W), then each image's angle."""
    loc, scale, zoom, threshold, radius, sigma, keep = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][severity - 1]
    n, h, w, _ = x.shape
    layer = clipped_zoom(rng.normal(size=(n, h, w), loc=loc, scale=scale), zoom)
    layer[layer < threshold] = 0
    flakes = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
    streaks = (motion_blur_uint8(flakes, radius, sigma, rng.uniform(-135, -45, size=n)) / 255.0)[..., None]
    x = x.astype(np.float32)
    grey = cv2.cvtColor(x.reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w, 1)
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return x + streaks + np.rot90(streaks, k=2, axes=(1, 2))


def water_edges(liquid: np.ndarray) -> np.ndarray:
    """make_cifar_c.py's spatter ripples for one uint8 liquid layer: distance to the layer's Canny edges, capped at
    20, equalised, embossed and blurred (float32)."""
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
    return cv2.blur(dist, (3, 3)).astype(np.float32)


@register
def spatter(x, severity, rng):
    """Water (severities 1-3: pale turquoise ripples) or mud (4-5: brown blots) from smoothed, thresholded N(loc,
    scale) noise. Draws: the noise (N, H, W). Where a water layer is empty, the image is left as it is (the reference
    divides by its zero maximum)."""
    loc, scale, sigma, threshold, intensity, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)][severity - 1]
    x = x.astype(np.float32)
    liquid = skimage_gaussian(rng.normal(size=x.shape[:3], loc=loc, scale=scale), sigma)
    liquid[liquid < threshold] = 0
    if mud:
        m = skimage_gaussian((liquid > threshold).astype(np.float32), intensity)
        m[m < 0.8] = 0
        return x * (1 - m[..., None]) + np.array([63, 42, 20], np.float32) / 255 * m[..., None]
    liquid = (liquid * 255).astype(np.uint8)
    m = liquid * np.stack([water_edges(layer) for layer in liquid])
    top = m.max(axis=(1, 2), keepdims=True)
    m = np.divide(m, top, out=np.zeros_like(m), where=top > 0) * intensity
    return x + m[..., None] * (np.array([175, 238, 238], np.float32) / 255)
