"""One trial, called directly: determinism, exact resume, divergence, early stopping."""
import math

import numpy as np

import pytest
import torch

import metrics
from schema import build
from config import TrialConfig
from tests.conftest import TINY
from trainable import DivergedError, fit
from tracking import TrialRun


def tiny(**overrides) -> TrialConfig:
    problems = []
    data = {k: v for k, v in TINY.items() if k not in ("resources", "max_failures")}
    cfg = build(TrialConfig, {**data, **overrides}, "", problems)
    assert not problems, problems
    return cfg


class Recorder:
    """A report function that keeps every epoch's metrics and checkpoint state; can stop after N epochs."""

    def __init__(self, stop_after: int | None = None):
        self.values, self.states, self.stop_after = [], [], stop_after

    def __call__(self, values, state):
        self.values.append(dict(values))
        self.states.append({k: (v.copy() if hasattr(v, "copy") else v) for k, v in state.items()})
        if self.stop_after and len(self.values) == self.stop_after:
            raise KeyboardInterrupt("stopped")


def test_same_seed_twice_gives_identical_metrics_and_another_seed_does_not():
    cfg = tiny(augment="cutout", epochs=2)
    a, b = fit(cfg, TrialRun(), Recorder()), fit(cfg, TrialRun(), Recorder())
    assert a[metrics.TEST_ACC] == b[metrics.TEST_ACC] and a[metrics.TRAIN_LOSS] == b[metrics.TRAIN_LOSS]
    c = fit(tiny(augment="cutout", epochs=2, seed=43), TrialRun(), Recorder())
    assert c[metrics.TRAIN_LOSS] != a[metrics.TRAIN_LOSS]


def test_stopped_and_resumed_trial_ends_exactly_like_an_uninterrupted_one():
    cfg = tiny(augment="cropflip", epochs=3)
    full = Recorder()
    expected = fit(cfg, TrialRun(), full)
    first = Recorder(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, TrialRun(), first)
    state = first.states[-1]
    assert state["epoch"] == 1
    resumed = Recorder()
    result = fit(cfg, TrialRun(), resumed, state=state)
    assert [v[metrics.EPOCH] for v in resumed.values] == [2, 3]
    for key in (metrics.TRAIN_LOSS, metrics.VAL_ACC, metrics.TEST_ACC, metrics.TEST_LOSS):
        assert result[key] == expected[key], key


def test_epoch_reports_carry_every_epoch_metric_and_test_metrics_at_the_end():
    rec = Recorder()
    fit(tiny(epochs=2), TrialRun(), rec)
    for values in rec.values:
        assert set(metrics.EPOCH_METRICS) <= set(values)
    assert metrics.TEST_ACC not in rec.values[0]
    assert set(metrics.FINAL_METRICS) <= set(rec.values[-1])
    assert sum(k.startswith("test/class_acc/") for k in rec.values[-1]) == 10
    assert rec.values[0][metrics.LR] < rec.values[1][metrics.LR]  # onecycle warms up


def test_diverging_trial_stops_at_once():
    rec = Recorder()
    with pytest.raises(DivergedError, match="training loss is (nan|inf) at epoch 1"):
        fit(tiny(epochs=5, optimizer={"lr": 1e6, "momentum": 0.9}, schedule={"name": "constant"}), TrialRun(), rec)
    assert rec.values == []


def test_early_stopping_ends_the_trial_and_still_evaluates_the_test_set():
    rec = Recorder()
    result = fit(tiny(epochs=30, optimizer={"lr": 1e-6}, schedule={"name": "constant"}, early_stopping={"patience": 1, "metric": "val/loss", "mode": "min"}), TrialRun(), rec)
    assert len(rec.values) < 30 and metrics.TEST_ACC in result and math.isfinite(result[metrics.TEST_LOSS])


def test_warmup_then_cosine_schedule():
    from engine import lr_factor
    from config import ScheduleConfig

    s = ScheduleConfig(name="cosine", warmup_epochs=2)
    factors = [lr_factor(s, 10, e) for e in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3) and factors[2] == 1.0
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert lr_factor(ScheduleConfig(), 50, 24) == 1.0 and lr_factor(ScheduleConfig(), 50, 25) == pytest.approx(0.1) and lr_factor(ScheduleConfig(), 50, 45) == pytest.approx(0.01)


def test_classification_report_matches_direct_computation():
    import numpy as np

    from engine import classification_report

    probs = np.array([[0.95, 0.05], [0.2, 0.8], [0.92, 0.08], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    report = classification_report(probs, labels, ["a", "b"], 0.9)
    m = report["metrics"]
    assert report["confusion"].tolist() == [[1, 0], [1, 2]]
    assert m[metrics.TEST_ACC] == 0.75 and m[metrics.TEST_CONFIDENT_ERRORS] == 1
    assert m[metrics.TEST_PRECISION] == pytest.approx((0.5 + 1.0) / 2)
    assert m[metrics.TEST_RECALL] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["test/class_acc/b"] == pytest.approx(2 / 3)


def test_checkpoint_state_loads_weights_only(tmp_path):
    from trainable import STATE_FILE, load_state

    rec = Recorder()
    fit(tiny(epochs=1), TrialRun(), rec)
    torch.save(rec.states[-1], tmp_path / STATE_FILE)
    assert load_state(str(tmp_path))["epoch"] == 1
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {tmp_path / STATE_FILE}"):
        load_state(str(tmp_path))


def test_end_of_trial_robustness_is_reported_as_metrics():
    result = fit(tiny(epochs=1, robustness=True, robustness_images=40), TrialRun(), Recorder())
    assert 0 <= result[metrics.MEAN_CORRUPTION_ACC] <= 1
    per_corruption = [k for k in result if k.startswith("robustness/") and k != metrics.MEAN_CORRUPTION_ACC]
    assert len(per_corruption) >= 10
    assert result[metrics.MEAN_CORRUPTION_ACC] == pytest.approx(np.mean([result[k] for k in per_corruption]))


def test_determinism_settings_follow_the_config_and_are_stated():
    from engine import determinism, seed_everything

    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert determinism(torch.device("cpu"), tiny()).startswith("bitwise deterministic on the same CPU thread count")
        assert "not guaranteed" not in determinism(torch.device("cuda"), tiny())
        assert "Inductor" in determinism(torch.device("cuda"), tiny(compile=True))
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert determinism(torch.device("cuda"), tiny(deterministic=False)).startswith("not deterministic")
    finally:
        seed_everything(0, deterministic=True)
