"""``python -m bench``: how fast stresslab trains, what Ray + MLflow cost, how fast Grad-CAM runs.

Prints, on whatever device it finds, in one run:
  1. training images/s of stresslab's loop vs a reference written like the seeds (torchvision-style
     dataset of PIL images + RandomCrop/Flip transforms + DataLoader with workers, fp32), per model,
     alternating the two so drift affects both; on a CPU, fp32 against bf16 autocast, for the loop and
     for the bare model step (1b);
  2. the overhead of Ray Tune + MLflow: a sweep of N trials vs the same trials in a plain process pool
     (half before and half after the sweep, so drift affects both);
  3. Grad-CAM images/s;
  4. on CUDA, each model's model-FLOPs utilisation against the GPU's bf16 peak (FLOPs counted by
     ``torch.utils.flop_counter.FlopCounterMode``, forward + backward);
  5. the time to generate every CIFAR-10-C corrupted set for 1,000 images (``bench/corruptions.py``);
  6. what MLflow's basic-auth login costs a REST request, without and with the login cache the Slurm job's server
     uses (``bench/mlflow_auth.py``).

``python -m bench --gpu-proof`` is the GPU proof instead (``bench/gpu_proof.py``; see its --help).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def trial_config(arch: str, n_train: int, epochs: int = 1, **extra):
    from config.schema import build
    from config.settings import TrialConfig

    problems: list = []
    data = {"name": "synthetic", "n_train": n_train, "n_test": 256, "val_fraction": 0.0}
    cfg = build(TrialConfig, {"arch": arch, "augment": "cropflip", "epochs": epochs, "batch_size": 128, "data": data, "schedule": {"name": "cosine"},
                              **extra}, "", problems)
    assert not problems, problems
    return cfg


def training_flops(arch: str, num_classes: int = 10) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per 32x32 image, counted by torch's FlopCounterMode (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model_zoo import create_model

    model, x = create_model(arch, num_classes), torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as step:
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    return forward.get_total_flops() / len(x), step.get_total_flops() / len(x)


def gpu_peak_tflops(device: torch.device) -> tuple[str, float | None]:
    """The CUDA device's name and its dense bf16 peak (None where unknown)."""
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


# --- 1. training throughput -------------------------------------------------------------------


