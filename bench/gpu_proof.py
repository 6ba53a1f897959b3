"""``python -m bench --gpu-proof``: the one command that proves stresslab's GPU path on a CUDA machine.

Parts (all by default; name some to split the work across calls of a time-limited machine):
  tests       pytest tests/test_gpu.py (bf16 and forced fp16 + GradScaler, bitwise determinism, fractional GPUs)
  profile     torch.profiler over 30 ResNet-18 training steps: the top kernels and the host-side gaps
  throughput  training images/s per model: stresslab vs the seed-style pipeline (PIL + DataLoader), each in
              fp32 and in bf16, so the data pipeline's share is visible; MFU from FlopCounterMode FLOPs
  packing     ResNet-18 images/s of one trial alone and of 4 trials packed on the one GPU (aggregate)
  accuracy    the full-budget run: ResNet-18 + Cutout on the real CIFAR-10, seed 000's settings, 50 epochs
              (experiment resnet18-cutout), its test accuracy without test-time augmentation
  sweep       the 36-trial cifar10-stress study on the real CIFAR-10: wall time and GPU busy share (nvidia-smi,
              sampled each second); past --sweep-budget seconds it is interrupted and the full wall time is
              extrapolated from the trial-epochs done, and the table says so

The real CIFAR-10 comes from --data-archive (the shared cifar10-jpeg.tar.gz copied into the git-ignored gpu-proof/
folder, which the device tool carries), unpacked next to it once. Every part appends rows to one table, printed and
written to --out (Markdown).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.__main__ import gpu_peak_tflops, reference_images_per_s, stresslab_images_per_s, training_flops

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "profile", "throughput", "packing", "accuracy", "sweep")
Row = tuple[str, str, str]  # (part, what, figure)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --gpu-proof", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", metavar="PART", help=f"parts to run: {', '.join(PARTS)} (default: all)")
    p.add_argument("--data-archive", default="gpu-proof/cifar10-jpeg.tar.gz", help="the shared cifar10-jpeg.tar.gz (default: %(default)s)")
    p.add_argument("--out", default="gpu-proof/gpu_proof.md", help="the table's file, appended to (default: %(default)s)")
    p.add_argument("--images", type=int, default=20_000, help="training images per throughput measurement (default: %(default)s)")
    p.add_argument("--sweep-budget", type=int, default=540, help="seconds the 36-trial sweep may run in this call (default: %(default)s)")
    args = p.parse_args(argv)
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        p.error(f"unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the GPU proof needs a CUDA GPU and this machine has none; run it where one is (see README, GPU proof)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name, _ = gpu_peak_tflops(device)
    header = f"GPU proof on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d %H:%M')}"
    print(header, flush=True)
    rows: list[Row] = []
    for part in args.parts or PARTS:
        rows += RUNNERS[part](args, device)
    table = "\n".join([f"### {header}", "", "| part | what | figure |", "|---|---|---|", *(f"| {p} | {w} | {f} |" for p, w, f in rows)])
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(table + "\n\n")
    return 0


def run_tests(args, device) -> list[Row]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True)
    print(out.stdout[-3000:], flush=True)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    return [("tests", "pytest tests/test_gpu.py", summary)]


def run_profile(args, device) -> list[Row]:
    """The same loop as a trial (stresslab's train_epoch), 30 steps under torch.profiler after 10 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    stresslab_images_per_s("resnet18", 1280, device)  # warm-up (cudnn autotuning, allocator)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stresslab_images_per_s("resnet18", 30 * 128, device)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(Path(args.out).with_name("resnet18_profile.json")))
    events = prof.key_averages()
    copies = sum(e.count for e in events if "Memcpy HtoD" in e.key or "Memcpy DtoH" in e.key)
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    return [("profile", "ResNet-18, 30 steps: host-device copies / synchronisations", f"{copies} / {syncs}")]


def run_throughput(args, device) -> list[Row]:
    name, peak = gpu_peak_tflops(device)
    rows: list[Row] = []
    for arch in ("plain_cnn", "residual_cnn", "se_cnn", "resnet18"):
        figures = {}
        for amp in (False, True):
            stresslab_images_per_s(arch, 2048, device, amp), reference_images_per_s(arch, 2048, device, 8, amp)  # warm-up
            figures[("stresslab", amp)] = float(np.median([stresslab_images_per_s(arch, args.images, device, amp) for _ in range(2)]))
            figures[("reference", amp)] = float(np.median([reference_images_per_s(arch, args.images, device, 8, amp) for _ in range(2)]))
        for amp, precision in ((False, "fp32"), (True, "bf16")):
            ours, ref = figures[("stresslab", amp)], figures[("reference", amp)]
            rows.append(("throughput", f"{arch} {precision}: stresslab / seed-style images/s", f"{ours:,.0f} / {ref:,.0f} ({ours / ref:.2f}x)"))
        flops = training_flops(arch)[1]
        achieved = figures[("stresslab", True)] * flops / 1e12
        rows.append(("throughput", f"{arch} bf16 MFU (counted {flops / 1e9:.2f} GFLOPs per training image)",
                     f"{achieved:.1f} TFLOP/s" + (f" = {achieved / peak:.1%} of {peak:.0f}" if peak else "")))
        print(rows[-3:], flush=True)
    return rows


def _packed_trial(args: tuple) -> float:
    barrier, n = args
    stresslab_images_per_s("resnet18", 2048, torch.device("cuda"))  # warm-up, then all four measure together
    barrier.wait()
    return stresslab_images_per_s("resnet18", n, torch.device("cuda"))


def run_packing(args, device) -> list[Row]:
    alone = stresslab_images_per_s("resnet18", args.images, device)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        barrier = manager.Barrier(4)
        each = pool.map(_packed_trial, [(barrier, args.images)] * 4)
    return [("packing", "ResNet-18 bf16, one trial alone", f"{alone:,.0f} images/s"),
            ("packing", "ResNet-18 bf16, 4 trials packed on one GPU (sum)", f"{sum(each):,.0f} images/s ({', '.join(f'{v:,.0f}' for v in each)})")]


def cifar10_root(args) -> Path:
    """The unpacked real CIFAR-10 (ImageFolder layout) next to the archive."""
    archive = Path(args.data_archive)
    root = archive.parent / "cifar10-jpeg"
    if not root.exists():
        if not archive.exists():
            raise SystemExit(f"error: {archive} not found; copy ../shared/datasets/cifar10-jpeg.tar.gz there (and carry its folder)")
        with tarfile.open(archive) as tar:
            tar.extractall(archive.parent, filter="data")
    return root.resolve()


def sweep_command(args, experiment: str, *extra: str) -> list[str]:
    store = Path(args.out).parent.resolve()
    return [sys.executable, "sweep.py", "--experiment", experiment, "--set", "data.name=imagefolder", "--set", f"data.root={cifar10_root(args)}",
            "--tracking-uri", f"sqlite:///{store / 'mlruns' / 'mlflow.db'}", "--storage", str(store / "ray"), *extra]


def run_accuracy(args, device) -> list[Row]:
    start = time.perf_counter()
    out = subprocess.run(sweep_command(args, "resnet18-cutout"), cwd=ROOT, capture_output=True, text=True)
    print(out.stdout[-2000:], out.stderr[-2000:], flush=True)
    found = re.search(r"^resnet18\S*\s+(\d\.\d+)\s+(\d\.\d+)\s+(\d+)", out.stdout, re.M)
    figure = f"test acc {found[2]} (val {found[1]}), {found[3]} epochs" if found else f"failed (exit {out.returncode})"
    return [("accuracy", "ResNet-18 + Cutout, CIFAR-10 (JPEG), 50 epochs, no TTA", f"{figure}, {time.perf_counter() - start:.0f} s")]


def run_sweep(args, device) -> list[Row]:
    busy: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            q = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"], capture_output=True, text=True)
            if q.returncode == 0 and q.stdout.strip():
                busy.append(float(q.stdout.split()[0]))

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    driver = subprocess.Popen(sweep_command(args, "cifar10-stress"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = driver.communicate(timeout=args.sweep_budget)
    except subprocess.TimeoutExpired:
        driver.send_signal(signal.SIGINT)  # Tune saves its state: `--resume` continues it
        output, _ = driver.communicate()
    wall = time.perf_counter() - start
    stop.set()
    print(output[-3000:], flush=True)
    done = len(re.findall(r"^\S+\s+\d\.\d+\s+\d\.\d+\s+50\s+done", output, re.M))
    share = f"GPU busy {np.mean([b > 0 for b in busy]):.0%} of the samples, mean utilisation {np.mean(busy):.0f}%" if busy else "no nvidia-smi samples"
    if done == 36:
        return [("sweep", "cifar10-stress, 36 trials x 50 epochs", f"{wall / 60:.1f} min; {share}")]
    epochs = trial_epochs(Path(args.out).parent.resolve())
    projected = wall * 36 * 50 / max(epochs, 1)
    return [("sweep", f"cifar10-stress, {epochs} of 1800 trial-epochs in {wall / 60:.1f} min (interrupted)",
             f"extrapolated {projected / 60:.0f} min for all 36 trials (linear in trial-epochs); {share}")]


def trial_epochs(store: Path) -> int:
    """Trial-epochs logged so far by the cifar10-stress sweep (train/loss steps of its trial runs)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10-stress")
    runs = client.search_runs([experiment.experiment_id], "tags.`stresslab.kind` = 'trial'") if experiment else []
    return sum(len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs)


RUNNERS = {"tests": run_tests, "profile": run_profile, "throughput": run_throughput, "packing": run_packing, "accuracy": run_accuracy,
           "sweep": run_sweep}

if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(sys.argv[1:]))
