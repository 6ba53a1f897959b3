"""High-confidence failures and the measurable cues that group them into categories.

Every category states the number it rests on; none is canned text.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from analysis.runs import Predictions

CENTRE = 16  # side of the central square (pixels of 32) against which border CAM mass is measured
UNIFORM_BORDER = 1 - (CENTRE / 32) ** 2  # a CAM spread evenly puts this much mass on the border


def mine_failures(pred: Predictions, threshold: float) -> list[dict]:
    """Misclassified test images with confidence > ``threshold``, most confident first."""
    order = np.argsort(-pred.probs, axis=1)
    top, second = pred.probs[np.arange(len(pred.labels)), order[:, 0]], pred.probs[np.arange(len(pred.labels)), order[:, 1]]
    wrong = np.flatnonzero(~pred.correct & (pred.confidence > threshold))
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
