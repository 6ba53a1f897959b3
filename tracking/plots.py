"""Figures from logged numbers: training curves, confusion matrices, per-class and metric bars.

Uses ``matplotlib.figure.Figure`` directly (no pyplot state), so it is safe inside Ray workers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from tracking import metrics


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_curves(histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train (solid) and val (dashed), one colour per run."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for i, (run, history) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        for ax, (train_key, val_key) in zip(axes, [(metrics.TRAIN_LOSS, metrics.VAL_LOSS), (metrics.TRAIN_ACC, metrics.VAL_ACC)]):
            for key, style in ((train_key, "-"), (val_key, "--")):
                points = history.get(key) or []
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, color=colour, label=f"{run} {key.split('/')[0]}")
    for ax, title in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_attack_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: str | Path, title: str) -> Path:
    """Accuracy against epsilon: one colour per run, one line style per attack (PGD solid, FGSM dashed, others dotted)."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    styles = {"pgd": "-", "fgsm": "--"}
    for i, (run, attacks) in enumerate(curves.items()):
        for attack, points in attacks.items():
            eps, acc = zip(*points)
            ax.plot(eps, acc, styles.get(attack, ":"), marker="o", markersize=3, color=f"C{i % 10}", label=f"{run} {attack}")
    ax.set_xlabel("epsilon (/255, L-inf, pixel space)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class), annotated when classes are few."""
    norm = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    k = len(classes)
    size = min(4 + 0.45 * k, 24)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = np.arange(k)
    ax.set_xticks(ticks, classes if k <= 30 else [""] * k, rotation=90, fontsize=7)
    ax.set_yticks(ticks, classes if k <= 30 else [""] * k, fontsize=7)
    if k <= 20:
        for r in range(k):
            for c in range(k):
                ax.text(c, r, f"{norm[r, c]:.2f}", ha="center", va="center", fontsize=6, color="white" if norm[r, c] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "normalised confusion matrix")
    return _save(fig, path)


def plot_bars(values: Mapping[str, Mapping[str, float]], path: str | Path, title: str, ylabel: str = "") -> Path:
    """Grouped bars: outer keys are series (runs), inner keys are categories (classes or metrics)."""
    series = list(values)
    categories = list(next(iter(values.values()))) if values else []
    fig = Figure(figsize=(max(6, 0.5 * len(categories) * max(1, len(series)) ** 0.5 + 3), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for i, name in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, [values[name].get(c, np.nan) for c in categories], width, label=name)
    ax.set_xticks(x, categories, rotation=60 if len(categories) > 6 else 0, ha="right" if len(categories) > 6 else "center", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_heatmap(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: str | Path, title: str) -> Path:
    """Annotated heat map (values in [0, 1]), rows x columns."""
    fig = Figure(figsize=(2.5 + 1.3 * len(columns), 1.2 + 0.4 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(np.arange(len(columns)), columns, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=7)
    for r in range(len(rows)):
        for c in range(len(columns)):
            ax.text(c, r, f"{matrix[r, c]:.2f}", ha="center", va="center", fontsize=6, color="white" if matrix[r, c] < 0.5 else "black")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
