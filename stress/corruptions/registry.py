"""The corruption registry: every corruption maps uint8 (N, 3, H, W) images, a severity and a seeded generator to
uint8 images of the same shape. Severity 0 is the identity."""
from __future__ import annotations

from typing import Callable

import numpy as np

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


def each(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` applied to every image of the batch, stacked."""
    return np.stack([fn(img) for img in x])


def skimage_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """``skimage.filters.gaussian`` as make_cifar_c.py calls it ('nearest' border, 4 sigma), over the image axes (1, 2)
    of a batch (N, H, W[, C]) only."""
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma) + (0,) * (x.ndim - 3), mode="nearest", truncate=4.0)


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """make_cifar_c.py's clipped_zoom over a batch (N, H, W[, C]): the centre ceil(H / factor) square, scaled up by
    ``factor`` as ``scipy.ndimage.zoom(order=1)`` does (output side round(side x factor), output pixel o read at
    o (side - 1) / (output side - 1)), cut back to H x H at its centre. Only the kept rows and columns are
    interpolated, as two matrix products: scipy's zoom of the whole batch took 0.5 s per factor for 1,000 images."""
    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    crop = np.moveaxis(x[:, top : top + ch, top : top + ch], (1, 2), (-2, -1)).astype(np.float64)  # (N[, C], ch, ch)
    side = int(round(ch * factor))
    trim = (side - h) // 2
    coord = np.arange(trim, trim + h) * ((ch - 1) / (side - 1)) if side > 1 else np.zeros(h)
    lo = np.floor(coord).astype(int)
    weights = np.zeros((h, ch))
    np.add.at(weights, (np.arange(h), lo), 1 - (coord - lo))
    np.add.at(weights, (np.arange(h), np.minimum(lo + 1, ch - 1)), coord - lo)
    return np.moveaxis(weights @ crop @ weights.T, (-2, -1), (1, 2)).astype(x.dtype)
