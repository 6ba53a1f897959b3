"""Failures that persist across runs: a property of the image (ambiguous, mislabelled), not of one seed.

For every test image, how many runs of an experiment misclassify it with high confidence; the images
(nearly) every run gets confidently wrong are separated from those that depend on seed or setting.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from analysis import photos
from analysis.runs import ImageCache, RunRecord


def failure_matrix(runs: list[RunRecord], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(test indices, bool matrix runs x images): True where that run is confidently wrong."""
    index = runs[0].predictions.index
    rows = []
    for run in runs:
        p = run.predictions
        if not np.array_equal(p.index, index):
            raise ValueError(f"run {run.name} was evaluated on other test images than {runs[0].name}")
        rows.append(p.confident_failures(threshold))
    return index, np.array(rows)


def persistent_counts(runs: list[RunRecord], threshold: float) -> dict[int, int]:
    """Test index -> number of runs that get it confidently wrong (images no run fails are left out)."""
    index, matrix = failure_matrix(runs, threshold)
    counts = matrix.sum(0)
    return {int(i): int(c) for i, c in zip(index, counts) if c}


def split_groups(runs: list[RunRecord], threshold: float, slack: int = 1) -> dict[str, list[int]]:
    """'persistent': failed by at least n_runs - slack runs (and by 2 or more); 'dependent': failed by fewer."""
    counts = persistent_counts(runs, threshold)
    need = max(2, len(runs) - slack)
    persistent = sorted(i for i, c in counts.items() if c >= need)
    return {"persistent": persistent, "dependent": sorted(i for i, c in counts.items() if c < need)}


def fixes_by_setting(runs: list[RunRecord], groups: dict[str, list[int]], key: str) -> dict[str, dict[str, float]]:
    """For each value of setting ``key``: share of each group's images its runs classify correctly."""
    out: dict[str, dict[str, float]] = {}
    position = {int(i): p for p, i in enumerate(runs[0].predictions.index)}
    for value in sorted({r.params.get(key, "?") for r in runs}):
        members = [r for r in runs if r.params.get(key, "?") == value]
        out[value] = {}
        for name, indices in groups.items():
            pos = [position[i] for i in indices]
            out[value][name] = float(np.mean([r.predictions.correct[pos].mean() for r in members])) if pos else float("nan")
    return out


def usual_prediction(runs: list[RunRecord], test_index: int) -> tuple[str, int]:
    """The most common predicted class of one test image across runs, and how many runs predict it."""
    position = int(np.flatnonzero(runs[0].predictions.index == test_index)[0])
    preds = Counter(r.predictions.classes[r.predictions.preds[position]] for r in runs)
    return preds.most_common(1)[0]


def persistent_step(runs: list[RunRecord], images: ImageCache, out: Path, threshold: float, label_errors: frozenset[int] = frozenset()) -> dict | None:
    """Images (nearly) every run gets confidently wrong vs failures that depend on seed or setting; those among them that
    label_issues.json flags as likely label errors."""
    if len(runs) < 2:
        return None
    groups = split_groups(runs, threshold)
    keys = [k for k in ("augment", "arch", "seed") if len({r.params.get(k) for r in runs}) > 1]
    result = {"runs": len(runs), "counts": persistent_counts(runs, threshold), "groups": groups,
              "likely_label_errors": {name: sorted(set(indices) & label_errors) for name, indices in groups.items()},
              "fixes": {k: fixes_by_setting(runs, groups, k) for k in keys}}
    (out / "persistent.json").write_text(json.dumps(result, indent=1))
    shown = groups["persistent"][:24]
    if shown:
        x, _, _ = images.get(runs[0])
        p = runs[0].predictions
        pos = [int(np.flatnonzero(p.index == i)[0]) for i in shown]
        titles = []
        for i, q in zip(shown, pos):
            usual, n = usual_prediction(runs, i)
            titles.append(f"#{i} {p.classes[p.labels[q]]}->{usual} ({result['counts'][i]}/{len(runs)})")
        result["figure"] = photos.image_grid(x[pos], titles, out / "persistent_failures.webp")
    return result