def stresslab_images_per_s(arch: str, n: int, device: torch.device, amp: bool = True, precision=None) -> float:
    """One epoch of stresslab's own loop (device-resident uint8, batched augmentation), in the precision a trial picks
    (``amp``: bf16 autocast on CUDA and on a CPU with native bf16), or in ``precision`` where given."""
    from data_zoo import Augmenter, load_bundle
    from model_zoo import create_model
    from training.engine import build_optimizer, epoch_generator, pick_precision, train_epoch

    cfg = trial_config(arch, n, amp=amp)
    bundle = load_bundle(dataclasses.asdict(cfg.data), device)
    model = create_model(arch, len(bundle.classes)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    augmenter = Augmenter(cfg.augment, fill=bundle.black())
    precision = precision or pick_precision(device, cfg.amp)
    result = train_epoch(model, bundle, cfg, optimizer, precision, epoch_generator(0, 0, device), augmenter, device)
    return result["time/images_per_s"]


def bare_step_images_per_s(arch: str, n: int, device: torch.device, dtype: torch.dtype | None) -> float:
    """The model's own training step alone (one fixed batch of 128, channels_last, SGD), ``n`` images' worth: the ceiling
    of any loop around it."""
    from model_zoo import create_model

    model = create_model(arch, 10).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device=device)
    start = time.perf_counter()
    for _ in range(max(1, n // 128)):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return max(1, n // 128) * 128 / (time.perf_counter() - start)


def cpu_flags() -> str:
    """The CPU's bf16-related flags as Linux reports them (and what torch concludes)."""
    from tracking.private_apis import cpu_native_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    seen = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) or ["none of avx2/avx512/amx"]
    return f"{', '.join(seen)}; torch: {'native bf16' if cpu_native_bf16() else 'no native bf16 (bf16 emulated: slower than fp32)'}"


EMULATED_PROBE = "plain_cnn"
"""On a CPU without native bf16, the one model 1b times in bf16, on one batch: emulated bf16 ran 0.08-0.09x fp32's
images/s on an AVX2 EPYC (2026-12-07), so every model at the default sizes would take about 40 minutes."""


def bench_precision(device: torch.device, sizes: dict[str, int], rounds: int, threads: int = 1) -> dict[str, dict[str, float]]:
    """fp32 against bf16 autocast on this CPU, per model: stresslab's loop and the bare model step, alternating, median.
    Without native bf16 (where trials train in fp32), bf16 is timed on ``EMULATED_PROBE`` only, on one batch."""
    from tracking.private_apis import cpu_native_bf16
    from training.engine import FP32, Precision

    if device.type != "cpu":
        return {}
    native, bf16 = cpu_native_bf16(), Precision(torch.bfloat16, None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # as a trial with resources.cpu: 1 computes
    print(f"\n1b. fp32 vs bf16 autocast on this CPU ({cpu_flags()}), {threads} thread, batch 128, {rounds} alternating rounds, median")
    if not native:
        print(f"   no native bf16: trials train in fp32; bf16 (emulated) timed on {EMULATED_PROBE} only, on at most one batch (128 images)")
    print(f"   {'model':<14}{'loop fp32':>11}{'loop bf16':>11}{'ratio':>7}{'bare fp32':>11}{'bare bf16':>11}{'ratio':>7}")
    out = {}
    try:
        for arch, n in sizes.items():
            timed, bf16_n = native or arch == EMULATED_PROBE, n if native else min(n, 128)
            stresslab_images_per_s(arch, min(256, bf16_n), device, precision=bf16 if timed else FP32)  # warm-up
            runs: dict[str, list[float]] = {"loop fp32": [], "loop bf16": [], "bare fp32": [], "bare bf16": []}
            for _ in range(rounds):
                runs["loop fp32"].append(stresslab_images_per_s(arch, n, device, precision=FP32))
                if timed:
                    runs["loop bf16"].append(stresslab_images_per_s(arch, bf16_n, device, precision=bf16))
                runs["bare fp32"].append(bare_step_images_per_s(arch, n, device, None))
                if timed:
                    runs["bare bf16"].append(bare_step_images_per_s(arch, bf16_n, device, torch.bfloat16))
            m = out[arch] = {k: float(np.median(v)) for k, v in runs.items() if v}
            loop, bare = (m["loop bf16"] / m["loop fp32"], m["bare bf16"] / m["bare fp32"]) if timed else (None, None)
            row = [(m["loop fp32"], 11, ".1f"), (m.get("loop bf16"), 11, ".1f"), (loop, 7, ".2f"),
                   (m["bare fp32"], 11, ".1f"), (m.get("bare bf16"), 11, ".1f"), (bare, 7, ".2f")]
            print(f"   {arch:<14}" + "".join(f"{v:>{w}{f}}" if v is not None else f"{'-':>{w}}" for v, w, f in row), flush=True)
    finally:
        torch.set_num_threads(before)
    return out


class PILImages(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10.__getitem__`` does: a PIL image per item, then the transforms."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x.transpose(0, 2, 3, 1), y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference_images_per_s(arch: str, n: int, device: torch.device, workers: int, amp: bool = False) -> float:
    """The seeds' pipeline: PIL RandomCrop(32, 4) + flip + ToTensor + Normalize, DataLoader with workers, fp32
    (``amp``: the same under bf16 autocast on CUDA, so a comparison at equal precision isolates the data pipeline)."""
    import contextlib

    import torchvision.transforms as T

    from data_zoo.sources import synthetic
    from model_zoo import create_model

    images = synthetic(n_train=n, n_test=16)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    loader = torch.utils.data.DataLoader(PILImages(images.train_x, images.train_y, transform), batch_size=128, shuffle=True,
                                         num_workers=workers, persistent_workers=False, pin_memory=device.type == "cuda")
    model = create_model(arch, 10).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext():
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bench_training(device: torch.device, sizes: dict[str, int], rounds: int, workers: int) -> dict[str, tuple[float, float]]:
    print(f"\n1. training images/s, batch 128, crop+flip ({rounds} alternating rounds, median)")
    print(f"   {'model':<14}{'stresslab':>12}{'reference':>12}{'ratio':>8}")
    out = {}
    for arch, n in sizes.items():
        warm = min(256, n)  # the default sizes are larger; a toy run warms up on its own size
        amp = device.type != "cpu"  # on a CPU fp32, as the reference: 1b compares the precisions
        stresslab_images_per_s(arch, warm, device, amp), reference_images_per_s(arch, warm, device, workers)  # warm-up
        ours, ref = [], []
        for _ in range(rounds):
            ours.append(stresslab_images_per_s(arch, n, device, amp))
            ref.append(reference_images_per_s(arch, n, device, workers))
        out[arch] = (float(np.median(ours)), float(np.median(ref)))
        print(f"   {arch:<14}{out[arch][0]:>12.1f}{out[arch][1]:>12.1f}{out[arch][0] / out[arch][1]:>8.2f}", flush=True)
    return out


# --- 2. Ray Tune + MLflow overhead --------------------------------------------------------------


def sweep_timeline(uri: str, started: float) -> tuple[float, float]:
    """From the sweep's MLflow runs: seconds until the first trial run started, mean trial run seconds."""
    import tracking

    mlflow_client = tracking.client(uri)
    runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("bench").experiment_id], f"tags.`{tracking.KIND_TAG}` = 'trial'")
    first = min(r.info.start_time for r in runs) / 1000 - started
    return first, float(np.mean([(r.info.end_time - r.info.start_time) / 1000 for r in runs]))


def plain_pool(pool: ProcessPoolExecutor, trial: dict, seeds: list[int]) -> tuple[float, list[float]]:
    """Wall time of ``seeds`` trials in ``pool``, and each trial's own seconds."""
    from bench.plain import plain_trial  # (a module spawned workers can import: they do not import a __main__)

    start = time.perf_counter()
    seconds = list(pool.map(plain_trial, [({**trial, "seed": s}, 1) for s in seeds]))
    return time.perf_counter() - start, seconds


def bench_overhead(trials: int, epochs: int, n_train: int, address: str | None = None) -> float:
    """Plain pool on half the trials, the Ray Tune + MLflow sweep on all, the pool on the other half:
    the machine's drift over the measurement falls on both sides (the halves add up to the same trials).

    The pool is one of fresh (spawned) processes, as the seeds' scripts are, so it pays Python's and torch's start once,
    as the sweep's trial processes do; it idles while the sweep runs."""
    import multiprocessing

    cpus = os.cpu_count() or 1
    trial = dataclasses.asdict(trial_config("plain_cnn", n_train, epochs, model={"widths": [16, 32, 64]}))
    print(f"\n2. Ray Tune + MLflow overhead: {trials} trials of plain_cnn, {epochs} epochs on {n_train} images, {cpus} at a time, 1 CPU each")
    first_half, second_half = list(range(trials // 2)), list(range(trials // 2, trials))
    with ProcessPoolExecutor(cpus, mp_context=multiprocessing.get_context("spawn")) as pool:
        before, seconds = plain_pool(pool, trial, first_half)
        swept, first, per_trial = sweep_seconds(trial, trials, address)
        after, more = plain_pool(pool, trial, second_half)
    plain, seconds = before + after, seconds + more
    print(f"   plain process pool: {plain:.1f} s ({before:.1f} s before the sweep, its processes' start included, + {after:.1f} s after; "
          f"a trial {np.mean(seconds):.1f} s on average, from {min(seconds):.1f} to {max(seconds):.1f} s)")
    print(f"   Ray Tune + MLflow sweep: {swept:.1f} s (first trial started after {first:.1f} s; a trial's MLflow run {per_trial:.1f} s on average)")
    overhead = (swept - plain) / swept
    print(f"   overhead: {overhead:.1%} of the sweep's wall time")
    return overhead


def sweep_seconds(trial: dict, trials: int, address: str | None = None) -> tuple[float, float, float]:
    """The benchmark sweep through ``sweep.main`` (a fresh local Ray, or the running cluster at ``address``): its wall time,
    when its first trial run started, and a trial run's mean seconds."""
    import sweep

    with tempfile.TemporaryDirectory() as tmp:
        experiment = {"defaults": trial, "experiments": {"bench": {"resources": {"cpu": 1}, "max_failures": 0, "grid": {"seed": list(range(trials))},
                                                                "metric": "train/loss", "mode": "min"}}}  # no validation split to select on
        (Path(tmp) / "e.yaml").write_text(yaml.safe_dump(experiment))
        uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
        start, wall_start = time.perf_counter(), time.time()
        code = sweep.main(["--config", f"{tmp}/e.yaml", "--experiment", "bench", "--tracking-uri", uri, "--storage", f"{tmp}/ray",
                           *(["--address", address] if address else [])])
        swept = time.perf_counter() - start
        assert code == 0, "the benchmark sweep failed"
        return (swept, *sweep_timeline(uri, wall_start))


# --- 3. Grad-CAM, 4. MFU -------------------------------------------------------------------------


def bench_gradcam(device: torch.device, n: int) -> None:
    from analysis.gradcam import compute_cams
    from model_zoo import create_model, gradcam_target

    print(f"\n3. Grad-CAM images/s (batch 128, {n} images)")
    for arch in ("plain_cnn", "resnet18"):
        model = create_model(arch, 10).to(device).eval()
        x = torch.randn(n, 3, 32, 32)
        compute_cams(model, gradcam_target(model, arch), x[:8], [0] * 8)
        start = time.perf_counter()
        compute_cams(model, gradcam_target(model, arch), x, [i % 10 for i in range(n)], batch_size=128)
        print(f"   {arch:<14}{n / (time.perf_counter() - start):>10.1f} images/s", flush=True)


def bench_mfu(device: torch.device, training: dict[str, tuple[float, float]]) -> None:
    print("\n4. model-FLOPs utilisation (FLOPs per training image counted by FlopCounterMode)")
    if device.type != "cuda" or not training:
        print("   n/a: no CUDA device (MFU is measured against a GPU's bf16 peak)")
        return
    name, peak = gpu_peak_tflops(device)
    for arch, (images_per_s, _) in training.items():
        achieved = images_per_s * training_flops(arch)[1] / 1e12
        print(f"   {arch:<14}{name}: {achieved:.1f} TFLOP/s achieved" + (f", {achieved / peak:.1%} of the {peak:.0f} TFLOP/s bf16 dense peak" if peak else " (peak unknown)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="python -m bench --gpu-proof --help: the GPU proof (a CUDA machine)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per model (median reported)")
    p.add_argument("--images", type=int, default=0, help="training images per measurement (default: by model and device)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pipeline")
    p.add_argument("--overhead-trials", type=int, default=8, help="trials in the overhead comparison (default: 8)")
    p.add_argument("--overhead-epochs", type=int, default=4, help="epochs per overhead trial (default: 4; 8 gives trials of about a minute on 2 CPU cores)")
    p.add_argument("--overhead-images", type=int, default=5000, help="training images per overhead trial (default: 5000)")
    p.add_argument("--overhead-address", default=None, help="run the overhead sweep on this running Ray cluster (e.g. `auto` for a "
                   "`ray start --head` kept between sweeps) instead of a fresh local Ray")
    p.add_argument("--gradcam-images", type=int, default=0, help="images per Grad-CAM measurement (default: 256 on CPU, 1024 on CUDA)")
    p.add_argument("--corruption-images", type=int, default=1000, help="images per corrupted set in part 5 (default: %(default)s)")
    p.add_argument("--auth-requests", type=int, default=80, help="authenticated requests per server in part 6 (default: %(default)s, about "
                   "what one trial's log_model sends)")
    p.add_argument("--skip", nargs="*", default=[], choices=["training", "precision", "overhead", "gradcam", "corruptions", "mlflow-auth"],
                   help="parts to leave out")
    args = p.parse_args()
    from model_zoo import list_models
    from training.engine import pick_device

    device = pick_device()
    print(f"stresslab benchmark on {torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)'}, torch {torch.__version__}")
    big = device.type == "cuda"
    sizes = {m: args.images or (20_000 if big else (384 if m == "resnet18" else 2048)) for m in list_models()}
    training = bench_training(device, sizes, args.rounds, args.workers) if "training" not in args.skip else {}
    if "precision" not in args.skip:
        bench_precision(device, sizes, args.rounds)
    if "overhead" not in args.skip:
        bench_overhead(args.overhead_trials, args.overhead_epochs, args.overhead_images, args.overhead_address)
    if "gradcam" not in args.skip:
        bench_gradcam(device, args.gradcam_images or (1024 if big else 256))
    bench_mfu(device, training)
    if "corruptions" not in args.skip:
        from bench.corruptions import bench_corruptions

        bench_corruptions(args.corruption_images)
    if "mlflow-auth" not in args.skip:
        from bench.mlflow_auth import bench_mlflow_auth

        bench_mlflow_auth(args.auth_requests)


if __name__ == "__main__":
    import sys

    if "--gpu-proof" in sys.argv[1:]:
        from bench.gpu_proof import main as gpu_proof

        sys.exit(gpu_proof([a for a in sys.argv[1:] if a != "--gpu-proof"]))
    main()
