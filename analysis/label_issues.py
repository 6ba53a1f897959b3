"""Label-error candidates among the test images: confident learning (Northcutt et al. 2021, the ``cleanlab`` package)
on the mean test-set probabilities of every run of the sweep.

Out-of-sample by construction: no run trained on the test set. A confident failure that (nearly) every run makes is
often a wrong or ambiguous label rather than a model failure; the report counts failures both ways.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis import log, photos
from analysis.persistent import failure_matrix
from analysis.runs import ImageCache, RunRecord

# Confident learning's per-class thresholds are the models' mean self-confidence, so weak models make it flag widely
# (6 quick-experiment runs at ~60% accuracy: 2,417 of CIFAR-10's 10,000 test images flagged); Northcutt et al. used
# models near 95%. Below this accuracy of the runs' mean prediction the report says the count is not to be trusted.
WEAK_ENSEMBLE_ACCURACY = 0.85
METHOD = ("flagged by cleanlab.filter.find_label_issues (confident learning, prune_by_noise_rate) on the mean softmax of {runs} runs, "
          "ranked by cleanlab.rank.get_label_quality_scores (self_confidence: the mean probability of the given label)")


def label_issues(runs: list[RunRecord], threshold: float, listed: int = 100) -> dict:
    """The test images ranked by label quality (lowest first: most likely mislabelled), at least ``listed`` of them and
    every one confident learning flags: position, test index, given and suggested label, quality score, ``flagged``
    and how many runs fail the image with confidence above ``threshold``. ``count``: how many are flagged;
    ``ensemble_accuracy``: how often the runs' mean prediction is the given label (``weak_ensemble`` below
    WEAK_ENSEMBLE_ACCURACY, where the count over-flags)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    p = runs[0].predictions
    _, failing = failure_matrix(runs, threshold)  # also refuses runs evaluated on other test images
    probs = np.mean([run.predictions.probs for run in runs], axis=0)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax averaged: renormalised to the sum cleanlab checks
    quality = get_label_quality_scores(p.labels, probs, method="self_confidence")
    # n_jobs=1: cleanlab's default forks a multiprocessing pool, which deadlocked in a process running Ray's and
    # torch's threads (CI hung in Pool.terminate); one process takes well under a second for 10,000 images.
    flagged = set(find_label_issues(p.labels, probs, filter_by="prune_by_noise_rate", n_jobs=1).nonzero()[0].tolist())
    ranked = sorted(set(np.argsort(quality, kind="stable")[:listed].tolist()) | flagged, key=lambda q: (quality[q], q))
    failing = failing.sum(0)
    suggested = probs.argmax(1)
    candidates = [{"position": int(q), "test_index": int(p.index[q]), "flagged": q in flagged, "given_label": int(p.labels[q]),
                   "given_class": p.classes[p.labels[q]], "suggested_label": int(suggested[q]), "suggested_class": p.classes[suggested[q]],
                   "quality": round(float(quality[q]), 6), "mean_prob_given": round(float(probs[q, p.labels[q]]), 6),
                   "mean_prob_suggested": round(float(probs[q, suggested[q]]), 6), "runs_failing_confidently": int(failing[q])} for q in ranked]
    accuracy = float((suggested == p.labels).mean())
    return {"method": METHOD.format(runs=len(runs)), "runs": len(runs), "test_images": int(len(p.labels)), "threshold": threshold,
            "count": len(flagged), "ensemble_accuracy": round(accuracy, 6), "weak_ensemble": accuracy < WEAK_ENSEMBLE_ACCURACY,
            "candidates": candidates}


def weak_ensemble_warning(result: dict) -> str:
    """What the count is worth when the runs are weak ('' otherwise, and for results written before the check)."""
    if not result.get("weak_ensemble"):
        return ""
    return (f"The runs' mean prediction is right on only {result['ensemble_accuracy']:.1%} of the test images (below "
            f"{WEAK_ENSEMBLE_ACCURACY:.0%}): confident learning's thresholds are the models' own mean confidences, so with weak "
            f"models it flags many correctly labelled images. Do not read this count as the data set's label errors; the "
            f"ranking (lowest quality first) still orders the candidates.")


def flagged_indices(result: dict | None) -> set[int]:
    """Test indices flagged as likely label errors (empty without a result)."""
    return {c["test_index"] for c in result["candidates"] if c["flagged"]} if result else set()


def label_issues_step(runs: list[RunRecord], images: ImageCache, out: Path, threshold: float, shown: int = 24) -> dict | None:
    """label_issues.json: the test images most likely mislabelled (cleanlab on the runs' mean probabilities), and a grid of
    the top ``shown`` with the given and the suggested label."""
    try:
        result = label_issues(runs, threshold)
    except ValueError as err:  # e.g. a class absent from the test labels
        log(f"label issues skipped: {err}")
        return None
    (out / "label_issues.json").write_text(json.dumps(result, indent=1))
    top = [c for c in result["candidates"] if c["flagged"]][:shown]
    if top:
        x, _, _ = images.get(runs[0])
        titles = [f"#{c['test_index']} given {c['given_class']}, suggested {c['suggested_class']} ({c['quality']:.2f})" for c in top]
        result["figure"] = photos.image_grid(x[[c["position"] for c in top]], titles, out / "label_issues.webp")
    log(f"label issues: {result['count']} of {result['test_images']} test images flagged as likely mislabelled (the runs' mean prediction "
        f"{result['ensemble_accuracy']:.1%} right" + ("; too weak for this count to be trusted)" if result["weak_ensemble"] else ")"))
    return result
