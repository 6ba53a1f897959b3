"""Figures over every run: training curves, test metrics, per-class accuracy, the worst classes, and a Grad-CAM
gallery of chosen classes."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analysis import GALLERY_CLASSES, gradcam, photos
from analysis.runs import ImageCache, RunRecord, load_model
from config.errors import InputError
from data_zoo.loader import normalise
from tracking import metrics, plots

if TYPE_CHECKING:
    from analysis.failures import RunAnalysis


def sweep_figures(analyses: list[RunAnalysis], out: Path) -> dict[str, Path]:
    """Curves overlaid, metrics bar, per-class accuracy and the worst classes."""
    runs = [a.run for a in analyses]
    figures = {"curves": plots.plot_curves({r.name: r.history for r in runs}, out / "training_curves.png")}
    keys = (metrics.TEST_ACC, metrics.TEST_PRECISION, metrics.TEST_RECALL, metrics.TEST_F1)
    figures["metrics"] = plots.plot_bars({r.name: {k.split("/")[1]: r.metrics.get(k, np.nan) for k in keys} for r in runs}, out / "metrics.png", "test metrics")
    per_class = {r.name: {c: float(r.predictions.correct[r.predictions.labels == k].mean()) for k, c in enumerate(r.predictions.classes)} for r in runs}
    figures["per_class"] = plots.plot_bars(per_class, out / "per_class_accuracy.png", "per-class test accuracy", "accuracy")
    mean_acc = {c: float(np.mean([v[c] for v in per_class.values()])) for c in next(iter(per_class.values()))}
    worst = dict(sorted(mean_acc.items(), key=lambda kv: kv[1])[:10])
    figures["worst"] = plots.plot_bars({"mean over runs": worst}, out / "worst_classes.png", "worst classes (mean accuracy over runs)", "accuracy")
    return figures


def gallery_classes(run: RunRecord, wanted: tuple[str, ...] | None) -> list[str]:
    """The gallery's classes: ``wanted`` (each must be a class of the data set: InputError naming the known ones), or
    seed 004's where the data set has them (CIFAR-10), else its first five."""
    classes = run.predictions.classes
    if wanted is None:
        return [c for c in GALLERY_CLASSES if c in classes] or classes[:5]
    if unknown := [c for c in wanted if c not in classes]:
        raise InputError(f"--classes: {', '.join(map(repr, unknown))} not a class of this data set; its classes: {', '.join(classes)}")
    return list(wanted)


def class_gallery(run: RunRecord, images: ImageCache, out: Path, layers: dict[str, str], chosen: list[str], per_class: int = 4) -> Path | None:
    """Grad-CAM of the predicted class for the first test images of each chosen class."""
    from model_zoo import gradcam_target

    pred = run.predictions
    x, mean, std = images.get(run)
    pos = np.concatenate([np.flatnonzero(pred.labels == pred.classes.index(c))[:per_class] for c in chosen])
    model = load_model(run)
    cams = gradcam.compute_cams(model, gradcam_target(model, run.config["arch"], layers.get(run.config["arch"])), normalise(x[pos], mean, std), pred.preds[pos])
    titles = [f"#{pred.index[p]} {pred.classes[pred.labels[p]]} (pred {pred.classes[pred.preds[p]]} {pred.confidence[p]:.2f})" for p in pos]
    return photos.cam_figure(x[pos], {"Grad-CAM: predicted": cams}, titles, out / "class_gallery.webp")
