"""Is the confidence honest? Expected calibration error, reliability diagrams, temperature scaling.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) is fitted
on the validation split and reported beside the raw numbers; it is never applied silently.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.special import softmax

from analysis.runs import RunRecord
from tracking import metrics

BINS = 15


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: (mean confidence, accuracy, count)."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bin i holds (i/B, (i+1)/B]
    count = np.bincount(which, minlength=bins)
    conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    acc = np.bincount(which, weights=correct.astype(float), minlength=bins) / np.maximum(count, 1)
    return conf, acc, count


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) x |accuracy - confidence|."""
    conf, acc, count = reliability(probs, labels, bins)
    return float((count / count.sum() * np.abs(acc - conf)).sum())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising validation NLL (LBFGS on log T)."""
    z, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_summary(pred, threshold: float) -> dict:
    """ECE before/after temperature scaling and how the confident-failure count moves with it."""
    out = {"ece": ece(pred.probs, pred.labels), "confident_failures": int(pred.confident_failures(threshold).sum())}
    if pred.logits is None or pred.val_logits is None:
        return out | {"temperature": None}
    t = fit_temperature(pred.val_logits, pred.val_labels)
    scaled = softmax(pred.logits / t, axis=1)
    return out | {"temperature": t, "ece_scaled": ece(scaled, pred.labels),
                  "confident_failures_scaled": int(metrics.confident_errors(scaled, pred.labels, threshold).sum())}


def plot_reliability(items: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """One reliability diagram per run (accuracy vs confidence per bin, the diagonal is perfect)."""
    n = len(items)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).flat
    for ax, (name, (probs, labels)) in zip(axes, items.items()):
        conf, acc, count = reliability(probs, labels)
        centres = (np.arange(BINS) + 0.5) / BINS
        ax.bar(centres, acc, width=1 / BINS, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_title(f"{name}\nECE {ece(probs, labels):.3f}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def calibration_step(runs: list[RunRecord], out: Path, threshold: float) -> tuple[dict, Path]:
    """ECE, temperature fitted on validation, confident failures before/after; reliability diagrams."""
    summary = {r.name: calibration_summary(r.predictions, threshold) for r in runs}
    (out / "calibration.json").write_text(json.dumps(summary, indent=1))
    figure = plot_reliability({r.name: (r.predictions.probs, r.predictions.labels) for r in runs}, out / "reliability.png")
    return summary, figure
