"""One trial, called directly: determinism, exact resume, divergence, early stopping."""
import copy
import dataclasses
import math

import numpy as np

import pytest
import torch

from tracking import metrics
from config.schema import build
from config.settings import TrialConfig
from tests.conftest import TINY
import trainable
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
        self.states.append(copy.deepcopy(state))  # the live tensors change after the report
        if self.stop_after and len(self.values) == self.stop_after:
            raise KeyboardInterrupt("stopped")


def test_same_seed_twice_gives_identical_metrics_and_another_seed_does_not():
    cfg = tiny(augment="cutout", epochs=2)
    a, b = fit(cfg, TrialRun(), Recorder()), fit(cfg, TrialRun(), Recorder())
    assert a[metrics.TEST_ACC] == b[metrics.TEST_ACC] and a[metrics.TRAIN_LOSS] == b[metrics.TRAIN_LOSS]
    c = fit(tiny(augment="cutout", epochs=2, seed=43), TrialRun(), Recorder())
    assert c[metrics.TRAIN_LOSS] != a[metrics.TRAIN_LOSS]


def test_the_largest_seeds_the_experiment_file_accepts_train_a_trial():
    from config.settings import SEED_MAX

    cfg = tiny(epochs=2, seed=SEED_MAX, data={**TINY["data"], "split_seed": SEED_MAX})
    result = fit(cfg, TrialRun(), Recorder())
    assert result[metrics.EPOCH] == 2 and math.isfinite(result[metrics.TRAIN_LOSS]) and 0 <= result[metrics.TEST_ACC] <= 1
    problems = []
    build(TrialConfig, {"seed": SEED_MAX + 1, "data": {"split_seed": -1}}, "", problems)
    assert problems == [("data.split_seed", f"must be in [0, {SEED_MAX}], got -1"), ("seed", f"must be in [0, {SEED_MAX}], got {SEED_MAX + 1}")]


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


def scheduled_lrs(cfg: TrialConfig, n_train: int) -> list[float]:
    """The lr before every optimiser step of a whole run, from the scheduler ``fit`` builds."""
    from training.engine import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(optimizer, cfg, n_train)
    lrs = []
    for _ in range(cfg.epochs * math.ceil(n_train / cfg.batch_size)):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def tiny_train_size() -> int:
    from data_zoo import load_bundle

    return len(load_bundle(dataclasses.asdict(tiny().data)).train)


def test_onecycle_follows_torch_onecyclelr_at_every_step():
    cfg = tiny(epochs=6, batch_size=128, schedule={"name": "onecycle"}, optimizer={"lr": 0.1})
    n_train = 8000 * 9 // 10  # the quick experiment: 7,200 training images, batch 128: 57 steps per epoch
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=0.1, total_steps=6 * 57, cycle_momentum=False)
    expected = []
    for _ in range(6 * 57):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    ours = scheduled_lrs(cfg, n_train)
    assert np.allclose(ours, expected, rtol=1e-9, atol=0)
    assert max(ours) == pytest.approx(0.1, rel=1e-3) and ours[-1] == pytest.approx(0.1 / 25 / 1e4)


def test_warmup_cosine_and_multistep_step_where_defined():
    cosine = scheduled_lrs(tiny(epochs=10, batch_size=100, schedule={"name": "cosine", "warmup_epochs": 2}, optimizer={"lr": 1.0}), 400)
    assert cosine[:8] == pytest.approx([(i + 1) / 8 for i in range(8)])  # linear warm-up, per step, over 2 epochs of 4 steps
    assert all(a > b for a, b in zip(cosine[8:], cosine[9:]))  # then per-step cosine decay
    assert cosine[8 + 16] == pytest.approx(0.5)  # half-way through the 32 post-warm-up steps
    multistep = scheduled_lrs(tiny(epochs=6, batch_size=100, schedule={"name": "multistep", "milestones": [2, 4], "gamma": 0.1}, optimizer={"lr": 1.0}), 400)
    assert multistep == pytest.approx([1.0] * 8 + [0.1] * 8 + [0.01] * 8)  # milestones count epochs


