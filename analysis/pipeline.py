"""The stress test over a finished sweep, as importable functions (``python -m analysis`` calls ``run_analysis``).

Per run: high-confidence failures, Grad-CAM for the predicted and the true class, measured failure
categories, confusion matrix. Across runs: curves, metric and per-class bars, a class gallery.
Between a baseline and a variant: matched pairs, per-class deltas, fixed/still/new failures with
Grad-CAM before and after, McNemar's test. Everything lands in ``out`` and in one HTML report.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from stress import adversarial
from stress import corruptions
from tracking import metrics
from tracking import plots
from analysis import calibration, compare, failures as fail, gradcam, label_issues, persistent
from analysis.runs import RunRecord, data_mismatch, find_runs, load_model, safe_names, test_images
from config.settings import TrialConfig
from config.schema import InputError

GALLERY_CLASSES = ("cat", "dog", "bird", "airplane", "ship")  # seed 004's gallery
DEFAULT_CORRUPTION_IMAGES = 1000
DEFAULT_ADVERSARIAL = (TrialConfig.adversarial_images, TrialConfig.adversarial_steps, TrialConfig.adversarial_step_size)  # the trials' defaults
RUNS_PER_WORKER = 8


@dataclass(frozen=True)
class RunSettings:
    """What every run's analysis is given (picklable: it travels to the worker processes)."""

    threshold: float
    layers: dict[str, str]
    max_cams: int
    road_images: int = 32
    label_errors: frozenset[int] = frozenset()
    adversarial_images: int = 100
    pgd_steps: int = 10
    pgd_step_size: float = 0.25


@dataclass
class RunAnalysis:
    """What the analysis learned about one run."""

    run: RunRecord
    failures: list[dict]
    categories: list[fail.Category]
    layer: str
    resolution: tuple[int, int]
    road: dict[str, float] = field(default_factory=dict)  # mean ROAD of Grad-CAM and of the reference maps, on the same images
    figures: dict[str, Path] = field(default_factory=dict)
    adversarial: dict | None = None  # accuracy under FGSM and PGD per epsilon (adversarial.robust_accuracy)

    @property
    def failures_excluding_label_errors(self) -> list[dict]:
        return [f for f in self.failures if not f.get("likely_label_error")]


@dataclass
class Comparison:
    """Baseline vs variant over the matched pairs."""

    baseline: str
    variant: str
    pairs: list[dict]
    per_class: list[dict]  # pooled over every pair
    strata: list[dict] = field(default_factory=list)  # per architecture (then pooled, marked): interval, fixed/new, seed churn
    figures: dict[str, Path] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[analysis {time.strftime('%H:%M:%S')}] {message}", flush=True)


