"""The report's photographic grids (test images, Grad-CAM overlays, each under its title), composed as pixels.

A cell is an image enlarged by a whole factor (blocks for photographs, bilinear for heat maps) under its title,
wrapped to the image's width with the font's own glyph widths; a row is as tall as its longest title, so no title
runs into another title or into an image. Pillow draws the text in matplotlib's DejaVu Sans (the font of the
report's plots) and writes WebP at quality 80, the heat map as legible as in PNG (docs/gradcam_png_vs_webp.jpg): in
the quick study, a Grad-CAM figure of 8 failures 72-80 KB, a grid of 24 failures 75-100 KB. Composing the pixels
takes 0.1-0.2 s a grid, where matplotlib's axes and constrained layout took 1-2 s.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam.utils.image import show_cam_on_image

SCALE = 5  # a 32x32 CIFAR image is drawn 160 pixels wide
TITLE_PX = 11  # the titles' font size in pixels: a 160-pixel cell holds about 26 characters a line
HEADER_PX = 12  # a column's name (the CAM shown), above its first row
GAP = 6  # pixels between cells, and around the grid
PAD = 2  # pixels between a title and its image


def image_grid(images: np.ndarray, titles: Sequence[str], path: str | Path, columns: int = 6) -> Path:
    """Images (N, 3, H, W uint8) in rows of ``columns``, each under its title (index, truth, prediction, confidence)."""
    cells = [titled(enlarge(image.transpose(1, 2, 0)), title) for image, title in zip(images, titles)]
    return save(compose([cells[i : i + columns] for i in range(0, len(cells), columns)])[0], path)


def cam_figure(images: np.ndarray, columns: dict[str, np.ndarray], titles: Sequence[str], path: str | Path) -> Path:
    """One row per image (N, 3, H, W uint8): the image under its title, then its heat-map overlay for each entry of
    ``columns`` (name -> CAMs, N x H x W in [0, 1]), each column's name above its first row."""
    rows = []
    for r, image in enumerate(images):
        overlays = [titled(enlarge(overlay(image, cams[r]), smooth=True), name if r == 0 else "", HEADER_PX) for name, cams in columns.items()]
        rows.append([titled(enlarge(image.transpose(1, 2, 0)), titles[r]), *overlays])
    return save(compose(rows)[0], path)


@dataclass
class Cell:
    """An image (HWC uint8, at its drawn size) and the lines of its title, drawn ``size`` pixels high."""

    image: np.ndarray
    lines: list[str]
    size: int = TITLE_PX


@dataclass
class Layout:
    """Where compose() drew each image and each title: (x0, y0, x1, y1) pixel boxes, x1 and y1 exclusive."""

    images: list[tuple[int, int, int, int]] = field(default_factory=list)
    titles: list[tuple[int, int, int, int]] = field(default_factory=list)


def titled(image: np.ndarray, title: str, size: int = TITLE_PX) -> Cell:
    return Cell(image, wrap(title, image.shape[1], size), size)


def compose(rows: Sequence[Sequence[Cell]]) -> tuple[np.ndarray, Layout]:
    """The rows on white as one HWC uint8 array, and where each image and title went. A column is as wide as its
    widest image; a row as tall as its tallest title plus its tallest image, the titles standing on their images."""
    widths = [max(row[c].image.shape[1] for row in rows if c < len(row)) for c in range(max(map(len, rows)))]
    heights = [max(map(title_height, row)) + max(cell.image.shape[0] for cell in row) for row in rows]
    xs, ys = np.cumsum([GAP] + [w + GAP for w in widths]), np.cumsum([GAP] + [h + GAP for h in heights])
    canvas = Image.new("RGB", (int(xs[-1]), int(ys[-1])), "white")
    draw, layout = ImageDraw.Draw(canvas), Layout()
    for row, y, height in zip(rows, ys, heights):
        for cell, x in zip(row, xs):
            h, w = cell.image.shape[:2]
            x, top = int(x), int(y + height - h)  # the image's top-left corner
            canvas.paste(Image.fromarray(cell.image), (x, top))
            layout.images.append((x, top, x + w, top + h))
            if cell.lines:
                step, first = line_height(cell.size), top - title_height(cell)
                for k, line in enumerate(cell.lines):
                    draw.text((x, first + k * step), line, fill="black", font=font(cell.size))
                layout.titles.append((x, first, x + w, top - PAD))
    return np.asarray(canvas), layout


def wrap(title: str, width: int, size: int = TITLE_PX) -> list[str]:
    """``title``'s lines, each broken at spaces into lines at most ``width`` pixels wide in the title font (a word
    wider than that on its own is broken between characters): '->' and '+0.12' are never split."""
    fits = lambda text: font(size).getlength(text) <= width
    out: list[str] = []
    for line in title.splitlines():
        current = ""
        for word in line.split():
            candidate = f"{current} {word}" if current else word
            if fits(candidate):
                current = candidate
                continue
            if current:
                out.append(current)
            while len(word) > 1 and not fits(word):
                cut = max([n for n in range(1, len(word)) if fits(word[:n])], default=1)
                out.append(word[:cut])
                word = word[cut:]
            current = word
        out.append(current)
    return [line for line in out if line]


def title_height(cell: Cell) -> int:
    return len(cell.lines) * line_height(cell.size) + PAD if cell.lines else 0


def line_height(size: int) -> int:
    ascent, descent = font(size).getmetrics()
    return ascent + descent


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def enlarge(hwc: np.ndarray, smooth: bool = False) -> np.ndarray:
    """An HWC uint8 image at SCALE times its size: each pixel a block (photographs), or bilinear (heat maps)."""
    if not smooth:
        return hwc.repeat(SCALE, 0).repeat(SCALE, 1)
    h, w = hwc.shape[:2]
    return cv2.resize(np.ascontiguousarray(hwc), (w * SCALE, h * SCALE), interpolation=cv2.INTER_LINEAR)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A uint8 CHW image with its CAM (values in [0, 1]) as pytorch-grad-cam's jet heat map over it (HWC uint8)."""
    return show_cam_on_image(image.transpose(1, 2, 0).astype(np.float32) / 255.0, cam, use_rgb=True)


def save(canvas: np.ndarray, path: str | Path) -> Path:
    """The grid as WebP at quality 80 (lossy, for photographs and heat maps; line plots stay PNG)."""
    path = Path(path).with_suffix(".webp")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, "WEBP", quality=80)
    return path