def test_fit_steps_the_schedule_per_batch():
    rec = Recorder()
    fit(tiny(epochs=2, schedule={"name": "onecycle"}, optimizer={"lr": 0.05}), TrialRun(), rec)
    steps = math.ceil(tiny_train_size() / 64)
    assert rec.states[-1]["scheduler"]["last_epoch"] == 2 * steps
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=0.05, total_steps=2 * steps, cycle_momentum=False)
    for _ in range(steps):
        reference_opt.step()
        reference.step()
    assert rec.values[1][metrics.LR] == pytest.approx(reference_opt.param_groups[0]["lr"])


def test_early_stopped_trial_is_tested_with_the_best_validation_epoch(monkeypatch):
    import trainable
    from training.engine import Precision, predict

    scripted = iter([0.50, 0.90, 0.60, 0.55, 0.52, 0.51])
    real = trainable.evaluate
    monkeypatch.setattr(trainable, "evaluate", lambda *a, **k: real(*a, **k) | {metrics.VAL_ACC: next(scripted)})
    rec = Recorder()
    cfg = tiny(epochs=6, early_stopping={"patience": 2, "metric": "val/acc", "mode": "max"}, schedule={"name": "constant"})
    result = fit(cfg, TrialRun(), rec)
    assert [v[metrics.EPOCH] for v in rec.values] == [1, 2, 3, 4] and result[metrics.TEST_EPOCH] == 2
    assert rec.states[-1]["best_epoch"] == 2

    def test_metrics(weights):
        from data_zoo import load_bundle
        from model_zoo import create_model

        bundle = load_bundle(dataclasses.asdict(cfg.data))
        model = create_model(cfg.arch, 10, **cfg.model)
        model.load_state_dict(weights)
        logits, _ = predict(model, bundle, bundle.test, 256, Precision(None, None), torch.device("cpu"))
        return torch.nn.functional.cross_entropy(logits, bundle.test.y).item(), (logits.argmax(1) == bundle.test.y).float().mean().item()

    best_loss, best_acc = test_metrics(rec.states[1]["model"])  # the checkpoint written after epoch 2
    last_loss, _ = test_metrics(rec.states[2]["model"])  # what the last epoch trained (states[3] holds the restored best)
    assert result[metrics.TEST_LOSS] == pytest.approx(best_loss, rel=1e-5) and result[metrics.TEST_ACC] == pytest.approx(best_acc)
    assert result[metrics.TEST_LOSS] != pytest.approx(last_loss, rel=1e-5)


def test_adamw_trains_with_decoupled_weight_decay():
    from training.engine import build_optimizer
    from model_zoo import create_model

    cfg = tiny(optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.05})
    optimizer = build_optimizer(create_model("plain_cnn", 10, widths=[8, 16, 16]), cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.05
    # decoupled decay: a parameter with zero gradient shrinks by exactly lr * wd per step (Loshchilov & Hutter 2019)
    w = torch.nn.Parameter(torch.ones(3))
    holder = torch.nn.Module()
    holder.w = w
    opt = build_optimizer(holder, cfg)
    w.grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.01 * 0.05))
    rec = Recorder()
    result = fit(cfg, TrialRun(), rec)
    assert "exp_avg" in rec.states[-1]["optimizer"]["state"][0] and math.isfinite(result[metrics.TRAIN_LOSS])
    assert rec.values[-1][metrics.TRAIN_LOSS] < rec.values[0][metrics.TRAIN_LOSS]


def one_epoch(cfg: TrialConfig):
    """(model before, model after, train metrics) of one epoch of ``train_epoch`` on the tiny data."""
    from data_zoo import Augmenter, load_bundle
    from training.engine import Precision, build_optimizer, epoch_generator, train_epoch
    from model_zoo import create_model

    torch.manual_seed(0)
    bundle = load_bundle(dataclasses.asdict(cfg.data))
    model = create_model(cfg.arch, 10, **cfg.model)
    before = copy.deepcopy(model)
    values = train_epoch(model, bundle, cfg, build_optimizer(model, cfg), Precision(None, None), epoch_generator(0, 0), Augmenter("none", {}), torch.device("cpu"))
    return before, model, values, bundle


