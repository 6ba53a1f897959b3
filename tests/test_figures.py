"""The report's photographic grids: every image drawn whole where the layout says, every title legible (no text runs
into another title, into an image or past its cell), heat maps where the CAM is high, written as WebP."""
import numpy as np
import pytest
from PIL import Image

from analysis import photos

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
LEFT_HOT = np.repeat(np.r_[np.ones(16), np.zeros(16)][None, None], 32, 1).repeat(7, 0).astype(np.float32)  # CAM 1 on the left half
ROAD_TITLES = ["#1234 automobile->truck 0.97\nROAD +0.12", "#8134 airplane->automobile 1.00\nROAD +0.36", "#98 cat->dog 0.91\nROAD -0.05", "#7 horse->deer 0.93"]


def cam_figure(path):
    """A Grad-CAM figure of failures, whose titles carry a ROAD score (the case that once ran into the column headers)."""
    return photos.cam_figure(IMAGES[:4], {"Grad-CAM: predicted": LEFT_HOT[:4], "Grad-CAM: true class": LEFT_HOT[:4]}, ROAD_TITLES, path)


def label_issue_grid(path):
    """A grid of label issues, whose titles are the longest the report writes."""
    return photos.image_grid(IMAGES, [f"#{1000 + i} given automobile, suggested truck (0.0{i})" for i in range(7)], path)


def drawn(monkeypatch, draw, path):
    """What ``draw`` composed (the pixels before encoding, and the layout) and the file it wrote."""
    seen, compose = {}, photos.compose

    def keep(rows):
        seen["rows"], (seen["canvas"], seen["layout"]) = rows, compose(rows)
        return seen["canvas"], seen["layout"]

    monkeypatch.setattr(photos, "compose", keep)
    return seen, draw(path)


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("draw", [cam_figure, label_issue_grid])
def test_titles_wrap_within_their_cell_and_touch_no_other_title_or_image(monkeypatch, tmp_path, draw):
    seen, path = drawn(monkeypatch, draw, tmp_path / "figure.png")
    canvas, layout = seen["canvas"], seen["layout"]
    assert path == tmp_path / "figure.webp" and Image.open(path).format == "WEBP" and Image.open(path).size == canvas.shape[1::-1]
    cells = [cell for row in seen["rows"] for cell in row]
    assert any(len(cell.lines) > 1 for cell in cells)  # something had to wrap
    assert len(layout.titles) >= 3
    ink = (canvas < 200).any(axis=2)  # dark pixels: glyphs (the background is white)
    for box in layout.images:
        ink[box[1] : box[3], box[0] : box[2]] = False
    for i, box in enumerate(layout.titles):
        assert ink[box[1] : box[3], box[0] : box[2]].any(), f"title box {box} is empty"
        ink[box[1] : box[3], box[0] : box[2]] = False
        assert not any(overlaps(box, other) for other in layout.titles[i + 1 :] + layout.images), f"title box {box} overlaps"
    assert not ink.any(), f"{ink.sum()} dark pixels outside every title and image, e.g. at {np.argwhere(ink)[0]}"


@pytest.mark.parametrize("draw", [cam_figure, label_issue_grid])
def test_every_photograph_is_drawn_whole_as_5x5_blocks_of_its_pixels(monkeypatch, tmp_path, draw):
    seen, _ = drawn(monkeypatch, draw, tmp_path / "figure.webp")
    canvas, boxes = seen["canvas"], seen["layout"].images
    per_row = len(seen["rows"][0])
    photographs = boxes[::per_row] if draw is cam_figure else boxes  # a Grad-CAM row: the photograph, then its overlays
    for image, (x0, y0, x1, y1) in zip(IMAGES, photographs):
        assert np.array_equal(canvas[y0:y1, x0:x1], np.kron(image.transpose(1, 2, 0), np.ones((5, 5, 1), np.uint8)))


def test_the_heat_map_is_red_where_the_cam_is_high_and_blue_where_it_is_low(monkeypatch, tmp_path):
    """The CAM is 1 on each image's left half and 0 on its right half: jet red over the left, jet blue over the right."""
    seen, _ = drawn(monkeypatch, cam_figure, tmp_path / "figure.webp")
    canvas, boxes = seen["canvas"].astype(int), seen["layout"].images
    for x0, y0, x1, y1 in [b for i, b in enumerate(boxes) if i % 3]:  # the two overlays of each row
        left, right = canvas[y0:y1, x0 : x0 + 60].mean((0, 1)), canvas[y0:y1, x1 - 60 : x1].mean((0, 1))
        assert left[0] > left[2] + 40 and right[2] > right[0] + 40, (left, right)


def test_wrap_breaks_at_spaces_within_the_width_and_keeps_arrows_and_scores_whole():
    lines = photos.wrap("#8134 airplane->automobile 1.00\nROAD +0.36", 160)
    assert lines == ["#8134", "airplane->automobile 1.00", "ROAD +0.36"]
    assert all(photos.font(photos.TITLE_PX).getlength(line) <= 160 for line in lines)
    pieces = photos.wrap("x" * 80, 160)  # one word wider than the cell: broken between characters, nothing lost
    assert len(pieces) > 1 and "".join(pieces) == "x" * 80 and all(photos.font(photos.TITLE_PX).getlength(p) <= 160 for p in pieces)
