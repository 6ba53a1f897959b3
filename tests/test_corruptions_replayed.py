"""The corruptions with random draws or ImageMagick, against make_cifar_c.py's own per-image code: glass, motion and
zoom blur, snow, frost, elastic transform, spatter.

Each reference draws the same arrays from the same seed in the order the corruption documents, then runs the
reference's per-image code on them (typed in from make_cifar_c.py, with scikit-image, SciPy, OpenCV and ImageMagick
through Wand); the next severity's parameters must fail the same comparison."""
import ctypes
import io
import os

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import filters

from stress.corruptions import CORRUPTIONS, SEVERITIES
from stress.corruptions.weather import FROST_DIR
from tests.test_corruptions import PUBLISHED, assert_matches, images, matches  # noqa: F401  (images: the shared fixture)


def assert_replays(name: str, images: np.ndarray, severity: int, reference_for, other: int | None = None) -> None:
    """``reference_for(params)(rng, n)`` draws what the corruption documents and returns make_cifar_c.py's per-image
    function ``(uint8 HWC image, i) -> its value before np.uint8``; ours must match it with the published parameters,
    and not with the next severity's (or ``other``'s)."""
    ours = CORRUPTIONS[name](images, severity, np.random.default_rng(7))
    hwc = images.transpose(0, 2, 3, 1)

    def replay(params):
        fn = reference_for(params)(np.random.default_rng(7), len(hwc))
        return np.stack([np.uint8(fn(img, i)) for i, img in enumerate(hwc)]).transpose(0, 3, 1, 2)

    assert matches(ours, replay(PUBLISHED[name][severity - 1]))
    assert not matches(ours, replay(PUBLISHED[name][(severity if other is None else other - 1) % 5]))


def scipy_clipped_zoom(img, zoom_factor):  # make_cifar_c.py's, with scipy.ndimage.zoom
    h = img.shape[0]
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
    trim_top = (img.shape[0] - h) // 2
    return img[trim_top:trim_top + h, trim_top:trim_top + h]


@pytest.fixture(scope="module")
def imagemagick_motion_blur():
    """make_cifar_c.py's MotionImage: ImageMagick's MagickMotionBlurImage through Wand, on a PNG blob, decoded by
    OpenCV. Needs the system's libMagickWand; .ci/run installs it and sets STRESSLAB_REQUIRE_IMAGEMAGICK."""
    try:
        from wand.api import library
        from wand.image import Image as WandImage
    except ImportError as e:
        if os.environ.get("STRESSLAB_REQUIRE_IMAGEMAGICK"):
            raise
        pytest.skip(f"ImageMagick's MagickWand is not installed: {e}")
    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)

    def blur(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
        png = io.BytesIO()
        Image.fromarray(img).save(png, format="PNG")
        with WandImage(blob=png.getvalue()) as wand:
            library.MagickMotionBlurImage(wand.wand, radius, sigma, angle)
            return cv2.imdecode(np.frombuffer(wand.make_blob(), np.uint8), cv2.IMREAD_UNCHANGED)

    return blur


@pytest.mark.parametrize("severity", SEVERITIES)
def test_motion_blur_is_imagemagicks(images, severity, imagemagick_motion_blur):
    def reference_for(c):
        def draw(rng, n):
            angles = rng.uniform(-45, 45, size=n)

            def apply(img, i):
                x = imagemagick_motion_blur(img, c[0], c[1], angles[i])
                return np.clip(x[..., [2, 1, 0]], 0, 255) if x.shape != (32, 32) else np.clip(np.array([x, x, x]).transpose((1, 2, 0)), 0, 255)
            return apply
        return draw

    # Severities 3 (radius 6) and 4 (radius 8) share sigma 2: taps 13-16 weigh exp(-13^2 / 8) < 1e-9, so for one angle
    # they are the same image; severity 3's power check is against severity 5.
    assert_replays("motion_blur", images, severity, reference_for, other=5 if severity == 3 else None)
    assert np.array_equal(CORRUPTIONS["motion_blur"](images, severity, np.random.default_rng(7)),
                          np.stack([np.uint8(reference_for(PUBLISHED["motion_blur"][severity - 1])(np.random.default_rng(7), len(images))(img, i))
                                    for i, img in enumerate(images.transpose(0, 2, 3, 1))]).transpose(0, 3, 1, 2))  # equal to the last level


@pytest.mark.parametrize("severity", SEVERITIES)
def test_snow_is_the_reference_with_imagemagicks_streaks(images, severity, imagemagick_motion_blur):
    def reference_for(c):
        def draw(rng, n):
            layers, angles = rng.normal(size=(n, 32, 32), loc=c[0], scale=c[1]), rng.uniform(-135, -45, size=n)

            def apply(img, i):
                x = np.array(img, dtype=np.float32) / 255.
                snow_layer = scipy_clipped_zoom(layers[i][..., np.newaxis], c[2])
                snow_layer[snow_layer < c[3]] = 0
                flakes = (np.clip(snow_layer.squeeze(), 0, 1) * 255).astype(np.uint8)
                snow_layer = imagemagick_motion_blur(flakes, c[4], c[5], angles[i]) / 255.
                snow_layer = snow_layer[..., np.newaxis]
                x = c[6] * x + (1 - c[6]) * np.maximum(x, cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(32, 32, 1) * 1.5 + 0.5)
                return np.clip(x + snow_layer + np.rot90(snow_layer, k=2), 0, 1) * 255
            return apply
        return draw

    assert_replays("snow", images, severity, reference_for)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_glass_blur_moves_pixels_as_the_reference_loop_does(images, severity):
    def reference_for(c):
        def draw(rng, n):
            places = len(range(32 - c[1], c[1], -1)) ** 2
            deltas = rng.integers(-c[1], c[1], size=(c[2], places, n, 2))

            def apply(img, i):
                x = np.uint8(filters.gaussian(np.array(img) / 255., sigma=c[0], channel_axis=-1) * 255)
                for it in range(c[2]):
                    step = iter(deltas[it, :, i])
                    for h in range(32 - c[1], c[1], -1):
                        for w in range(32 - c[1], c[1], -1):
                            dx, dy = next(step)
                            h_prime, w_prime = h + dy, w + dx
                            x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]  # the reference's line, views and all
                return np.clip(filters.gaussian(x / 255., sigma=c[0], channel_axis=-1), 0, 1) * 255
            return apply
        return draw

    assert_replays("glass_blur", images[:8], severity, reference_for)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_zoom_blur_averages_scipy_zooms(images, severity):
    def ref(factors):
        def apply(img):
            x = img.astype(np.float32)
            out = np.zeros_like(x)
            for zoom_factor in factors:
                out += scipy_clipped_zoom(x, zoom_factor)
            return (x + out) / (len(factors) + 1)
        return apply

    assert_matches("zoom_blur", images, severity, ref)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_frost_blends_a_crop_of_the_frost_pictures(images, severity):
    pictures = [cv2.imread(str(FROST_DIR / f"frost{k}.png")) for k in range(1, 6)]  # BGR, as cv2.imread gives the reference

    def reference_for(c):
        def draw(rng, n):
            which = rng.integers(5, size=n)
            tops = rng.integers(0, [pictures[k].shape[0] - 32 for k in which])
            lefts = rng.integers(0, [pictures[k].shape[1] - 32 for k in which])

            def apply(img, i):
                frost = pictures[which[i]][tops[i]:tops[i] + 32, lefts[i]:lefts[i] + 32][..., [2, 1, 0]]
                return np.clip(c[0] * np.array(img) + c[1] * frost, 0, 255)
            return apply
        return draw

    assert_replays("frost", images, severity, reference_for)
    assert [p.shape[:2] for p in pictures] == [(120, 180), (63, 112), (63, 112), (70, 105), (99, 132)]  # make_cifar_c.py's 0.2 x the originals


