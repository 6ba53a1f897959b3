"""Digital corruptions of CIFAR-10-C: contrast, brightness, elastic transform, pixelate, JPEG and (an extra)
saturate."""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from stress.corruptions.registry import each, register


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
    return each(x, lambda img: _jpeg(img, quality))


@register
def pixelate(x, severity, rng):  # PIL BOX down to int(side * c), BOX back up
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[1:3]
    return each(x, lambda img: np.asarray(_pil(img).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)))


@register
def elastic_transform(x, severity, rng):
    """A random affine (three points moved up to ``shift`` pixels), then each pixel displaced by Gaussian-smoothed
    uniform noise (``alpha``, ``sigma``), bilinear with mirrored borders. Draws: the affine moves (N, 3, 2), then the
    x and the y displacement fields (N, H, W each)."""
    size = 32  # make_cifar_c.py's IMSIZE: its parameters are for 32-pixel images
    alpha, sigma, shift = [(size * 0, size * 0, size * 0.08), (size * 0.05, size * 0.2, size * 0.07), (size * 0.08, size * 0.06, size * 0.06),
                           (size * 0.1, size * 0.04, size * 0.05), (size * 0.1, size * 0.03, size * 0.03)][severity - 1]
    n, h, w, channels = x.shape
    centre, square = np.float32((h, w)) // 2, min(h, w) // 3
    points = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    moved = points + rng.uniform(-shift, shift, size=(n, 3, 2)).astype(np.float32)
    x = x.astype(np.float32)
    warped = np.stack([cv2.warpAffine(img, cv2.getAffineTransform(points, m), (w, h), borderMode=cv2.BORDER_REFLECT_101) for img, m in zip(x, moved)])

    def field() -> np.ndarray:
        noise = rng.uniform(-1, 1, size=(n, h, w))
        return (ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="reflect", truncate=3) * alpha).astype(np.float32)[..., None]

    dx, dy = field(), field()
    b, r, c, z = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), np.arange(channels), indexing="ij")
    return ndimage.map_coordinates(warped, (b, r + dy, c + dx, z), order=1, mode="reflect")