def test_grad_clip_bounds_every_step():
    plain = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}
    distance = lambda a, b: torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), b.parameters()))).item()
    before, after, _, _ = one_epoch(tiny(optimizer=plain, grad_clip=1e-3, channels_last=False))
    steps = math.ceil(tiny_train_size() / 64)
    assert distance(before, after) <= steps * 0.1 * 1e-3 * (1 + 1e-4)  # plain SGD moves at most lr * max_norm per step
    before, after, _, _ = one_epoch(tiny(optimizer=plain, channels_last=False))
    assert distance(before, after) > 10 * steps * 0.1 * 1e-3


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    eps = 0.2
    cfg = tiny(label_smoothing=eps, batch_size=tiny_train_size(), optimizer={"lr": 1e-3}, channels_last=False)  # one batch: order cannot matter
    before, _, values, bundle = one_epoch(cfg)
    before.train()
    with torch.no_grad():
        log_p = torch.log_softmax(before(bundle.normalise(bundle.train.x)), 1)
    target = torch.full_like(log_p, eps / 10)
    target[torch.arange(len(log_p)), bundle.train.y] += 1 - eps  # Szegedy et al. 2016: (1 - eps) one-hot + eps / K
    assert values[metrics.TRAIN_LOSS] == pytest.approx(-(target * log_p).sum(1).mean().item(), rel=1e-5)


def test_classification_report_matches_direct_computation():
    import numpy as np

    from training.engine import classification_report

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
    from stress.corruptions import BENCHMARK, CORRUPTIONS, EXTRAS

    severities = [metrics.SEVERITY_CORRUPTION_ACC.format(s) for s in range(1, 6)]
    per_corruption = [k for k in result if k.startswith("robustness/") and k not in (metrics.MEAN_CORRUPTION_ACC, metrics.EXTRAS_CORRUPTION_ACC, *severities)]
    assert sorted(per_corruption) == sorted(metrics.CORRUPTION_ACC.format(c) for c in CORRUPTIONS) and len(per_corruption) == 19
    assert all(round(result[k] * 200) == pytest.approx(result[k] * 200, abs=1e-6) for k in per_corruption)  # means of 5 accuracies on 40 images
    assert result[metrics.MEAN_CORRUPTION_ACC] == pytest.approx(np.mean([result[metrics.CORRUPTION_ACC.format(c)] for c in BENCHMARK]))
    assert result[metrics.EXTRAS_CORRUPTION_ACC] == pytest.approx(np.mean([result[metrics.CORRUPTION_ACC.format(c)] for c in EXTRAS]))
    assert all(round(result[k] * 600) == pytest.approx(result[k] * 600, abs=1e-6) for k in severities)  # 15 accuracies on 40 images each
    assert np.mean([result[k] for k in severities]) == pytest.approx(result[metrics.MEAN_CORRUPTION_ACC])  # equal-sized groups


def test_determinism_settings_follow_the_config_and_are_stated():
    from training.engine import FP32, Precision, determinism, seed_everything

    bf16 = Precision(torch.bfloat16, None)

    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert determinism(torch.device("cpu"), tiny(), FP32).startswith("bitwise deterministic on the same CPU (the cpu tag) and thread count in fp32")
        assert "a CPU with native bf16: one without trains in fp32" in determinism(torch.device("cpu"), tiny(), bf16)
        assert determinism(torch.device("cuda"), tiny(), bf16).startswith("bitwise deterministic on the same GPU model in bf16 autocast")
        assert "Inductor" in determinism(torch.device("cuda"), tiny(compile=True), bf16)
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert determinism(torch.device("cuda"), tiny(deterministic=False), bf16).startswith("not deterministic")
    finally:
        seed_everything(0, deterministic=True)


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_trains_in_bf16_only_where_it_has_native_bf16_and_always_evaluates_in_fp32(monkeypatch, native):
    """amp: true on a CPU: the training forward runs under bf16 autocast where torch reports native bf16 (simulated
    both ways), fp32 elsewhere; validation, the test set and the stress tests always see fp32 activations, computed
    with cuDNN's TF32 off (what a GPU would evaluate with), which training leaves at torch's default. Asserted on the
    dtype of the activations the model's classifier head receives and on the flag when it receives them."""
    import training.engine as engine

    monkeypatch.setattr(engine, "cpu_native_bf16", lambda: native)
    seen: list[tuple[bool, torch.dtype]] = []
    tf32: list[tuple[bool, bool]] = []

    def hook(module, inputs, output):
        seen.append((module.training, output.dtype))
        tf32.append((module.training, torch.backends.cudnn.allow_tf32))

    real_create = trainable.create_model

    def create_model(*args, **kwargs):
        model = real_create(*args, **kwargs)
        model.head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainable, "create_model", create_model)
    run = TrialRun()
    cfg = tiny(epochs=1, amp=True, robustness=True, robustness_images=20, adversarial=True, adversarial_images=10, adversarial_steps=1)
    values = trainable.fit(cfg, run, lambda values, state: None, threads=1)
    train = {dtype for training, dtype in seen if training}
    evaluated = {dtype for training, dtype in seen if not training}
    assert train == ({torch.bfloat16} if native else {torch.float32}) and evaluated == {torch.float32}
    assert len(seen) > 95 * 1 + 2  # the corruption test's 95 sets were among the evaluations
    assert {flag for training, flag in tf32 if training} == {True} and {flag for training, flag in tf32 if not training} == {False}
    assert torch.backends.cudnn.allow_tf32 and metrics.ADVERSARIAL_ACC.format("pgd", 8) in values
    assert math.isfinite(values[metrics.TEST_ACC])
    assert engine.pick_precision(torch.device("cpu"), amp=True).name == ("bf16 autocast" if native else "fp32")
    assert engine.pick_precision(torch.device("cpu"), amp=False).name == "fp32"


