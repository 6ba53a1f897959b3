"""High-confidence failures and the measurable cues that group them into categories.

Every category states the number it rests on; none is canned text.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from analysis import ROAD_IMAGES, gradcam, photos
from analysis.attacks import adversarial_run
from analysis.runs import ImageCache, Predictions, RunRecord, load_model
from config.settings import TrialConfig
from data_zoo.loader import normalise
from tracking import plots

CENTRE = 16  # side of the central square (pixels of 32) against which border CAM mass is measured
UNIFORM_BORDER = 1 - (CENTRE / 32) ** 2  # a CAM spread evenly puts this much mass on the border
SHOWN = 24  # failures per run the report shows (the grid) and failures.json lists; the full list goes to MLflow


def mine_failures(pred: Predictions, threshold: float) -> list[dict]:
    """Misclassified test images with confidence > ``threshold``, most confident first."""
    order = np.argsort(-pred.probs, axis=1)
    top, second = pred.probs[np.arange(len(pred.labels)), order[:, 0]], pred.probs[np.arange(len(pred.labels)), order[:, 1]]
    wrong = np.flatnonzero(pred.confident_failures(threshold))
    failures = [
        {
            "test_index": int(pred.index[i]),
            "position": int(i),
            "true_label": int(pred.labels[i]),
            "predicted_label": int(pred.preds[i]),
            "true_class": pred.classes[pred.labels[i]],
            "predicted_class": pred.classes[pred.preds[i]],
            "confidence": float(top[i]),
            "margin": float(top[i] - second[i]),
            "true_class_prob": float(pred.probs[i, pred.labels[i]]),
        }
        for i in wrong
    ]
    return sorted(failures, key=lambda f: (-f["confidence"], f["test_index"]))


def confusion_pairs(failures: list[dict]) -> list[tuple[str, str, int]]:
    """(true, predicted, count) of the failures, most frequent first."""
    counts = Counter((f["true_class"], f["predicted_class"]) for f in failures)
    return sorted(((t, p, n) for (t, p), n in counts.items()), key=lambda x: (-x[2], x[0], x[1]))


def border_fraction(cams: np.ndarray, centre: int = CENTRE) -> np.ndarray:
    """Share of each CAM's mass outside the central ``centre`` x ``centre`` square (NaN for an all-zero map, which
    points nowhere: Grad-CAM gives one when no activation raises the class score)."""
    h, w = cams.shape[-2:]
    top, left = (h - centre) // 2, (w - centre) // 2
    total = cams.sum(axis=(-2, -1))
    inner = cams[..., top : top + centre, left : left + centre].sum(axis=(-2, -1))
    return np.divide(total - inner, total, out=np.full(total.shape, np.nan), where=total > 0)


def nearer_colour(colours: np.ndarray, class_colours: np.ndarray, own: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Whether each image's mean colour is nearer class ``other``'s mean colour than its own class's."""
    return np.linalg.norm(colours - class_colours[other], axis=1) < np.linalg.norm(colours - class_colours[own], axis=1)


def colour_chance(colours: np.ndarray, labels: np.ndarray, class_colours: np.ndarray) -> float:
    """The share a random image and a random wrong class give: image colour nearer that class's mean than its own's."""
    k = len(class_colours)
    hits = [nearer_colour(colours, class_colours, labels, np.full_like(labels, j))[labels != j].mean() for j in range(k)]
    return float(np.mean(hits))


def mean_colours(images: np.ndarray) -> np.ndarray:
    """Mean RGB of each uint8 image (N, 3)."""
    return images.reshape(len(images), 3, -1).mean(-1)


@dataclass
class Category:
    """A group of failures, the rule that defines it, and the number it rests on."""

    name: str
    evidence: str
    test_indices: list[int]


