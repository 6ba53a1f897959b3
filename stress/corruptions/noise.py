"""Noise corruptions of CIFAR-10-C: Gaussian, shot, impulse and (an extra) speckle noise."""
from __future__ import annotations

from stress.corruptions.registry import register


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


@register
def speckle_noise(x, severity, rng):  # multiplicative: x + x * N(0, c)
    return x + x * rng.normal(size=x.shape, scale=[0.06, 0.1, 0.12, 0.16, 0.2][severity - 1])