@pytest.mark.skipif(not __import__("tracking.private_apis", fromlist=["x"]).cpu_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_training_on_a_cpu_repeats_exactly_with_the_same_threads():
    """The rerun promise under bf16 autocast on a CPU: the same config and thread count give the same test predictions."""
    first, second = ([], [])
    for out in (first, second):
        run = TrialRun()
        trainable.fit(tiny(epochs=2, amp=True), run, lambda values, state, out=out: out.append(values), threads=1)
    assert first[-1][metrics.TEST_ACC] == second[-1][metrics.TEST_ACC] and first[-1][metrics.TEST_LOSS] == second[-1][metrics.TEST_LOSS]


def test_a_rerun_on_a_cpu_without_native_bf16_says_it_cannot_be_exact(monkeypatch):
    import training.engine as engine
    from launch.best import precision_mismatch

    monkeypatch.setattr(engine, "cpu_native_bf16", lambda: False)
    assert "this machine's CPU trains the rerun in fp32 (it has no native bf16)" in precision_mismatch("bf16 autocast", True, 0)
    assert precision_mismatch("fp32", True, 0) is None and precision_mismatch(None, True, 0) is None
    monkeypatch.setattr(engine, "cpu_native_bf16", lambda: True)
    assert precision_mismatch("bf16 autocast", True, 0) is None and "in bf16 autocast" in precision_mismatch("fp32", True, 0)
    assert precision_mismatch("fp32", False, 0) is None


def test_a_rerun_on_another_cpu_says_its_digits_may_differ(monkeypatch):
    """Kernels differ by CPU: the same fp32 quick study tested 0.6383 on AMD Zen 4/5 and 0.6461 on an Intel AMX Xeon."""
    import training.engine as engine
    from launch.best import cpu_mismatch

    here = engine.cpu_identity()
    assert cpu_mismatch(here, 0) is None and cpu_mismatch(None, 0) is None
    other = "AMD EPYC 9B45 (family 26 model 2), torch AVX512, bf16 AVX512-BF16"
    assert other in cpu_mismatch(other, 0) and here in cpu_mismatch(other, 0) and "may not repeat" in cpu_mismatch(other, 0)
    assert cpu_mismatch(other, 0.5) is None  # a GPU rerun computes on its GPU


def test_the_cpu_identity_names_the_model_and_the_kernels_torch_picks(monkeypatch, tmp_path):
    import builtins

    import training.engine as engine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC 9R14 96-Core Processor\n\nprocessor\t: 1\nmodel name\t: other\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    monkeypatch.setattr(engine.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(engine, "cpu_bf16_unit", lambda: "AVX512-BF16")
    assert engine.cpu_identity() == "AMD EPYC 9R14 96-Core Processor (family 25 model 17), torch AVX512, bf16 AVX512-BF16"
    monkeypatch.setattr(engine, "cpu_bf16_unit", lambda: None)
    monkeypatch.setattr(engine.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert engine.cpu_identity().endswith("(family 25 model 17), torch AVX2, bf16 emulated")