class ImageCache:
    """Test images per data config: runs on the same data share one decode."""

    def __init__(self):
        self._cache: dict[str, tuple] = {}

    def get(self, run: RunRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._get(run)[:3]

    def _get(self, run: RunRecord) -> tuple:
        key = yaml.safe_dump(run.config["data"], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = test_images(run, labels=True)
        return self._cache[key]

    def check(self, runs: list[RunRecord], allow_mismatch: bool = False) -> None:
        """Refuse (InputError naming the run) where the data loaded now is not what a run was tested on: Grad-CAM and
        the stress tests would explain other pixels than its logged predictions; with ``allow_mismatch``, a warning."""
        for run in runs:
            x, _, _, labels = self._get(run)
            if problem := data_mismatch(run, x, labels):
                message = f"the data at {run.config['data'].get('root')} is not what run {run.name} was tested on: {problem}"
                if not allow_mismatch:
                    raise InputError(f"{message}. Point data.root at the run's data (the analysis reads each run's logged data "
                                     f"settings), or pass --allow-data-mismatch if you know why")
                log(f"warning: {message} (--allow-data-mismatch)")


def road_positions(n_test: int, n_images: int, seed: int = 0) -> np.ndarray:
    """The test positions ROAD is measured on: a seeded draw, the same for every run on the same data."""
    return np.sort(np.random.default_rng(seed).choice(n_test, min(n_images, n_test), replace=False))


def road_step(model, target, x: np.ndarray, mean, std, pred, n_images: int) -> tuple[dict[str, float], np.ndarray]:
    """Mean ROAD of the predicted-class Grad-CAM and of the reference maps on ``n_images`` seeded test images; also
    the Grad-CAM border shares there (the chance baseline of the context category)."""
    pos = road_positions(len(pred.labels), n_images)
    if not len(pos):
        return {}, np.zeros(0)
    inputs, classes = gradcam.normalise(x[pos], mean, std), pred.preds[pos]
    cams = gradcam.compute_cams(model, target, inputs, classes)
    maps = {"Grad-CAM": cams, **gradcam.reference_maps(len(pos), cams.shape[-1])}
    road = {name: float(gradcam.faithfulness(model, inputs, m, classes).mean()) for name, m in maps.items()}
    return road | {"images": len(pos)}, fail.border_fraction(cams)


def analyse_run(run: RunRecord, images: ImageCache, out: Path, settings: RunSettings) -> RunAnalysis:
    """Failures (each marked whether its test image is a likely label error), Grad-CAM and categories of one run; writes
    failures.json and its figures."""
    from model_zoo import gradcam_target

    threshold, max_cams = settings.threshold, settings.max_cams
    pred = run.predictions
    found = fail.mine_failures(pred, threshold)
    for f in found:
        f["likely_label_error"] = f["test_index"] in settings.label_errors
    x, mean, std = images.get(run)
    model = load_model(run)
    layer = settings.layers.get(run.config["arch"])
    target = gradcam_target(model, run.config["arch"], layer)
    layer_name = layer or next(n for n, m in model.named_modules() if m is target)
    explained = found[:max_cams]
    pos = np.array([f["position"] for f in explained], dtype=int)
    inputs = gradcam.normalise(x[pos], mean, std)
    cams_pred = gradcam.compute_cams(model, target, inputs, [f["predicted_label"] for f in explained])
    cams_true = gradcam.compute_cams(model, target, inputs, [f["true_label"] for f in explained])
    border = dict(zip((f["test_index"] for f in explained), fail.border_fraction(cams_pred).tolist()))
    shown = min(8, len(explained))
    road, reference_border = road_step(model, target, x, mean, std, pred, settings.road_images)
    scores = gradcam.faithfulness(model, inputs[:shown], cams_pred[:shown], [f["predicted_label"] for f in explained[:shown]])
    image_colours = fail.mean_colours(x)
    class_colours = np.stack([image_colours[pred.labels == k].mean(0) for k in range(len(pred.classes))])
    chance = {"colour": fail.colour_chance(image_colours, pred.labels, class_colours),
              "ruled_out": float((pred.probs[~pred.correct, pred.labels[~pred.correct]] < 0.01).mean()) if (~pred.correct).any() else 0.0}
    if np.isfinite(reference_border).any():
        chance["border"] = float((reference_border[np.isfinite(reference_border)] > fail.UNIFORM_BORDER).mean())
    colours = image_colours[[f["position"] for f in found]] if found else None
    categories = fail.categorize(found, len(pred.classes), border, colours, class_colours, chance)
    for f in explained:
        f["cam_border_share"] = None if border[f["test_index"]] != border[f["test_index"]] else round(border[f["test_index"]], 4)
    for f, score in zip(explained, scores):
        f["road_score"] = round(float(score), 4)
    result = RunAnalysis(run, found, categories, layer_name, gradcam.layer_resolution(model, target), road=road)
    folder = out / "runs" / run.slug
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failures.json").write_text(json.dumps({
        "run_id": run.run_id, "run_name": run.name, "threshold": threshold, "count": len(found),
        "count_excluding_likely_label_errors": len(result.failures_excluding_label_errors),
        "gradcam_layer": layer_name, "gradcam_resolution": list(result.resolution), "road": road, "chance": chance,
        "categories": [asdict(c) for c in categories], "failures": found}, indent=1))
    titles = [f"#{f['test_index']} {f['true_class']}->{f['predicted_class']} {f['confidence']:.2f}" for f in found[:24]]
    road_titles = [t + (f" ROAD {f['road_score']:+.2f}" if "road_score" in f else "") for t, f in zip(titles, found)]
    if found:
        result.figures["failures"] = gradcam.image_grid(x[[f["position"] for f in found[:24]]], titles, folder / "failures_grid.png")
        result.figures["gradcam"] = gradcam.cam_figure(x[pos[:shown]], {"Grad-CAM: predicted": cams_pred[:shown], "Grad-CAM: true class": cams_true[:shown]},
                                                       road_titles[:shown], folder / "gradcam_failures.png")
    confusion = np.bincount(pred.labels * len(pred.classes) + pred.preds, minlength=len(pred.classes) ** 2).reshape(len(pred.classes), -1)
    result.figures["confusion"] = plots.plot_confusion(confusion, pred.classes, folder / "confusion_matrix.png", title=run.name)
    if settings.adversarial_images > 0:
        result.adversarial, figure = adversarial_run(model, target, x, mean, std, pred, settings, folder, run.trial_adversarial)
        if figure:
            result.figures["adversarial"] = figure
    return result