def categorize(failures: list[dict], n_classes: int, cam_border: dict[int, float] | None = None,
               colours: np.ndarray | None = None, class_colours: np.ndarray | None = None, chance: dict[str, float] | None = None) -> list[Category]:
    """Group failures by measured cues: dominant confusion pairs, context reliance, colour match, ignored truth.

    Each category states its chance baseline: ``chance`` holds the same cue measured on reference images (border:
    the share of Grad-CAMs of randomly drawn test images over the uniform share; colour: a random image against a
    random wrong class; ruled_out: the share among all of the run's errors)."""
    n, chance = len(failures), chance or {}
    if not n:
        return []
    out = []
    for true, predicted, count in confusion_pairs(failures)[:3]:
        expected = n / (n_classes * (n_classes - 1))
        if count >= max(2, 3 * expected):
            ids = [f["test_index"] for f in failures if (f["true_class"], f["predicted_class"]) == (true, predicted)]
            out.append(Category(f"confusion {true} -> {predicted}", f"{count} of {n} failures ({count / n:.0%}); "
                                f"{expected:.1f} expected if errors spread evenly over class pairs", ids))
    if cam_border:
        values = {i: v for i, v in cam_border.items() if v == v}  # NaN: an all-zero map, counted apart
        ids = [f["test_index"] for f in failures if values.get(f["test_index"], 0) > UNIFORM_BORDER]
        if ids:
            zero = len(cam_border) - len(values)
            base = f"; chance: {chance['border']:.0%} of the Grad-CAMs of randomly drawn test images do" if "border" in chance else ""
            out.append(Category("context / background reliance", f"{len(ids)} of {len(values)} explained failures ({len(ids) / len(values):.0%}) put more "
                                f"Grad-CAM mass on the border than a uniform map would ({UNIFORM_BORDER:.0%}){base}; mean border share "
                                f"{np.mean(list(values.values())):.0%}" + (f"; {zero} all-zero maps not counted" if zero else ""), ids))
    if colours is not None and class_colours is not None:
        own, other = np.array([f["true_label"] for f in failures]), np.array([f["predicted_label"] for f in failures])
        ids = [f["test_index"] for f, hit in zip(failures, nearer_colour(colours, class_colours, own, other)) if hit]
        if ids:
            base = f"; chance: {chance['colour']:.0%} for a random image and a random wrong class" if "colour" in chance else ""
            out.append(Category("colour closer to the predicted class", f"{len(ids)} of {n} failures ({len(ids) / n:.0%}) have a mean colour nearer the "
                                f"predicted class's mean test image colour than their own class's{base}", ids))
    ignored = [f["test_index"] for f in failures if f["true_class_prob"] < 0.01]
    if ignored:
        base = f"; {chance['ruled_out']:.0%} of all of the run's errors do" if "ruled_out" in chance else ""
        out.append(Category("true class all but ruled out", f"{len(ignored)} of {n} failures ({len(ignored) / n:.0%}) give the true class < 1% probability{base}", ignored))
    return out


@dataclass(frozen=True)
class RunSettings:
    """What every run's analysis is given (picklable: it travels to the worker processes)."""

    threshold: float
    layers: dict[str, str]
    max_cams: int
    road_images: int = ROAD_IMAGES
    label_errors: frozenset[int] = frozenset()
    adversarial_images: int = TrialConfig.adversarial_images  # the trials' defaults
    pgd_steps: int = TrialConfig.adversarial_steps
    pgd_step_size: float = TrialConfig.adversarial_step_size


@dataclass
class RunAnalysis:
    """What the analysis learned about one run."""

    run: RunRecord
    failures: list[dict]
    categories: list[Category]
    layer: str
    resolution: tuple[int, int]
    road: dict[str, float] = field(default_factory=dict)  # mean ROAD of Grad-CAM and of the reference maps, on the same images
    figures: dict[str, Path] = field(default_factory=dict)
    adversarial: dict | None = None  # accuracy under FGSM and PGD per epsilon (adversarial.robust_accuracy)

    @property
    def failures_excluding_label_errors(self) -> list[dict]:
        return [f for f in self.failures if not f.get("likely_label_error")]


def road_positions(n_test: int, n_images: int, seed: int = 0) -> np.ndarray:
    """The test positions ROAD is measured on: a seeded draw, the same for every run on the same data."""
    return np.sort(np.random.default_rng(seed).choice(n_test, min(n_images, n_test), replace=False))


def road_step(model, target, x: np.ndarray, mean, std, pred, n_images: int) -> tuple[dict[str, float], np.ndarray]:
    """Mean ROAD of the predicted-class Grad-CAM and of the reference maps on ``n_images`` seeded test images; also
    the Grad-CAM border shares there (the chance baseline of the context category)."""
    pos = road_positions(len(pred.labels), n_images)
    if not len(pos):
        return {}, np.zeros(0)
    inputs, classes = normalise(x[pos], mean, std), pred.preds[pos]
    cams = gradcam.compute_cams(model, target, inputs, classes)
    maps = {"Grad-CAM": cams, **gradcam.reference_maps(len(pos), cams.shape[-1])}
    road = {name: float(gradcam.faithfulness(model, inputs, m, classes).mean()) for name, m in maps.items()}
    return road | {"images": len(pos)}, border_fraction(cams)


