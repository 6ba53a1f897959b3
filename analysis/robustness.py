"""Accuracy under every corruption and severity (``stress/corruptions``) on a class-balanced test subset, per run:
the 15-corruption mean the literature reports, its per-severity profile, the 4 extras apart, and the mCE against
the baseline runs; read from the trial where it ran the same test, else measured here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis import log
from analysis.runs import ImageCache, RunRecord, load_model
from data_zoo.cache import default_cache_dir
from stress import corruptions
from stress.corruptions.published import published_sets
from stress.corruptions.stored import SetCache
from tracking import metrics, plots

DEFAULT_CORRUPTION_IMAGES = 1000
SPOT_CHECKED_SETS = 2  # of a trial's 95 logged (corruption, severity) accuracies, recomputed here before the rest is reused


def published_folder(runs: list[RunRecord], folder: str | None) -> str | None:
    """The published arrays to read: ``folder`` if given, else the one every run's trial read (``robustness_data``)."""
    logged = {r.params.get("robustness_data") if r.params.get("robustness_data") not in (None, "None") else None for r in runs}
    return folder or (logged.pop() if len(logged) == 1 else None)


def reusable(trial: dict | None, n_images: int, folder: str | None) -> bool:
    """A trial's logged test stands for this one: the same subset size, every corruption, the same published folder
    (its ``source`` well formed: a store's content is data, not trusted)."""
    source = (trial or {}).get("source")
    well_formed = isinstance(source, dict) and source.get("kind") in ("published", "generated", "mixed") \
        and isinstance(source.get("generated"), list) and isinstance(source.get("libraries"), dict)
    return bool(trial) and well_formed and trial["images"] == n_images and set(trial["accuracy"]) == set(corruptions.CORRUPTIONS) \
        and all(len(v) == len(corruptions.SEVERITIES) for v in trial["accuracy"].values()) and source.get("published_folder") == folder


def spot_check(trial: dict, predict, x: np.ndarray, labels: np.ndarray, published: dict | None, cache: SetCache,
               rng: np.random.Generator, n_sets: int = SPOT_CHECKED_SETS) -> str | None:
    """Recompute ``n_sets`` of the trial's (corruption, severity) accuracies, drawn at random (fresh entropy: whoever
    edits robustness.json cannot know which), on the same images ``x``; how one differs from the logged figure by more
    than rounding on another device can explain (half an image and 0.5%), or None."""
    names = sorted(corruptions.CORRUPTIONS)
    for _ in range(n_sets):
        name, severity = names[int(rng.integers(len(names)))], int(rng.choice(corruptions.SEVERITIES))
        images = published[name, severity] if published and (name, severity) in published else \
            cache.get(name, severity, lambda: corruptions.corrupt(x, name, severity, 0))
        measured, logged = float((predict(images) == labels).mean()), trial["accuracy"][name][severity - 1]
        if abs(measured - logged) > 0.005 + 0.5 / len(labels):
            return f"its trial logged {logged:.4f} under {name} at severity {severity}, its weights give {measured:.4f} on the same {len(labels)} images"
    return None


