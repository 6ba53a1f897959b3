"""Accuracy under every corruption and severity (``stress/corruptions.py``) on a class-balanced test subset, per run,
and the mCE against the baseline runs: read from the trial where it ran the same test, else measured here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis import log
from analysis.runs import ImageCache, RunRecord, load_model
from stress import corruptions
from tracking import plots

DEFAULT_CORRUPTION_IMAGES = 1000


def robustness_step(runs: list[RunRecord], images: ImageCache, out: Path, n_images: int | None, baseline: tuple[str, str] | None,
                    reuse: bool = True) -> dict | None:
    """Accuracy under every corruption and severity on a class-balanced test subset; mCE against the baseline runs.

    A run whose trial ran the same test (``robustness: true`` on the same subset) is read from its logged
    robustness.json: same subset rule, corruption seeds and fp32 model, so the same numbers (a test checks it) without
    the inference, which dominates a CPU analysis (ResNet-18: minutes per run). ``n_images`` None means the trials'
    subset where every run logged one of the same size, else DEFAULT_CORRUPTION_IMAGES."""

    if n_images == 0:
        return None
    logged = {r.name: r.trial_robustness for r in runs} if reuse else {}
    if n_images is None:
        requested = {v["requested"] for v in logged.values() if v}
        n_images = requested.pop() if len(requested) == 1 and all(logged.get(r.name) for r in runs) else DEFAULT_CORRUPTION_IMAGES
    results, generated = {}, {}
    for run in runs:
        x, mean, std = images.get(run)
        p = run.predictions
        pos = corruptions.first_per_class(p.labels, len(p.classes), n_images)  # the same definition the trials use
        trial = logged.get(run.name)
        if trial and trial["images"] == len(pos) and set(trial["accuracy"]) == set(corruptions.CORRUPTIONS):  # one rule: equal size, same subset
            results[run.name] = {"clean": float((p.preds[pos] == p.labels[pos]).mean()), "accuracy": trial["accuracy"], "measured": "trial"}
            continue
        key = (id(x), pos.tobytes())
        if key not in generated:  # corrupted once per data set and subset, reused by every run on it
            generated[key] = list(corruptions.corrupted_sets(x[pos]))
        predict = corruptions.classifier(load_model(run), mean, std)

        results[run.name] = {"clean": float((predict(x[pos]) == p.labels[pos]).mean()),
                             "accuracy": corruptions.corruption_accuracy(predict, None, p.labels[pos], sets=generated[key]), "measured": "analysis"}
        log(f"corruptions: {run.name} done")
    base_runs = [r.name for r in runs if baseline and r.params.get(baseline[0]) == baseline[1]] or [runs[0].name]
    names = sorted(corruptions.CORRUPTIONS)
    base_err = {c: list(np.mean([[1 - a for a in results[b]["accuracy"][c]] for b in base_runs], axis=0)) for c in names}
    for name, r in results.items():
        r["mean_corruption_acc"] = float(np.mean([np.mean(v) for v in r["accuracy"].values()]))
        r["mce"] = corruptions.mean_corruption_error({c: [1 - a for a in r["accuracy"][c]] for c in names}, base_err)
    summary = {"images": int(len(pos)), "baseline_runs": base_runs, "measured_in_trials": sum(r["measured"] == "trial" for r in results.values()),
               "runs": results}
    (out / "robustness.json").write_text(json.dumps(summary, indent=1))
    matrix = np.array([[np.mean(results[r]["accuracy"][c]) for r in results] for c in names])
    summary["figure"] = plots.plot_heatmap(matrix, names, list(results), out / "corruption_heatmap.png", "accuracy under corruption (mean over severities 1-5)")
    return summary
