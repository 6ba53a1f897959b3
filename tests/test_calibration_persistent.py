"""Calibration (ECE, temperature) and persistent-failure counts against direct computations."""
import numpy as np
import pytest

from analysis import calibration, persistent
from analysis.runs import Predictions, RunRecord


def test_ece_matches_a_direct_computation_on_hand_made_probabilities():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 0, 1, 1, 0])
    # bins of width 1/15: 0.95 -> bin 14, 0.9 -> bin 13, 0.6 -> bin 8, 0.55 -> bin 8, 0.7 -> bin 10, 0.8 -> bin 11
    expected = (1 / 6) * abs(1 - 0.95) + (1 / 6) * abs(0 - 0.9) + (2 / 6) * abs(0.5 - 0.575) + (1 / 6) * abs(1 - 0.7) + (1 / 6) * abs(0 - 0.8)
    assert calibration.ece(probs, labels) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration.ece(perfect, np.array([0, 1])) == 0.0


def test_temperature_scaling_softens_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 2000)
    logits = rng.normal(0, 1, (2000, 5))
    logits[np.arange(2000), labels] += 1.0  # right class a bit more likely
    logits *= 8  # then made far too confident
    t = calibration.fit_temperature(logits, labels)
    assert 5 < t < 11
    assert calibration.ece(calibration.softmax(logits, t), labels) < calibration.ece(calibration.softmax(logits), labels) / 3


def run(name: str, probs, labels, params) -> RunRecord:
    record = RunRecord(name, name, params, {}, None, "")
    record.__dict__["predictions"] = Predictions(np.asarray(probs, float), np.asarray(labels), np.arange(len(labels)), ["a", "b"])
    return record


def test_persistent_counts_equal_a_brute_force_count():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    runs = []
    for r in range(5):
        p = rng.uniform(0, 1, 50)
        runs.append(run(f"r{r}", np.stack([p, 1 - p], 1), labels, {"augment": "none" if r < 3 else "cutout"}))
    counts = persistent.persistent_counts(runs, 0.8)
    brute = {}
    for i in range(50):
        n = sum(1 for rr in runs if rr.predictions.probs[i].argmax() != labels[i] and rr.predictions.probs[i].max() > 0.8)
        if n:
            brute[i] = n
    assert counts == brute
    groups = persistent.split_groups(runs, 0.8)
    assert groups["persistent"] == sorted(i for i, n in brute.items() if n >= 4)
    assert set(groups["dependent"]) == {i for i, n in brute.items() if n < 4}
    fixes = persistent.fixes_by_setting(runs, groups, "augment")
    pos = groups["dependent"]
    expected = np.mean([rr.predictions.correct[pos].mean() for rr in runs[3:]])
    assert fixes["cutout"]["dependent"] == pytest.approx(expected)


def test_mce_relative_to_baseline():
    from corruptions import mean_corruption_error

    base = {"a": [0.1, 0.2], "b": [0.2, 0.2]}
    assert mean_corruption_error({"a": [0.05, 0.1], "b": [0.4, 0.4]}, base) == pytest.approx((0.5 + 2.0) / 2)
