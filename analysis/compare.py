"""Baseline vs variant, matched by seed: accuracy deltas, fixed/still/new failures, McNemar's test."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from analysis import gradcam, log, photos
from analysis.runs import ImageCache, Predictions, RunRecord, load_model, safe_names
from config.errors import InputError
from data_zoo.loader import normalise
from tracking import plots

IGNORED_PARAMS = ("data.root", "data.cache_dir", "eval_batch_size")  # where and how fast, not what


def parse_selector(text: str) -> tuple[str, str]:
    """``augment=none`` -> ('augment', 'none')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"selector {text!r} must look like KEY=VALUE, e.g. augment=none")
    return key.strip(), value.strip()


def check_selectors(runs: list[RunRecord], baseline: tuple[str, str], variant: tuple[str, str]) -> None:
    """Before any work: both selectors name the same logged param, and each selects at least one run."""
    if variant[0] != baseline[0]:
        raise InputError(f"--baseline and --variant must select the same setting, got {baseline[0]!r} and {variant[0]!r}")
    key = baseline[0]
    values = sorted({r.params[key] for r in runs if key in r.params})
    if not values:
        params = sorted({k for r in runs for k in r.params})
        raise InputError(f"no run logs a param {key!r}; the params are: {', '.join(params)}")
    for flag, (_, value) in (("--baseline", baseline), ("--variant", variant)):
        if value not in values:
            raise InputError(f"{flag} {key}={value}: no run has it; {key} takes {', '.join(values)} in this sweep")


def pair_runs(runs: list[RunRecord], baseline: tuple[str, str], variant: tuple[str, str]) -> list[tuple[RunRecord, RunRecord]]:
    """(baseline, variant) runs that differ only in the selector's setting (so same seed, same everything else)."""
    key = baseline[0]
    base = {identity(r, key): r for r in runs if r.params.get(key) == baseline[1]}
    pairs = [(base[identity(r, key)], r) for r in runs if r.params.get(key) == variant[1] and identity(r, key) in base]
    return sorted(pairs, key=lambda p: p[0].name)


@dataclass
class Transitions:
    """Failure sets by test index: fixed by the variant, still failing, newly introduced."""

    fixed: list[int]
    still: list[int]
    new: list[int]


def transitions(base: Predictions, variant: Predictions, threshold: float) -> Transitions:
    """Fixed: baseline confidently wrong, variant right. Still: baseline confidently wrong, variant wrong.
    New: variant confidently wrong, baseline right."""
    if not np.array_equal(base.index, variant.index):
        raise ValueError("the two runs were evaluated on different test images; compare runs on the same data")
    base_fail, var_fail = base.confident_failures(threshold), variant.confident_failures(threshold)
    pick = lambda mask: sorted(int(i) for i in base.index[mask])
    return Transitions(pick(base_fail & variant.correct), pick(base_fail & ~variant.correct), pick(var_fail & base.correct))


def mcnemar(base_correct: np.ndarray, variant_correct: np.ndarray) -> dict[str, float]:
    """McNemar's test on paired predictions (statsmodels): b = only the baseline right, c = only the variant right.

    The exact binomial test when b + c < 25, where the chi-squared approximation is poor; else chi-squared with
    the continuity correction."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    b = int((base_correct & ~variant_correct).sum())
    c = int((~base_correct & variant_correct).sum())
    if b + c == 0:
        return {"b": 0, "c": 0, "test": "none (no discordant pairs)", "statistic": 0.0, "p_value": 1.0}
    both, neither = int((base_correct & variant_correct).sum()), int((~base_correct & ~variant_correct).sum())
    exact = b + c < 25
    result = sm_mcnemar([[both, b], [c, neither]], exact=exact, correction=True)
    return {"b": b, "c": c, "test": "exact binomial" if exact else "chi2, continuity-corrected", "statistic": float(result.statistic),
            "p_value": float(result.pvalue)}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (statsmodels), in the given order: a family of pairs, no vote counting."""
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(p_values, method="holm")[1]] if p_values else []


def identity(run: RunRecord, *ignored: str) -> tuple:
    """The run's settings but ``ignored`` ones (and where/how fast it ran): runs equal on it differ only there."""
    return tuple(sorted((k, v) for k, v in run.params.items() if k not in ignored and k not in IGNORED_PARAMS))


