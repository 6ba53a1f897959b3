"""Blur corruptions of CIFAR-10-C: Gaussian, defocus, glass, motion and zoom blur.

Motion blur (and snow's streaks, ``weather.py``) is ImageMagick's ``MotionBlurImage`` as make_cifar_c.py calls it
through Wand, written out here so that no system library is needed: a one-sided Gaussian of 2 ceil(radius) + 1
taps along the angle, edge pixels repeated, computed on 16-bit quanta and stored back in 8 bits as ImageMagick's
Q16 build does. ``tests/test_corruptions.py`` compares it with ImageMagick itself."""
from __future__ import annotations

import cv2
import numpy as np
from stress.corruptions.registry import clipped_zoom, each, register, skimage_gaussian

SQRT_2PI = 2.50662827463100024161235523934010416269302368164062  # ImageMagick's MagickSQ2PI


@register
def gaussian_blur(x, severity, rng):
    return skimage_gaussian(x, [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1])


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
    return each(x, lambda img: cv2.filter2D(img, -1, kernel))


def local_shuffle(x: np.ndarray, max_delta: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """make_cifar_c.py's glass-blur pixel moves, in its order (rows and columns from the far edge inwards), for the
    whole batch at once: the moves are sequential within an image, independent between images.

    The reference writes ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``; on numpy views that copies the neighbour's
    pixel over ``x[h, w]`` and leaves the neighbour as it is (the second assignment reads the already overwritten
    view), so the published files hold copies, not swaps, and so does this."""
    n, h, w = x.shape[:3]
    places = [(r, c) for r in range(h - max_delta, max_delta, -1) for c in range(w - max_delta, max_delta, -1)]
    deltas = rng.integers(-max_delta, max_delta, size=(iterations, len(places), n, 2))  # randint's high is exclusive, as there
    images = np.arange(n)
    x = x.copy()
    for step in deltas:
        for (r, c), d in zip(places, step):  # d: (N, 2), each image's (dx, dy)
            x[:, r, c] = x[images, r + d[:, 1], c + d[:, 0]]
    return x


@register
def glass_blur(x, severity, rng):
    sigma, max_delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    blurred = (skimage_gaussian(x, sigma) * 255).astype(np.uint8)
    return skimage_gaussian(local_shuffle(blurred, max_delta, iterations, rng) / 255.0, sigma)


def motion_taps(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick's motion-blur kernel: weights of exp(-i^2 / 2 sigma^2) for i < 2 ceil(radius) + 1, normalised, and
    each tap's integer (dx, dy) step along ``angle`` degrees."""
    width = int(2 * np.ceil(radius) + 1)
    i = np.arange(width)
    weights = np.exp(-(i.astype(float) ** 2) / (2 * sigma * sigma)) / (SQRT_2PI * sigma)
    px, py = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
    length = np.hypot(px, py)
    return weights / weights.sum(), np.ceil(i * py / length - 0.5).astype(int), np.ceil(i * px / length - 0.5).astype(int)


def motion_blur_uint8(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W[, C]) motion-blurred as ImageMagick Q16 does, image n along ``angles[n]``: 8-bit values
    scaled to 16-bit quanta (x 257), the taps summed in order with the edge pixel repeated past the border, rounded to
    a quantum, then cut back to 8 bits (quantum // 257, what ImageMagick 6.9 Q16 writes to the PNG)."""
    n, h, w = x.shape[:3]
    taps = [motion_taps(radius, sigma, a) for a in angles]
    weights = taps[0][0]
    dx, dy = np.stack([t[1] for t in taps]), np.stack([t[2] for t in taps])  # (N, taps)
    quanta = x.astype(np.float64) * 257
    images, rows, cols = np.arange(n)[:, None, None], np.arange(h), np.arange(w)
    out = np.zeros_like(quanta)
    for j, k in enumerate(weights):
        r = np.clip(rows[None, :] + dy[:, j : j + 1], 0, h - 1)[:, :, None]
        c = np.clip(cols[None, :] + dx[:, j : j + 1], 0, w - 1)[:, None, :]
        out += k * quanta[images, r, c]
    q16 = np.floor(np.clip(out, 0, 65535) + 0.5)
    return (q16 // 257).astype(np.uint8)


@register
def motion_blur(x, severity, rng):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    pixels = np.rint(x * 255).astype(np.uint8)  # the PNG make_cifar_c.py hands to ImageMagick
    return motion_blur_uint8(pixels, radius, sigma, rng.uniform(-45, 45, size=len(x)))


@register
def zoom_blur(x, severity, rng):
    top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    factors = np.arange(1, top, 0.01)
    x = x.astype(np.float32)
    out = np.zeros_like(x)
    for factor in factors:
        out += clipped_zoom(x, factor)
    return (x + out) / (len(factors) + 1)
