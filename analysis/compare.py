"""Baseline vs variant, matched by seed: accuracy deltas, fixed/still/new failures, McNemar's test."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from analysis.runs import Predictions, RunRecord
from schema import InputError

IGNORED_PARAMS = ("data.root", "data.cache_dir", "eval_batch_size")  # where and how fast, not what


def parse_selector(text: str) -> tuple[str, str]:
    """``augment=none`` -> ('augment', 'none')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"selector {text!r} must look like KEY=VALUE, e.g. augment=none")
    return key.strip(), value.strip()


def pair_runs(runs: list[RunRecord], baseline: tuple[str, str], variant: tuple[str, str]) -> list[tuple[RunRecord, RunRecord]]:
    """(baseline, variant) runs that differ only in the selector's setting (so same seed, same everything else)."""
    key = baseline[0]
    if variant[0] != key:
        raise InputError(f"--baseline and --variant must select the same setting, got {baseline[0]!r} and {variant[0]!r}")

    def identity(run: RunRecord) -> tuple:
        return tuple(sorted((k, v) for k, v in run.params.items() if k != key and k not in IGNORED_PARAMS))

    base = {identity(r): r for r in runs if r.params.get(key) == baseline[1]}
    pairs = [(base[identity(r)], r) for r in runs if r.params.get(key) == variant[1] and identity(r) in base]
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
    base_fail = ~base.correct & (base.confidence > threshold)
    var_fail = ~variant.correct & (variant.confidence > threshold)
    pick = lambda mask: sorted(int(i) for i in base.index[mask])
    return Transitions(pick(base_fail & variant.correct), pick(base_fail & ~variant.correct), pick(var_fail & base.correct))


def mcnemar(base_correct: np.ndarray, variant_correct: np.ndarray) -> dict[str, float]:
    """McNemar's test on paired predictions: b = only baseline right, c = only variant right.

    Chi-squared with continuity correction, (|b - c| - 1)^2 / (b + c); the p-value is the exact
    two-sided binomial one when b + c < 25, where the chi-squared approximation is poor.
    """
    b = int((base_correct & ~variant_correct).sum())
    c = int((~base_correct & variant_correct).sum())
    if b + c == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0}
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    p = stats.binomtest(b, b + c, 0.5).pvalue if b + c < 25 else stats.chi2.sf(statistic, 1)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": float(p)}


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