def analyse_run(run: RunRecord, images: ImageCache, out: Path, settings: RunSettings) -> RunAnalysis:
    """Failures (each marked whether its test image is a likely label error), Grad-CAM and categories of one run; writes
    failures.json (counts, categories and the SHOWN most confident failures, as the page shows them; the full list is
    ``RunAnalysis.failures``, logged as the analysis run's ``tables/failures.json``) and its figures."""
    from model_zoo import gradcam_target

    threshold, max_cams = settings.threshold, settings.max_cams
    pred = run.predictions
    found = mine_failures(pred, threshold)
    for f in found:
        f["likely_label_error"] = f["test_index"] in settings.label_errors
    x, mean, std = images.get(run)
    model = load_model(run)
    layer = settings.layers.get(run.config["arch"])
    target = gradcam_target(model, run.config["arch"], layer)
    layer_name = layer or next(n for n, m in model.named_modules() if m is target)
    explained = found[:max_cams]
    pos = np.array([f["position"] for f in explained], dtype=int)
    inputs = normalise(x[pos], mean, std)
    cams_pred = gradcam.compute_cams(model, target, inputs, [f["predicted_label"] for f in explained])
    cams_true = gradcam.compute_cams(model, target, inputs, [f["true_label"] for f in explained])
    border = dict(zip((f["test_index"] for f in explained), border_fraction(cams_pred).tolist()))
    shown = min(8, len(explained))
    road, reference_border = road_step(model, target, x, mean, std, pred, settings.road_images)
    scores = gradcam.faithfulness(model, inputs[:shown], cams_pred[:shown], [f["predicted_label"] for f in explained[:shown]])
    image_colours = mean_colours(x)
    class_colours = np.stack([image_colours[pred.labels == k].mean(0) for k in range(len(pred.classes))])
    chance = {"colour": colour_chance(image_colours, pred.labels, class_colours),
              "ruled_out": float((pred.probs[~pred.correct, pred.labels[~pred.correct]] < 0.01).mean()) if (~pred.correct).any() else 0.0}
    if np.isfinite(reference_border).any():
        chance["border"] = float((reference_border[np.isfinite(reference_border)] > UNIFORM_BORDER).mean())
    colours = image_colours[[f["position"] for f in found]] if found else None
    categories = categorize(found, len(pred.classes), border, colours, class_colours, chance)
    for f in explained:
        f["cam_border_share"] = None if border[f["test_index"]] != border[f["test_index"]] else round(border[f["test_index"]], 4)
    for f, score in zip(explained, scores):
        f["road_score"] = round(float(score), 4)
    result = RunAnalysis(run, found, categories, layer_name, gradcam.layer_resolution(model, target), road=road)
    folder = out / "runs" / run.slug
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failures.json").write_text(json.dumps({
        "run_id": run.run_id, "run_name": run.name, "threshold": threshold, "count": len(found),
        "count_excluding_likely_label_errors": len(result.failures_excluding_label_errors),
        "gradcam_layer": layer_name, "gradcam_resolution": list(result.resolution), "road": road, "chance": chance,
        "categories": [asdict(c) for c in categories], "listed": min(SHOWN, len(found)), "failures": found[:SHOWN]}, indent=1))
    titles = [f"#{f['test_index']} {f['true_class']}->{f['predicted_class']} {f['confidence']:.2f}" for f in found[:SHOWN]]
    road_titles = [t + (f"\nROAD {f['road_score']:+.2f}" if "road_score" in f else "") for t, f in zip(titles, found)]
    if found:
        result.figures["failures"] = photos.image_grid(x[[f["position"] for f in found[:SHOWN]]], titles, folder / "failures_grid.webp")
    if shown:  # none with --max-cams 0
        result.figures["gradcam"] = photos.cam_figure(x[pos[:shown]], {"Grad-CAM: predicted": cams_pred[:shown], "Grad-CAM: true class": cams_true[:shown]},
                                                       road_titles[:shown], folder / "gradcam_failures.webp")
    confusion = np.bincount(pred.labels * len(pred.classes) + pred.preds, minlength=len(pred.classes) ** 2).reshape(len(pred.classes), -1)
    result.figures["confusion"] = plots.plot_confusion(confusion, pred.classes, folder / "confusion_matrix.png", title=run.name)
    if settings.adversarial_images > 0:
        result.adversarial, figure = adversarial_run(model, target, x, mean, std, pred, settings, folder, run.trial_adversarial)
        if figure:
            result.figures["adversarial"] = figure
    return result