@pytest.mark.parametrize("severity", SEVERITIES)
def test_elastic_transform_is_the_reference_warp(images, severity):
    def reference_for(c):
        def draw(rng, n):
            moves = rng.uniform(-c[2], c[2], size=(n, 3, 2)).astype(np.float32)
            fields_x, fields_y = rng.uniform(-1, 1, size=(n, 32, 32)), rng.uniform(-1, 1, size=(n, 32, 32))

            def apply(img, i):
                image = np.array(img, dtype=np.float32) / 255.
                shape = image.shape
                shape_size = shape[:2]
                center_square = np.float32(shape_size) // 2
                square_size = min(shape_size) // 3
                pts1 = np.float32([center_square + square_size, [center_square[0] + square_size, center_square[1] - square_size],
                                   center_square - square_size])
                pts2 = pts1 + moves[i]
                M = cv2.getAffineTransform(pts1, pts2)
                image = cv2.warpAffine(image, M, shape_size[::-1], borderMode=cv2.BORDER_REFLECT_101)
                dx = (filters.gaussian(fields_x[i], c[1], mode='reflect', truncate=3) * c[0]).astype(np.float32)
                dy = (filters.gaussian(fields_y[i], c[1], mode='reflect', truncate=3) * c[0]).astype(np.float32)
                dx, dy = dx[..., np.newaxis], dy[..., np.newaxis]
                x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
                indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
                return np.clip(ndimage.map_coordinates(image, indices, order=1, mode='reflect').reshape(shape), 0, 1) * 255
            return apply
        return draw

    assert_replays("elastic_transform", images, severity, reference_for)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_spatter_is_the_reference_water_and_mud(images, severity):
    def reference_for(c):
        def draw(rng, n):
            layers = rng.normal(size=(n, 32, 32), loc=c[0], scale=c[1])

            def apply(img, i):
                x = np.array(img, dtype=np.float32) / 255.
                liquid_layer = filters.gaussian(layers[i], sigma=c[2])
                liquid_layer[liquid_layer < c[3]] = 0
                if c[5] == 0:
                    liquid_layer = (liquid_layer * 255).astype(np.uint8)
                    dist = 255 - cv2.Canny(liquid_layer, 50, 150)
                    dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
                    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
                    dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
                    dist = cv2.equalizeHist(dist)
                    ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
                    dist = cv2.filter2D(dist, cv2.CV_8U, ker)
                    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
                    m = cv2.cvtColor(liquid_layer * dist, cv2.COLOR_GRAY2BGRA)
                    m /= np.max(m, axis=(0, 1))
                    m *= c[4]
                    color = np.concatenate((175 / 255. * np.ones_like(m[..., :1]), 238 / 255. * np.ones_like(m[..., :1]),
                                            238 / 255. * np.ones_like(m[..., :1])), axis=2)
                    color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
                    x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
                    return cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255
                m = np.where(liquid_layer > c[3], 1, 0)
                m = filters.gaussian(m.astype(np.float32), sigma=c[4])
                m[m < 0.8] = 0
                color = np.concatenate((63 / 255. * np.ones_like(x[..., :1]), 42 / 255. * np.ones_like(x[..., :1]),
                                        20 / 255. * np.ones_like(x[..., :1])), axis=2)
                color *= m[..., np.newaxis]
                x *= (1 - m[..., np.newaxis])
                return np.clip(x + color, 0, 1) * 255
            return apply
        return draw

    assert_replays("spatter", images, severity, reference_for)