def seed_churn(runs: list[RunRecord], threshold: float) -> dict | None:
    """Fixed/introduced confident failures between seeds of one configuration: the churn no change causes.

    Over every ordered pair (seed a -> seed b) of runs equal in all settings but the seed; None with fewer than two seeds."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(identity(run, "seed"), []).append(run)
    fixed, new = [], []
    for members in groups.values():
        for a in members:
            for b in members:
                if a is not b:
                    t = transitions(a.predictions, b.predictions, threshold)
                    fixed.append(len(t.fixed))
                    new.append(len(t.new))
    if not fixed:
        return None
    return {"pairs": len(fixed), "fixed": mean_std(fixed), "new": mean_std(new)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def interval95(values: list[float]) -> tuple[float, float]:
    """95% t-interval of the mean (the mean twice for one value)."""
    mean, std = mean_std(values)
    if len(values) < 2:
        return mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * std / np.sqrt(len(values))
    return mean - half, mean + half


def per_class_table(pairs: list[tuple[RunRecord, RunRecord]]) -> list[dict]:
    """Per-class accuracy of baseline and variant and their delta, mean and std over the pairs, plus overall."""
    classes = pairs[0][0].predictions.classes
    rows = []
    for k, name in enumerate(classes + ["overall"]):
        def acc(p: Predictions) -> float:
            mask = p.labels == k if name != "overall" else np.ones_like(p.labels, bool)
            return float(p.correct[mask].mean()) if mask.any() else float("nan")

        base = [acc(b.predictions) for b, _ in pairs]
        var = [acc(v.predictions) for _, v in pairs]
        delta = [v - b for b, v in zip(base, var)]
        rows.append({"class": name, "baseline": mean_std(base), "variant": mean_std(var), "delta": mean_std(delta), "delta_ci95": interval95(delta)})
    return rows


def beyond_churn(change: dict, churn: dict | None) -> bool | None:
    """Whether a change's mean fixed or introduced count per pair lies outside the seed churn's mean ± 2 std."""
    if churn is None:
        return None
    return any(abs(change[k][0] - churn[k][0]) > 2 * churn[k][1] for k in ("fixed", "new"))


def stratum(name: str, rows: list[dict], churn: dict | None) -> dict:
    """One architecture's (or the pooled) summary of a change: accuracy delta and interval, fixed/new per pair, churn."""
    deltas = [r["variant_acc"] - r["baseline_acc"] for r in rows]
    out = {"stratum": name, "pairs": len(rows), "delta": mean_std(deltas), "delta_ci95": interval95(deltas),
           "fixed": mean_std([len(r["fixed"]) for r in rows]), "new": mean_std([len(r["new"]) for r in rows]), "churn": churn}
    low, high = out["delta_ci95"]
    out["verdict"] = ("a single pair, so no interval" if len(rows) < 2 else "an improvement" if low > 0 else "a degradation" if high < 0
                      else "not distinguishable from seed noise")
    out["beyond_churn"] = beyond_churn(out, churn)
    return out


@dataclass
class Comparison:
    """Baseline vs variant over the matched pairs."""

    baseline: str
    variant: str
    pairs: list[dict]
    per_class: list[dict]  # pooled over every pair
    strata: list[dict] = field(default_factory=list)  # per architecture (then pooled, marked): interval, fixed/new, seed churn
    figures: dict[str, Path] = field(default_factory=dict)


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

    pairs = pair_runs(runs, baseline, variant)
    if not pairs:
        log(f"no run pairs differ only in {baseline[0]} ({baseline[1]} vs {variant[1]}); comparison skipped")
        return None
    label = f"{baseline[0]}={baseline[1]} vs {variant[1]}"
    rows = []
    for base, var in pairs:
        t = transitions(base.predictions, var.predictions, threshold)
        rows.append({"baseline": base.name, "variant": var.name, "baseline_run_id": base.run_id, "variant_run_id": var.run_id,
                     "arch": base.params.get("arch", "?"), "baseline_acc": float(base.predictions.correct.mean()),
                     "variant_acc": float(var.predictions.correct.mean()), "fixed": t.fixed, "still": t.still, "new": t.new,
                     "mcnemar": mcnemar(base.predictions.correct, var.predictions.correct)})
    for row, p_holm in zip(rows, holm([r["mcnemar"]["p_value"] for r in rows])):
        row["mcnemar"]["p_holm"] = p_holm
    result = Comparison(f"{baseline[0]}={baseline[1]}", f"{variant[0]}={variant[1]}", rows, per_class_table(pairs),
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
                                                                  normalise(x[pos], mean, std), run.predictions.preds[pos])
        p = base.predictions
        titles = [f"#{i} {'fixed' if i in rows[0]['fixed'] else 'new'}: {p.classes[p.labels[q]]}; {p.classes[p.preds[q]]}->{p.classes[var.predictions.preds[q]]}"
                  for i, q in zip(shown, pos)]
        result.figures["before_after"] = photos.cam_figure(x[pos], columns, titles, folder / "gradcam_before_after.webp")
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
        out.append(stratum(arch, [r for r in rows if r["arch"] == arch], seed_churn(base_runs, threshold)))
    if len(out) != 1:
        base_runs = [r for r in runs if r.params.get(key) == value]
        out.append(stratum("pooled over architectures" if archs else "all pairs", rows, seed_churn(base_runs, threshold)))
    return out