def adversarial_run(model, target, x: np.ndarray, mean, std, pred, settings: RunSettings, folder: Path, logged: dict | None,
                    shown: int = 8) -> tuple[dict, Path | None]:
    """FGSM and PGD accuracy per epsilon on a class-balanced test subset (read from the trial when it attacked the same
    subset with the same PGD settings); Grad-CAM before and after the PGD perturbation for the images that flip at the
    smallest epsilon."""
    import torch

    same = logged is not None and (logged["requested"], logged["steps"], logged["step_size"]) == (settings.adversarial_images, settings.pgd_steps, settings.pgd_step_size)
    result = dict(logged, measured_in_trial=True) if same else dict(
        adversarial.stress_test(model, x, pred.labels, pred.index, len(pred.classes), settings.adversarial_images, mean, std,
                                settings.pgd_steps, settings.pgd_step_size), measured_in_trial=False)
    position = {int(i): q for q, i in enumerate(pred.index)}
    first_pgd = [(e, position[i]) for i, e in result["first_flip_pgd"].items()]
    flips = sorted(first_pgd)[:shown]
    if not flips:
        return result, None
    chosen = np.array([q for _, q in flips])
    m, s = torch.as_tensor(mean).view(1, -1, 1, 1), torch.as_tensor(std).view(1, -1, 1, 1)
    clean = torch.from_numpy(x[chosen]).float().div(255)
    y = torch.as_tensor(pred.labels[chosen]).long()
    adv = torch.cat([adversarial.pgd(model, clean[i : i + 1], y[i : i + 1], e, m, s, settings.pgd_steps, settings.pgd_step_size) for i, (e, _) in enumerate(flips)])
    with torch.no_grad():
        after = model((adv - m) / s).argmax(1).numpy()
    before_cams = gradcam.compute_cams(model, target, (clean - m) / s, pred.preds[chosen])
    after_cams = gradcam.compute_cams(model, target, (adv - m) / s, after)
    titles = [f"#{pred.index[q]} {pred.classes[pred.labels[q]]}->{pred.classes[a]} at {e * 255:.0f}/255" for (e, q), a in zip(flips, after)]
    figure = gradcam.cam_figure(x[chosen], {"Grad-CAM: clean prediction": before_cams, "Grad-CAM: after PGD": after_cams}, titles,
                                folder / "adversarial_flips.png")
    return result, figure


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def analyse_runs(runs: list[RunRecord], images: ImageCache, out: Path, settings: RunSettings, workers: int | None = None) -> list[RunAnalysis]:
    """``analyse_run`` for every run, in run order. With several workers (default: one per usable core, but one per
    RUNS_PER_WORKER runs at most: a worker's start costs seconds of imports) the runs go to spawned processes, each with
    its share of the cores as torch threads: much of a run's analysis (figures, JSON, Grad-CAM's small batches) is
    single-threaded Python, which one process cannot spread over cores."""
    workers = min(len(runs), workers or min(usable_cores(), max(1, len(runs) // RUNS_PER_WORKER)))
    done: dict[int, RunAnalysis] = {}

    def finished(i: int, analysis: RunAnalysis) -> None:
        done[i] = analysis
        log(f"run {len(done)}/{len(runs)} {analysis.run.name}: {len(analysis.failures)} failures above {settings.threshold}")

    if workers <= 1:
        for i, run in enumerate(runs):
            finished(i, analyse_run(run, images, out, settings))
        return [done[i] for i in range(len(runs))]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    log(f"analysing {len(runs)} runs in {workers} processes")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup,
                             initargs=(max(1, usable_cores() // workers), os.getpid())) as pool:
        heaviest_first = sorted(range(len(runs)), key=lambda i: -model_size(runs[i]))  # no large model left alone at the end
        futures = {pool.submit(_analyse_in_worker, runs[i], out, settings): i for i in heaviest_first}
        for future in as_completed(futures):
            finished(futures[future], future.result())
    return [done[i] for i in range(len(runs))]


def model_size(run: RunRecord) -> int:
    """Parameters of the run's model (built on the meta device: no memory, no time), a proxy for its analysis's cost."""
    import torch

    from model_zoo import create_model

    with torch.device("meta"):
        model = create_model(run.config["arch"], len(run.predictions.classes), **run.config.get("model", {}))
    return sum(p.numel() for p in model.parameters())


_WORKER_IMAGES: ImageCache | None = None  # a worker's own decode of the test images, shared by the runs it analyses


def _worker_setup(threads: int, parent: int) -> None:
    import threading

    import torch

    global _WORKER_IMAGES
    torch.set_num_threads(threads)
    _WORKER_IMAGES = ImageCache()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker whose analysis was killed (Ctrl-C, SIGKILL) stops within a second instead of finishing its run alone."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _analyse_in_worker(run: RunRecord, *args) -> RunAnalysis:
    return analyse_run(run, _WORKER_IMAGES, *args)


def class_gallery(run: RunRecord, images: ImageCache, out: Path, layers: dict[str, str], wanted: tuple[str, ...], per_class: int = 4) -> Path | None:
    """Grad-CAM of the predicted class for the first test images of each chosen class."""
    from model_zoo import gradcam_target

    pred = run.predictions
    chosen = [c for c in wanted if c in pred.classes] or pred.classes[:5]
    x, mean, std = images.get(run)
    pos = np.concatenate([np.flatnonzero(pred.labels == pred.classes.index(c))[:per_class] for c in chosen])
    model = load_model(run)
    cams = gradcam.compute_cams(model, gradcam_target(model, run.config["arch"], layers.get(run.config["arch"])), gradcam.normalise(x[pos], mean, std), pred.preds[pos])
    titles = [f"#{pred.index[p]} {pred.classes[pred.labels[p]]} (pred {pred.classes[pred.preds[p]]} {pred.confidence[p]:.2f})" for p in pos]
    return gradcam.cam_figure(x[pos], {"Grad-CAM: predicted": cams}, titles, out / "class_gallery.png", cell=1.6)


def resolve_layers(spec: str | None, runs: list[RunRecord]) -> dict[str, str]:
    """``--layer`` as architecture -> module path, checked against every run's model before any work.

    ``layer3`` applies to every architecture; ``resnet18=layer3,plain_cnn=stages.1`` names one per architecture
    (the others keep their registered layer). Raises InputError listing the layers each architecture has."""
    import torch

    from model_zoo import create_model

    if not spec:
        return {}
    configs = {r.config["arch"]: r for r in runs}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        layers = {arch: parts[0] for arch in configs}
    elif all("=" in p for p in parts):
        layers = dict(p.split("=", 1) for p in parts)
    else:
        raise InputError(f"--layer {spec!r}: give one module path (layer3) or ARCH=PATH pairs (resnet18=layer3,plain_cnn=stages.1)")
    problems = []
    for arch, path in layers.items():
        if arch not in configs:
            problems.append(f"{arch}: no run of this sweep uses it (architectures: {', '.join(sorted(configs))})")
            continue
        with torch.device("meta"):
            model = create_model(arch, len(configs[arch].predictions.classes), **configs[arch].config.get("model", {}))
        names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
        if path not in dict(model.named_modules()):
            problems.append(f"{arch} has no layer {path!r}; its layers: {', '.join(names)}")
    if problems:
        raise InputError(f"--layer {spec}: " + "; ".join(problems) + ". Name a layer per architecture, e.g. --layer resnet18=layer3")
    return layers


def infer_comparisons(runs: list[RunRecord]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Default baseline/variant pairs: augment=none vs each other augmentation, else plain_cnn vs each other arch."""
    for key, base in (("augment", "none"), ("arch", "plain_cnn")):
        values = sorted({r.params.get(key) for r in runs} - {None})
        if base in values and len(values) > 1:
            return [((key, base), (key, v)) for v in values if v != base]
    return []


def compare_runs(runs: list[RunRecord], baseline: tuple[str, str], variant: tuple[str, str], images: ImageCache, out: Path,
                 threshold: float, layers: dict[str, str]) -> Comparison | None:
    """Matched pairs, transitions, McNemar and per-class deltas; Grad-CAM before/after for the first pair."""
    from model_zoo import gradcam_target

    pairs = compare.pair_runs(runs, baseline, variant)
    if not pairs:
        log(f"no run pairs differ only in {baseline[0]} ({baseline[1]} vs {variant[1]}); comparison skipped")
        return None
    label = f"{baseline[0]}={baseline[1]} vs {variant[1]}"
    rows = []
    for base, var in pairs:
        t = compare.transitions(base.predictions, var.predictions, threshold)
        rows.append({"baseline": base.name, "variant": var.name, "baseline_run_id": base.run_id, "variant_run_id": var.run_id,
                     "arch": base.params.get("arch", "?"), "baseline_acc": float(base.predictions.correct.mean()),
                     "variant_acc": float(var.predictions.correct.mean()), "fixed": t.fixed, "still": t.still, "new": t.new,
                     "mcnemar": compare.mcnemar(base.predictions.correct, var.predictions.correct)})
    for row, p_holm in zip(rows, compare.holm([r["mcnemar"]["p_value"] for r in rows])):
        row["mcnemar"]["p_holm"] = p_holm
    result = Comparison(f"{baseline[0]}={baseline[1]}", f"{variant[0]}={variant[1]}", rows, compare.per_class_table(pairs),
                        change_strata(runs, rows, baseline, threshold))
    folder = out / "compare" / safe_names([f"{baseline[1]}_vs_{variant[1]}"])[0]  # param values from the store: no path
    base, var = pairs[0]
    shown = (rows[0]["fixed"][:4] + rows[0]["new"][:4])
    if shown:
        x, mean, std = images.get(base)
        where = {int(i): p for p, i in enumerate(base.predictions.index)}
        pos = np.array([where[i] for i in shown])
        columns = {}
        for tag, run in (("before", base), ("after", var)):
            model = load_model(run)
            columns[f"{tag}: {run.name}"] = gradcam.compute_cams(model, gradcam_target(model, run.config["arch"], layers.get(run.config["arch"])),
                                                                  gradcam.normalise(x[pos], mean, std), run.predictions.preds[pos])
        p = base.predictions
        titles = [f"#{i} {'fixed' if i in rows[0]['fixed'] else 'new'}: {p.classes[p.labels[q]]}; {p.classes[p.preds[q]]}->{p.classes[var.predictions.preds[q]]}"
                  for i, q in zip(shown, pos)]
        result.figures["before_after"] = gradcam.cam_figure(x[pos], columns, titles, folder / "gradcam_before_after.png")
    deltas = {r["class"]: r["delta"][0] for r in result.per_class if r["class"] != "overall"}
    result.figures["per_class_delta"] = plots.plot_bars({label: deltas}, folder / "per_class_delta.png", f"per-class accuracy change ({label})", "delta")
    (folder / "comparison.json").write_text(json.dumps(asdict(result), indent=1, default=str))
    return result


def change_strata(runs: list[RunRecord], rows: list[dict], baseline: tuple[str, str], threshold: float) -> list[dict]:
    """The change per architecture (an augmentation on plain_cnn and on resnet18 are different experiments), each beside
    the seed churn of its baseline runs; then the pooled figure, marked as such, when there are several architectures."""
    key, value = baseline
    archs = sorted({r["arch"] for r in rows}) if key != "arch" else []
    out = []
    for arch in archs:
        base_runs = [r for r in runs if r.params.get(key) == value and r.params.get("arch") == arch]
        out.append(compare.stratum(arch, [r for r in rows if r["arch"] == arch], compare.seed_churn(base_runs, threshold)))
    if len(out) != 1:
        base_runs = [r for r in runs if r.params.get(key) == value]
        out.append(compare.stratum("pooled over architectures" if archs else "all pairs", rows, compare.seed_churn(base_runs, threshold)))
    return out


def sweep_figures(analyses: list[RunAnalysis], out: Path) -> dict[str, Path]:
    """Curves overlaid, metrics bar, per-class accuracy and the worst classes."""
    runs = [a.run for a in analyses]
    figures = {"curves": plots.plot_curves({r.name: r.history for r in runs}, out / "training_curves.png")}
    keys = (metrics.TEST_ACC, metrics.TEST_PRECISION, metrics.TEST_RECALL, metrics.TEST_F1)
    figures["metrics"] = plots.plot_bars({r.name: {k.split("/")[1]: r.metrics.get(k, np.nan) for k in keys} for r in runs}, out / "metrics.png", "test metrics")
    per_class = {r.name: {c: float(r.predictions.correct[r.predictions.labels == k].mean()) for k, c in enumerate(r.predictions.classes)} for r in runs}
    figures["per_class"] = plots.plot_bars(per_class, out / "per_class_accuracy.png", "per-class test accuracy", "accuracy")
    mean_acc = {c: float(np.mean([v[c] for v in per_class.values()])) for c in next(iter(per_class.values()))}
    worst = dict(sorted(mean_acc.items(), key=lambda kv: kv[1])[:10])
    figures["worst"] = plots.plot_bars({"mean over runs": worst}, out / "worst_classes.png", "worst classes (mean accuracy over runs)", "accuracy")
    return figures


def calibration_step(runs: list[RunRecord], out: Path, threshold: float) -> tuple[dict, Path]:
    """ECE, temperature fitted on validation, confident failures before/after; reliability diagrams."""
    summary = {r.name: calibration.calibration_summary(r.predictions, threshold) for r in runs}
    (out / "calibration.json").write_text(json.dumps(summary, indent=1))
    figure = calibration.plot_reliability({r.name: (r.predictions.probs, r.predictions.labels) for r in runs}, out / "reliability.png")
    return summary, figure


def persistent_step(runs: list[RunRecord], images: ImageCache, out: Path, threshold: float, label_errors: frozenset[int] = frozenset()) -> dict | None:
    """Images (nearly) every run gets confidently wrong vs failures that depend on seed or setting; those among them that
    label_issues.json flags as likely label errors."""
    if len(runs) < 2:
        return None
    groups = persistent.split_groups(runs, threshold)
    keys = [k for k in ("augment", "arch", "seed") if len({r.params.get(k) for r in runs}) > 1]
    result = {"runs": len(runs), "counts": persistent.persistent_counts(runs, threshold), "groups": groups,
              "likely_label_errors": {name: sorted(set(indices) & label_errors) for name, indices in groups.items()},
              "fixes": {k: persistent.fixes_by_setting(runs, groups, k) for k in keys}}
    (out / "persistent.json").write_text(json.dumps(result, indent=1))
    shown = groups["persistent"][:24]
    if shown:
        x, _, _ = images.get(runs[0])
        p = runs[0].predictions
        pos = [int(np.flatnonzero(p.index == i)[0]) for i in shown]
        titles = []
        for i, q in zip(shown, pos):
            usual, n = persistent.usual_prediction(runs, i)
            titles.append(f"#{i} {p.classes[p.labels[q]]}->{usual} ({result['counts'][i]}/{len(runs)})")
        result["figure"] = gradcam.image_grid(x[pos], titles, out / "persistent_failures.png")
    return result


def adversarial_settings(runs: list[RunRecord], given: tuple) -> tuple[int, int, float]:
    """(images, PGD steps, PGD step) for the analysis's attack: each as given, else the trials' where every run's trial
    attacked with the same settings (so every run is read, none attacked again), else DEFAULT_ADVERSARIAL."""
    logged = {(a["requested"], a["steps"], a["step_size"]) if (a := r.trial_adversarial) else None for r in runs}
    trials = logged.pop() if len(logged) == 1 and None not in logged else DEFAULT_ADVERSARIAL
    return tuple(value if value is not None else default for value, default in zip(given, trials))


def adversarial_summary(analyses: list[RunAnalysis], out: Path) -> dict | None:
    """adversarial.json (every run's accuracy per attack and epsilon) and the accuracy-vs-epsilon curves."""
    results = {a.run.name: a.adversarial for a in analyses if a.adversarial}
    if not results:
        return None
    first = next(iter(results.values()))
    summary = {"images": first["images"], "epsilons": first["epsilons"], "attacks": sorted(adversarial.ATTACKS), "steps": first["steps"],
               "step_size": first["step_size"],
               "measured_in_trials": sum(r["measured_in_trial"] for r in results.values()), "runs": results}
    (out / "adversarial.json").write_text(json.dumps(summary, indent=1))
    curves = {name: {attack: list(zip([e * 255 for e in r["epsilons"]], r["accuracy"][attack])) for attack in summary["attacks"]}
              for name, r in results.items()}
    summary["figure"] = plots.plot_attack_curves(curves, out / "adversarial_accuracy.png",
                                                 f"accuracy under FGSM and PGD ({summary['steps']} steps) on {summary['images']} test images")
    return summary


def label_issues_step(runs: list[RunRecord], images: ImageCache, out: Path, threshold: float, shown: int = 24) -> dict | None:
    """label_issues.json: the test images most likely mislabelled (cleanlab on the runs' mean probabilities), and a grid of
    the top ``shown`` with the given and the suggested label."""
    try:
        result = label_issues.label_issues(runs, threshold)
    except ValueError as err:  # e.g. a class absent from the test labels
        log(f"label issues skipped: {err}")
        return None
    (out / "label_issues.json").write_text(json.dumps(result, indent=1))
    top = [c for c in result["candidates"] if c["flagged"]][:shown]
    if top:
        x, _, _ = images.get(runs[0])
        titles = [f"#{c['test_index']} given {c['given_class']}, suggested {c['suggested_class']} ({c['quality']:.2f})" for c in top]
        result["figure"] = gradcam.image_grid(x[[c["position"] for c in top]], titles, out / "label_issues.png")
    log(f"label issues: {result['count']} of {result['test_images']} test images flagged as likely mislabelled (the runs' mean prediction "
        f"{result['ensemble_accuracy']:.1%} right" + ("; too weak for this count to be trusted)" if result["weak_ensemble"] else ")"))
    return result


def robustness_step(runs: list[RunRecord], images: ImageCache, out: Path, n_images: int | None, baseline: tuple[str, str] | None,
                    reuse: bool = True) -> dict | None:
    """Accuracy under every corruption and severity on a class-balanced test subset; mCE against the baseline runs.

    A run whose trial ran the same test (``robustness: true`` on the same subset) is read from its logged
    robustness.json: same subset rule, corruption seeds and fp32 model, so the same numbers (a test checks it) without
    the inference, which dominates a CPU analysis (ResNet-18: minutes per run). ``n_images`` None means the trials'
    subset where every run logged one of the same size, else DEFAULT_CORRUPTION_IMAGES."""
    import torch

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
        pos = corruptions.balanced_subset(p.labels, len(p.classes), n_images)  # the same definition the trials use
        trial = logged.get(run.name)
        if trial and trial["images"] == len(pos) and set(trial["accuracy"]) == set(corruptions.CORRUPTIONS):  # one rule: equal size, same subset
            results[run.name] = {"clean": float((p.preds[pos] == p.labels[pos]).mean()), "accuracy": trial["accuracy"], "measured": "trial"}
            continue
        key = (id(x), pos.tobytes())
        if key not in generated:  # corrupted once per data set and subset, reused by every run on it
            generated[key] = list(corruptions.corrupted_sets(x[pos]))
        model = load_model(run)

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([model(gradcam.normalise(batch[i : i + 500], mean, std)).argmax(1).numpy() for i in range(0, len(batch), 500)])

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


def run_analysis(experiment: str, uri: str, out: str | Path, threshold: float = 0.9, baseline: str | None = None, variant: str | None = None,
                 layer: str | None = None, gallery: tuple[str, ...] = GALLERY_CLASSES, max_cams: int = 200, sweep: str = "latest",
                 log_to_mlflow: bool = True, corruption_images: int | None = None, road_images: int = 32, workers: int | None = None,
                 adversarial_images: int | None = None, pgd_steps: int | None = None, pgd_step_size: float | None = None,
                 allow_data_mismatch: bool = False) -> Path:
    """Analyse every finished run of ``experiment`` (the per-run part in ``workers`` processes, default one per core);
    return the path of the HTML report."""
    from analysis import report

    start = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(experiment, uri, out / ".artifacts", sweep, log=log)
    layers = resolve_layers(layer, runs)
    log(f"{len(runs)} finished runs of {experiment!r} from {uri}")
    images = ImageCache()
    images.check(runs, allow_data_mismatch)
    extra = {"label_issues": label_issues_step(runs, images, out, threshold)}
    flagged = frozenset(label_issues.flagged_indices(extra["label_issues"]))
    attack = adversarial_settings(runs, (adversarial_images, pgd_steps, pgd_step_size))
    settings = RunSettings(threshold, layers, max_cams, road_images, flagged, *attack)
    analyses = analyse_runs(runs, images, out, settings, workers)
    extra["adversarial"] = adversarial_summary(analyses, out)
    figures = sweep_figures(analyses, out)
    figures["gallery"] = class_gallery(runs[0], images, out, layers, gallery)
    extra |= {"calibration": calibration_step(runs, out, threshold), "persistent": persistent_step(runs, images, out, threshold, flagged)}
    wanted = [(compare.parse_selector(baseline), compare.parse_selector(variant))] if baseline and variant else infer_comparisons(runs)
    extra["robustness"] = robustness_step(runs, images, out, corruption_images, wanted[0][0] if wanted else None)
    comparisons = [c for b, v in wanted if (c := compare_runs(runs, b, v, images, out, threshold, layers))]
    log(f"{len(comparisons)} comparison(s); writing the report")
    path = report.write_report(out, experiment, uri, threshold, analyses, comparisons, figures, extra)
    if log_to_mlflow:
        report.log_analysis_run(uri, experiment, out, threshold)
    log(f"report {path} ({time.perf_counter() - start:.0f} s)")
    return path
