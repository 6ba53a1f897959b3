"""GPU paths: bf16/fp16 autocast, channels_last, device-resident data, fractional GPUs. Run where CUDA is."""
import dataclasses

import pytest
import torch

from tracking import metrics
from tests.conftest import TINY, write_experiments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU paths run on a machine with one")


def tiny_cfg(**overrides):
    from config.settings import TrialConfig
    from config.schema import build

    problems: list = []
    base = {k: v for k, v in TINY.items() if k not in ("resources", "max_failures")}
    cfg = build(TrialConfig, {**base, **overrides}, "", problems)
    assert not problems
    return cfg


def test_precision_is_bf16_or_fp16_with_a_scaler_on_cuda():
    from training.engine import pick_precision

    precision = pick_precision(torch.device("cuda"), amp=True)
    if torch.cuda.is_bf16_supported():
        assert precision.dtype == torch.bfloat16 and precision.scaler is None
    else:
        assert precision.dtype == torch.float16 and precision.scaler is not None
    assert pick_precision(torch.device("cuda"), amp=False).dtype is None


def test_data_stays_on_the_device_and_batches_are_channels_last():
    from data_zoo import Augmenter, iterate_batches, load_bundle

    bundle = load_bundle(dataclasses.asdict(tiny_cfg().data), "cuda")
    assert bundle.train.x.is_cuda and bundle.train.x.dtype == torch.uint8 and bundle.test.x.is_cuda
    assert bundle.mean.is_cuda and bundle.black().is_cuda  # constants live on the device: nothing copied per batch
    gen = torch.Generator("cuda").manual_seed(0)
    x, y, _ = next(iterate_batches(bundle, bundle.train, 64, gen, Augmenter("cutout", fill=bundle.black()), channels_last=True))
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)


def trained(cfg, force_fp16: bool = False):
    """(per-epoch train losses, final weights) of ``fit`` on CUDA; ``force_fp16``: fp16 + GradScaler even where bf16 works."""
    import contextlib
    from unittest import mock

    from training import engine
    from tracking import TrialRun
    from trainable import fit

    states, values = [], []
    fp16 = engine.Precision(torch.float16, torch.amp.GradScaler("cuda"))
    with mock.patch("trainable.pick_precision", lambda device, amp: fp16) if force_fp16 else contextlib.nullcontext():
        result = fit(cfg, TrialRun(), lambda v, s: (values.append(v[metrics.TRAIN_LOSS]), states.append(s)))
    return values, states[-1]["model"], result


@pytest.mark.parametrize("force_fp16", [False, True], ids=["bf16-or-fp16", "fp16-grad-scaler"])
def test_amp_training_on_cuda_is_finite_and_bitwise_deterministic(force_fp16):
    cfg = tiny_cfg(amp=True, channels_last=True, deterministic=True, augment="cutout")
    losses_a, weights_a, _ = trained(cfg, force_fp16)
    losses_b, weights_b, _ = trained(cfg, force_fp16)
    assert all(torch.isfinite(torch.tensor(losses_a)))
    assert losses_a == losses_b  # bitwise, every epoch
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_augmentation_on_the_gpu_draws_from_a_cuda_generator_and_replays():
    from data_zoo import Augmenter
    from training.engine import epoch_generator

    x = torch.randn(32, 3, 32, 32, device="cuda")
    aug = Augmenter("cutout")
    gen = epoch_generator(3, 0, x.device)
    assert gen.device.type == "cuda"
    assert torch.equal(aug(x, epoch_generator(3, 0, x.device)), aug(x, epoch_generator(3, 0, x.device)))
    assert not torch.equal(aug(x, epoch_generator(3, 0, x.device)), aug(x, epoch_generator(3, 1, x.device)))


def test_fractional_gpu_trials_share_one_gpu(tmp_path):
    import mlflow

    import sweep
    import tracking

    path = write_experiments(tmp_path / "e.yaml", {"gpu": {"resources": {"cpu": 1, "gpu": 0.5}, "grid": {"seed": [1, 2]}}})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert sweep.main(["--config", str(path), "--experiment", "gpu", "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("gpu").experiment_id], f"tags.`{tracking.KIND_TAG}` = 'trial'")
    assert len(runs) == 2 and all(r.data.tags["device"] != "cpu" for r in runs)
    starts, ends = sorted(r.info.start_time for r in runs), sorted(r.info.end_time for r in runs)
    assert starts[1] < ends[0]  # both trials ran at the same time on the one GPU
    from analysis.integrity import verify_runs
    from analysis.runs import ImageCache, find_runs

    # The analysis recomputes on the CPU, in fp32, what the GPU evaluated (cuDNN may use TF32 there): every test image's
    # probabilities agree within the integrity check's tolerance, so an honest GPU run is never refused.
    verify_runs(find_runs("gpu", uri, log=lambda *_: None), ImageCache(), n_images=10**6)


@pytest.mark.parametrize("arch", ["plain_cnn", "residual_cnn", "se_cnn", "resnet18"])
def test_every_model_trains_under_strict_deterministic_algorithms(arch):
    """torch raises (not warns) here on any op without a deterministic CUDA implementation."""
    from training.engine import seed_everything
    from model_zoo import create_model

    seed_everything(0, deterministic=True)
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        model = create_model(arch, 10).cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32, device="cuda")), torch.arange(8, device="cuda"))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        torch.use_deterministic_algorithms(True, warn_only=True)
