"""Whether a run's logged predictions can be judged: what a trial writes, and what its logged model predicts.

The analysis ranks, compares and explains models by their logged test predictions. Anyone who can write to the store
can change that file: one that is not what a trial writes leaves its run out (``find_runs``), and one the run's own
weights do not reproduce on test images drawn at random is refused before any work (``verify_runs``), so that no model
is judged on predictions it did not make.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from config.errors import InputError

if TYPE_CHECKING:
    from analysis.runs import ImageCache, Predictions, RunRecord

VERIFIED_IMAGES = 128  # test images per run recomputed from its weights: edits to 2% of 10,000 predictions are seen 93 times in 100, to 5% 999 in 1,000
PROB_TOLERANCE = 0.05  # the CPU recomputes in fp32 what a GPU may have computed with TF32 convolutions: rounding, far below this


def predictions_problems(f: Mapping[str, np.ndarray]) -> list[str]:
    """What keeps the arrays of a predictions file (``trainable.test_and_log`` writes them) from being a run's test
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
    if ("val_logits" in f) != ("val_labels" in f) or ("val_labels" in f and np.asarray(f["val_labels"]).shape != (len(f["val_logits"]),)):
        out.append("val_logits and val_labels do not come as a pair of the same length")
    return out


def model_disagreement(model, x: np.ndarray, mean: np.ndarray, std: np.ndarray, pred: Predictions, positions: np.ndarray) -> str | None:
    """How the model's fp32 class probabilities on the test images at ``positions`` differ from the logged ones by more
    than PROB_TOLERANCE, or None where they agree."""
    import torch

    from data_zoo.loader import normalise

    with torch.inference_mode():
        probs = torch.softmax(model(normalise(x[positions], mean, std)).float(), 1).numpy()
    logged = pred.probs[positions]
    gap = np.abs(probs - logged).max(1)
    if not (gap > PROB_TOLERANCE).any():
        return None
    worst = int(gap.argmax())
    q, name = positions[worst], pred.classes
    return (f"on {int((gap > PROB_TOLERANCE).sum())} of {len(positions)} test images drawn at random its class probabilities differ by "
            f"more than {PROB_TOLERANCE} (test image #{int(pred.index[q])}: logged {name[int(logged[worst].argmax())]} at {logged[worst].max():.2f}, "
            f"the model gives {name[int(probs[worst].argmax())]} at {probs[worst].max():.2f})")


def verify_runs(runs: list[RunRecord], images: ImageCache, n_images: int = VERIFIED_IMAGES, rng: np.random.Generator | None = None) -> None:
    """Recompute each run's predictions on ``n_images`` test images drawn at random (fresh entropy: whoever edits a file
    cannot know which images are checked) from its logged weights; refuse (InputError naming every such run) where they
    are not the logged ones."""
    from analysis.runs import load_model

    rng = rng or np.random.default_rng()
    bad = []
    for run in runs:
        x, mean, std = images.get(run)
        positions = np.sort(rng.choice(len(x), min(n_images, len(x)), replace=False))
        if problem := model_disagreement(load_model(run), x, mean, std, run.predictions, positions):
            bad.append(f"run {run.name} ({run.run_id}): {problem}")
    if bad:
        raise InputError("logged predictions that the runs' own weights do not make: " + "; ".join(bad) +
                         ". The store was changed after the trials wrote it, or a run's predictions and weights come from "
                         "different runs; the analysis does not judge a model on predictions it did not make")
