"""The stress test over a finished sweep, as one story (``python -m analysis`` calls ``run_analysis``); each step lives
beside its computation in its own module.

Per run (``failures``, in ``workers`` processes): high-confidence failures, Grad-CAM for the predicted and the true
class, measured failure categories, confusion matrix, FGSM/PGD (``attacks``). Across runs: figures, label errors,
calibration, persistent failures, corruptions (``robustness``). Between a baseline and a variant (``compare``): matched
pairs, per-class deltas, fixed/still/new failures with Grad-CAM before and after, McNemar's test, seed churn.
Everything lands in ``out`` and in one HTML report (``report``).
"""
from __future__ import annotations

import time
from pathlib import Path

from analysis import attacks, calibration, compare, gradcam, integrity, label_issues, log, logged, persistent, report, robustness
from analysis import figures as overview
from analysis import workers as workers_pool
from analysis import ROAD_IMAGES
from analysis.failures import RunSettings
from analysis.artifacts import ArtifactReader
from analysis.runs import ImageCache, find_runs
from stress.corruptions.published import check_labels
from tracking import metrics


def run_analysis(experiment: str, uri: str, out: str | Path, threshold: float = metrics.CONFIDENCE_THRESHOLD, baseline: str | None = None, variant: str | None = None,
                 layer: str | None = None, gallery: tuple[str, ...] | None = None, max_cams: int = 200, sweep: str = "latest",
                 log_to_mlflow: bool = True, corruption_images: int | None = None, road_images: int = ROAD_IMAGES, workers: int | None = None,
                 adversarial_images: int | None = None, pgd_steps: int | None = None, pgd_step_size: float | None = None,
                 allow_data_mismatch: bool = False, corruption_data: str | None = None, cache_dir: str | None = None) -> Path:
    """Analyse every finished run of ``experiment`` (the per-run part in ``workers`` processes, default one per core);
    return the path of the HTML report."""
    start = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    reader = ArtifactReader(uri, cache_dir)  # a local store is read in place; a server's artifacts through the user cache
    runs = find_runs(experiment, uri, sweep=sweep, log=log, reader=reader)
    layers = gradcam.resolve_layers(layer, runs)  # every choice is checked against the runs before any work
    if baseline and variant:
        wanted = [(compare.parse_selector(baseline), compare.parse_selector(variant))]
        compare.check_selectors(runs, *wanted[0])
    else:
        wanted = compare.infer_comparisons(runs)
    gallery_classes = overview.gallery_classes(runs[0], gallery)
    if corruption_data:  # named by the caller: it must be there (the trials' own folder may be absent where their logs are reused)
        check_labels(corruption_data)
    log(f"{len(runs)} finished runs of {experiment!r} from {uri}")
    images = ImageCache()
    matching = images.check(runs, allow_data_mismatch)
    log(f"checking the logged metrics and predictions of {len(matching)} run(s) against their weights ({integrity.VERIFIED_IMAGES} test and "
        f"{integrity.VERIFIED_IMAGES} validation images each)")
    integrity.verify_runs(matching, images)
    extra = {"label_issues": label_issues.label_issues_step(runs, images, out, threshold)}
    flagged = frozenset(label_issues.flagged_indices(extra["label_issues"]))
    attack = attacks.adversarial_settings(runs, (adversarial_images, pgd_steps, pgd_step_size))
    settings = RunSettings(threshold, layers, max_cams, road_images, flagged, *attack)
    analyses = workers_pool.analyse_runs(runs, images, out, settings, workers)
    extra["adversarial"] = attacks.adversarial_summary(analyses, out)
    figures = overview.sweep_figures(analyses, out)
    figures["gallery"] = overview.class_gallery(runs[0], images, out, layers, gallery_classes)
    extra |= {"calibration": calibration.calibration_step(runs, out, threshold), "persistent": persistent.persistent_step(runs, images, out, threshold, flagged)}
    extra["robustness"] = robustness.robustness_step(runs, images, out, corruption_images, wanted[0][0] if wanted else None,
                                                     folder=corruption_data)
    comparisons = [c for b, v in wanted if (c := compare.compare_runs(runs, b, v, images, out, threshold, layers))]
    log(f"{len(comparisons)} comparison(s); writing the report")
    path = report.write_report(out, experiment, uri, threshold, analyses, comparisons, figures, extra)
    if log_to_mlflow:
        logged.log_analysis_run(uri, experiment, out, threshold, [{"run_name": a.run.name, "run_id": a.run.run_id, **f} for a in analyses for f in a.failures])
    log(reader.summary())
    log(f"report {path} ({time.perf_counter() - start:.0f} s)")
    return path
