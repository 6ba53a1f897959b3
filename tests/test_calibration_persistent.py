"""Calibration (ECE, temperature) and persistent-failure counts against direct computations."""
import numpy as np
from scipy.special import softmax
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


def test_temperature_scaling_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    calibrated = rng.normal(0, 2, (20000, 5))  # logits whose softmax is the true label distribution
    cdf = np.cumsum(softmax(calibrated, axis=1), 1)
    labels = (rng.random((20000, 1)) > cdf).sum(1)  # labels drawn from it
    t = calibration.fit_temperature(calibrated * 3.0, labels)  # the model's logits: three times too confident
    assert t == pytest.approx(3.0, rel=0.05)
    assert calibration.ece(softmax(calibrated * 3.0 / t, axis=1), labels) < calibration.ece(softmax(calibrated * 3.0, axis=1), labels) / 3


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
    from stress.corruptions import mean_corruption_error

    base = {"a": [0.1, 0.2], "b": [0.2, 0.2]}
    assert mean_corruption_error({"a": [0.05, 0.1], "b": [0.4, 0.4]}, base) == pytest.approx((0.5 + 2.0) / 2)
