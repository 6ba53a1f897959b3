"""The report's photographic grids: every title stays legible (no text runs into another or past its image)."""
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis import gradcam

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
CAMS = RNG.random((7, 32, 32)).astype(np.float32)


def cam_figure(path):
    """A Grad-CAM figure of failures, whose titles carry a ROAD score (the case that ran into the column headers)."""
    titles = ["#1234 automobile->truck 0.97\nROAD +0.12", "#8134 airplane->automobile 1.00\nROAD +0.36", "#98 cat->dog 0.91\nROAD -0.05", "#7 horse->deer 0.93"]
    return gradcam.cam_figure(IMAGES[:4], {"Grad-CAM: predicted": CAMS[:4], "Grad-CAM: true class": CAMS[:4]}, titles, path)


def label_issue_grid(path):
    """A grid of label issues, whose titles are the longest the report writes."""
    titles = [f"#{1000 + i} given automobile, suggested truck (0.0{i})" for i in range(7)]
    return gradcam.image_grid(IMAGES, titles, path)


@pytest.mark.parametrize("draw", [cam_figure, label_issue_grid])
def test_a_photographic_grids_titles_wrap_within_their_image_and_overlap_nothing(monkeypatch, tmp_path, draw):
    """Titles longer than their cell wrap instead of running into the next column's title or the row above, and
    the figure is still written as WebP."""
    drawn, save = {}, gradcam.save_photo

    def measure_then_save(fig, path):
        canvas = FigureCanvasAgg(fig)  # lay the figure out as savefig does, then take every title's box and its axes' box
        canvas.draw()
        renderer = canvas.get_renderer()
        drawn["axes"] = [(ax.get_title(), ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)) for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(gradcam, "save_photo", measure_then_save)
    path = draw(tmp_path / "figure.webp")

    assert path.suffix == ".webp" and path.stat().st_size > 0
    titled = [(text, box, cell) for text, box, cell in drawn["axes"] if text]
    assert len(titled) >= 3 and any("\n" in text for text, _, _ in titled)  # something had to wrap
    for i, (text, box, cell) in enumerate(titled):
        assert cell.x0 - 1 <= box.x0 and box.x1 <= cell.x1 + 1, f"{text!r} is wider than its image"
        for other, other_box, _ in titled[i + 1:]:
            assert not box.overlaps(other_box), f"{text!r} overlaps {other!r}"
        for _, _, image in drawn["axes"]:  # no title reaches into another image (the one of the row above)
            assert image is cell or not box.overlaps(image), f"{text!r} runs into an image"
