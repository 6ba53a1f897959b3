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
    """Share of each CAM's mass outside the central ``centre`` x ``centre`` square."""
    h, w = cams.shape[-2:]
    top, left = (h - centre) // 2, (w - centre) // 2
    total = cams.sum(axis=(-2, -1)) + 1e-12
    inner = cams[..., top : top + centre, left : left + centre].sum(axis=(-2, -1))
    return 1 - inner / total


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
               colours: np.ndarray | None = None, class_colours: np.ndarray | None = None) -> list[Category]:
    """Group failures by measured cues: dominant confusion pairs, context reliance, colour match, ignored truth."""
    n = len(failures)
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
        ids = [f["test_index"] for f in failures if cam_border.get(f["test_index"], 0) > UNIFORM_BORDER]
        values = [cam_border[f["test_index"]] for f in failures if f["test_index"] in cam_border]
        if ids:
            out.append(Category("context / background reliance", f"{len(ids)} of {len(values)} explained failures put more Grad-CAM mass on the border "
                                f"than a uniform map would ({UNIFORM_BORDER:.0%}); mean border share {np.mean(values):.0%}", ids))
    if colours is not None and class_colours is not None:
        ids = [f["test_index"] for i, f in enumerate(failures)
               if np.linalg.norm(colours[i] - class_colours[f["predicted_label"]]) < np.linalg.norm(colours[i] - class_colours[f["true_label"]])]
        if ids:
            out.append(Category("colour closer to the predicted class", f"{len(ids)} of {n} failures have a mean colour nearer the predicted "
                                f"class's mean test image colour than their own class's", ids))
    ignored = [f["test_index"] for f in failures if f["true_class_prob"] < 0.01]
    if ignored:
        out.append(Category("true class all but ruled out", f"{len(ignored)} of {n} failures give the true class < 1% probability", ignored))
    return out