def robustness_step(runs: list[RunRecord], images: ImageCache, out: Path, n_images: int | None, baseline: tuple[str, str] | None,
                    reuse: bool = True, folder: str | None = None, rng: np.random.Generator | None = None) -> dict | None:
    """Accuracy under every corruption and severity on a class-balanced test subset; mCE (over the 15) against the
    baseline runs; the published anchor beside the best run.

    A run whose trial ran the same test (``robustness: true`` on the same subset, from the same published arrays or
    none) is read from its logged robustness.json: same subset rule, corruption seeds and fp32 model, so the same
    numbers (a test checks it) without the inference, which dominates a CPU analysis; ``spot_check`` first recomputes
    two of its sets (``rng``), and a file they do not bear out is measured again, with a warning. ``n_images`` None means the
    trials' subset where every run logged one of the same size, else DEFAULT_CORRUPTION_IMAGES. ``folder``: the
    published arrays (default: the trials' ``robustness_data``)."""
    if n_images == 0:
        return None
    folder = published_folder(runs, folder)
    logged = {r.name: r.trial_robustness for r in runs} if reuse else {}
    if n_images is None:
        requested = {v["requested"] for v in logged.values() if v}
        n_images = requested.pop() if len(requested) == 1 and all(logged.get(r.name) for r in runs) else DEFAULT_CORRUPTION_IMAGES
    results, sources, generated, rng = {}, {}, {}, rng or np.random.default_rng()
    for run in runs:
        x, mean, std = images.get(run)
        p = run.predictions
        pos = corruptions.first_per_class(p.labels, len(p.classes), n_images)  # the same definition the trials use
        trial, key, predict = logged.get(run.name), (id(x), pos.tobytes()), corruptions.classifier(load_model(run), mean, std)
        if key not in sources:  # read or corrupted once per data set and subset, for every run on it
            published = published_sets(folder, p.index[pos], p.labels[pos], x.shape[2:]) if folder else None
            sources[key] = (published, SetCache(default_cache_dir(), x[pos], seed=0))  # the analyst's cache (the trials' by default)
        published, cache = sources[key]
        if reusable(trial, len(pos), folder):
            if not (problem := spot_check(trial, predict, x[pos], p.labels[pos], published, cache, rng)):
                results[run.name] = {"clean": float((p.preds[pos] == p.labels[pos]).mean()), "accuracy": trial["accuracy"], "measured": "trial",
                                     "source": trial["source"]}
                continue
            log(f"warning: {run.name}'s {metrics.ROBUSTNESS_FILE} is not what its weights give ({problem}): measured again here")
        if key not in generated:
            generated[key] = (list(corruptions.corrupted_sets(x[pos], published=published, cache=cache)), corruptions.source(published, folder))
            log(cache.summary())
        results[run.name] = {"clean": float((predict(x[pos]) == p.labels[pos]).mean()), "measured": "analysis", "source": generated[key][1],
                             "accuracy": corruptions.corruption_accuracy(predict, None, p.labels[pos], sets=generated[key][0])}
        log(f"corruptions: {run.name} done")
    summary = {"images": int(len(pos)), "baseline_runs": baseline_runs(runs, baseline), "runs": results,
               "measured_in_trials": sum(r["measured"] == "trial" for r in results.values())}
    add_figures(summary)
    summary["anchor"] = anchor(runs, summary)
    (out / "robustness.json").write_text(json.dumps(summary, indent=1))
    names = list(corruptions.BENCHMARK) + list(corruptions.EXTRAS)
    matrix = np.array([[np.mean(results[r]["accuracy"][c]) for r in results] for c in names])
    labels = list(corruptions.BENCHMARK) + [f"{c} (extra)" for c in corruptions.EXTRAS]
    summary["figure"] = plots.plot_heatmap(matrix, labels, list(results), out / "corruption_heatmap.png",
                                           "accuracy under corruption (mean over severities 1-5); the 15 benchmark corruptions, then the extras")
    return summary


def baseline_runs(runs: list[RunRecord], baseline: tuple[str, str] | None) -> list[str]:
    return [r.name for r in runs if baseline and r.params.get(baseline[0]) == baseline[1]] or [runs[0].name]


def add_figures(summary: dict) -> None:
    """Per run: the 15-corruption mean (``mean_corruption_acc``), its per-severity profile, the extras' mean, and the
    mCE over the 15 against the mean error of the baseline runs."""
    results, bench = summary["runs"], corruptions.BENCHMARK
    base_err = {c: list(np.mean([[1 - a for a in results[b]["accuracy"][c]] for b in summary["baseline_runs"]], axis=0)) for c in bench}
    for r in results.values():
        figures = corruptions.summarise(r["accuracy"])
        r.update(mean_corruption_acc=figures["mean"], per_severity=figures["per_severity"], extras_mean_acc=figures["extras_mean"],
                 mce=corruptions.mean_corruption_error({c: [1 - a for a in r["accuracy"][c]] for c in bench}, base_err))


def anchor(runs: list[RunRecord], summary: dict) -> dict:
    """The published figure beside the sweep's best run (by the 15-corruption mean), with what differs between them."""
    results = summary["runs"]
    best = max(results, key=lambda n: results[n]["mean_corruption_acc"])
    params = next(r.params for r in runs if r.name == best)
    source = results[best]["source"]
    differs = [f"architecture ({params.get('arch', '?')} vs WideResNet-28-10)", f"training ({params.get('epochs', '?')} epochs vs 200)",
               f"{summary['images']} class-balanced test images vs all 10,000",
               "the published arrays" if source["kind"] == "published" else
               f"corruptions generated here with seeded draws ({', '.join(f'{k} {v}' for k, v in source['libraries'].items())}) "
               f"for {len(source['generated'])} of 19, not the published arrays"]
    cifar10 = params.get("data.name", "cifar10") in ("cifar10", "imagefolder")
    return {**corruptions.ANCHOR, "best_run": best, "best_mean_corruption_acc": results[best]["mean_corruption_acc"],
            "best_clean": results[best]["clean"], "differs": differs, "comparable_data": cifar10}
