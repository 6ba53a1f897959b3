"""Whether a run's logged results can be judged: what a trial writes, and what its logged model predicts.

The analysis ranks, compares and explains models by their logged metrics and predictions. Anyone who can write to the
store can change them: a predictions file that is not what a trial writes leaves its run out (``find_runs``); metrics
its predictions do not bear out, or predictions the run's own weights do not reproduce on test and validation images
drawn at random, are refused before any work (``verify_runs``), so that no model is judged on results it did not produce.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from config.errors import InputError
from tracking import metrics

if TYPE_CHECKING:
    from analysis.runs import ImageCache, RunRecord

VERIFIED_IMAGES = 128  # test images per run recomputed from its weights: edits to 2% of 10,000 predictions are seen 93 times in 100, to 5% 999 in 1,000
PROB_TOLERANCE = 0.05  # the CPU recomputes in fp32 what the trial computed in fp32 on its device (TF32 off: exact_fp32): rounding, far below this


def predictions_problems(f: Mapping[str, np.ndarray]) -> list[str]:
    """What keeps the arrays of a predictions file (``trainable.finish`` writes them) from being a run's test
    predictions: missing arrays, shapes that do not line up, probabilities that are not a softmax, labels or test indices
    that cannot be. Empty where they can be read as predictions."""
    missing = [k for k in ("probs", "labels", "index", "classes") if k not in f]
    if missing:
        return [f"no {', '.join(missing)} array"]
    probs, labels, index, classes = (np.asarray(f[k]) for k in ("probs", "labels", "index", "classes"))
    if probs.ndim != 2 or probs.shape[1] < 2 or not np.issubdtype(probs.dtype, np.floating):
        return [f"probs is {probs.dtype} of shape {probs.shape}, not floats of shape (images, classes >= 2)"]
    n, k = probs.shape
    out = [f"{name} has shape {a.shape} where probs of shape {probs.shape} needs ({size},)" for name, a, size in (("labels", labels, n), ("index", index, n), ("classes", classes, k))
           if a.shape != (size,)]
    out += [f"{name} is {a.dtype}, not integers" for name, a in (("labels", labels), ("index", index)) if not np.issubdtype(a.dtype, np.integer)]
    if out:
        return out
    if not np.isfinite(probs).all() or (probs < 0).any() or (np.abs(probs.sum(1) - 1) > 1e-3).any():
        out.append("probs are not class probabilities (each row finite, non-negative, summing to 1)")
    if ((labels < 0) | (labels >= k)).any():
        out.append(f"labels outside [0, {k})")
    if (index < 0).any() or len(np.unique(index)) != n:
        out.append("index holds negative or repeated test indices")
    for name, rows in (("logits", n), ("val_logits", None)):
        if name in f and (np.asarray(f[name]).ndim != 2 or np.asarray(f[name]).shape[1] != k or rows not in (None, len(f[name]))
                          or not np.isfinite(f[name]).all()):
            out.append(f"{name} is not finite of shape ({rows or 'images'}, {k})")
    if any(key in f for key in ("val_logits", "val_labels", "val_index")):
        rows = len(f["val_logits"]) if "val_logits" in f else -1
        paired = "val_labels" in f and all(np.asarray(f[key]).shape == (rows,) and np.issubdtype(np.asarray(f[key]).dtype, np.integer)
                                           for key in ("val_labels", "val_index") if key in f)
        if not paired or ((f["val_labels"] < 0) | (f["val_labels"] >= k)).any():
            out.append(f"val_labels and val_index are not labels in [0, {k}) and indices, one per row of val_logits")
    return out


def metric_problems(run: RunRecord) -> list[str]:
    """Where the run's logged metrics say other than its predictions file: ``test/acc`` and ``test/confident_errors``
    against the test predictions, ``val/acc`` (the latest, what runs are ranked by, and every value logged for the tested
    epoch) against the validation logits. The trial computes both sides from the same logits: they differ by rounding
    only, or, where its evaluation is not deterministic (``compile``, ``deterministic: false``), by a near-tie or two."""
    pred, logged, out = run.predictions, run.metrics, []
    if metrics.TEST_ACC in logged and abs(logged[metrics.TEST_ACC] - pred.correct.mean()) > 1e-9:
        out.append(f"its {metrics.TEST_ACC} metric is {logged[metrics.TEST_ACC]:.4f}, its test predictions are right on {pred.correct.mean():.4f}")
    threshold = run.config.get("threshold", metrics.CONFIDENCE_THRESHOLD)  # compared in float32, as the trial did: 0.8 is not float32(0.8)
    made = int(metrics.confident_errors(pred.probs.astype(np.float32), pred.labels, threshold).sum())
    if metrics.TEST_CONFIDENT_ERRORS in logged and logged[metrics.TEST_CONFIDENT_ERRORS] != made:
        out.append(f"its {metrics.TEST_CONFIDENT_ERRORS} metric is {logged[metrics.TEST_CONFIDENT_ERRORS]:g}, its test predictions make {made} above {threshold}")
    history = run.history.get(metrics.VAL_ACC, [])
    if pred.val_logits is None or metrics.VAL_ACC not in logged or not history:
        return out
    val = float((pred.val_logits.argmax(1) == pred.val_labels).mean())
    exact = run.config.get("deterministic", True) and not run.config.get("compile", False)
    slack = 0.5 / len(pred.val_labels) + (0 if exact else 0.005)
    last = max(step for step, _ in history)
    tested = logged.get(metrics.TEST_EPOCH, last)
    if any(v != logged[metrics.VAL_ACC] for step, v in history if step == last):
        out.append(f"its {metrics.VAL_ACC} metric ({logged[metrics.VAL_ACC]:.4f}) is not the one its history logged for epoch {last}")
    if any(abs(v - val) > slack for step, v in history if step == tested):
        values = ", ".join(f"{v:.4f}" for step, v in history if step == tested)
        out.append(f"its {metrics.VAL_ACC} for the tested epoch {tested:g} is {values}, its validation logits are right on {val:.4f}")
    return out


def model_disagreement(model, x: np.ndarray, mean: np.ndarray, std: np.ndarray, logged: np.ndarray, index: np.ndarray, classes: list[str],
                       positions: np.ndarray, what: str) -> str | None:
    """How the model's fp32 class probabilities on the images ``x[positions]`` differ from the ``logged`` ones (rows in
    the order of ``x``; ``index``: their source indices) by more than PROB_TOLERANCE, or None where they agree."""
    import torch

    from data_zoo.loader import normalise

    with torch.inference_mode():
        probs = torch.softmax(model(normalise(x[positions], mean, std)).float(), 1).numpy()
    logged = logged[positions]
    gap = np.abs(probs - logged).max(1)
    if not (gap > PROB_TOLERANCE).any():
        return None
    worst = int(gap.argmax())
    return (f"on {int((gap > PROB_TOLERANCE).sum())} of {len(positions)} {what} images drawn at random its class probabilities differ "
            f"by more than {PROB_TOLERANCE} ({what} image #{int(index[positions[worst]])}: logged {classes[int(logged[worst].argmax())]} at "
            f"{logged[worst].max():.2f}, the model gives {classes[int(probs[worst].argmax())]} at {probs[worst].max():.2f})")


def verify_runs(runs: list[RunRecord], images: ImageCache, n_images: int = VERIFIED_IMAGES, rng: np.random.Generator | None = None) -> None:
    """Check each run's logged metrics against its predictions file (``metric_problems``), and recompute its predictions
    on ``n_images`` test and as many validation images drawn at random (fresh entropy: whoever edits a file cannot know
    which images are checked) from its logged weights; refuse (InputError naming every such run) where they are not the
    logged ones."""
    from scipy.special import softmax

    from analysis.runs import load_model

    rng = rng or np.random.default_rng()
    draw = lambda n: np.sort(rng.choice(n, min(n_images, n), replace=False))
    bad = []
    for run in runs:
        pred, model, (x, mean, std) = run.predictions, load_model(run), images.get(run)
        problems = metric_problems(run)
        problems.append(model_disagreement(model, x, mean, std, pred.probs, pred.index, pred.classes, draw(len(x)), "test"))
        if (val_x := images.validation(run)) is not None:
            problems.append(model_disagreement(model, val_x, mean, std, softmax(pred.val_logits.astype(np.float64), 1), pred.val_index,
                                               pred.classes, draw(len(val_x)), "validation"))
        if problems := [p for p in problems if p]:
            bad.append(f"run {run.name} ({run.run_id}): {'; '.join(problems)}")
    if bad:
        raise InputError("logged results that the runs' own weights and predictions do not make: " + "; ".join(bad) +
                         ". The store was changed after the trials wrote it, or a run's files come from different runs; "
                         "the analysis does not judge a model on results it did not produce")
