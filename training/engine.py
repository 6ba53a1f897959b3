"""The pieces of a training loop: device, seeding, optimiser and schedule, one epoch, evaluation.

``trainable.py`` tells the story of one trial with these; the benchmark times the same functions.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from config.settings import ScheduleConfig, TrialConfig
from data_zoo import Augmenter, DataBundle, Split, iterate_batches
from tracking import metrics
from tracking.private_apis import cpu_bf16_unit, cpu_native_bf16


def pick_device() -> torch.device:
    """CUDA when available, else CPU (never hard-coded)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_identity() -> str:
    """This CPU as far as a run's digits depend on it: its model (name, family, model number, from ``/proc/cpuinfo``) and
    the kernels torch and oneDNN choose on it (torch's vector ISA, the native bf16 unit). CPUs that differ here can
    round differently, in fp32 too: the quick study's fp32 residual_cnn-none tests 0.6383 on AMD Zen 4 and Zen 5 and
    0.6461 on an Intel Xeon with AMX, from the same code, data and torch."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block ends
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    model = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields and "model" in fields else ""
    return f"{name}{model}, torch {torch.backends.cpu.get_cpu_capability()}, bf16 {cpu_bf16_unit() or 'emulated'}"


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy, torch and CUDA. ``deterministic``: cudnn's deterministic algorithms, no
    benchmark autotuning, cuBLAS' deterministic workspace and torch's deterministic algorithms, which
    warn (naming the op) where an op has no deterministic implementation instead of failing the trial."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: set before any CUDA work
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def determinism(device: torch.device, cfg: TrialConfig, precision: Precision) -> str:
    """What a rerun with the same seed can be expected to reproduce, stated for the run's tags and log."""
    if not cfg.deterministic:
        return "not deterministic (deterministic: false): cudnn autotunes its algorithms by timing"
    where = (f"on the same {'GPU model' if device.type == 'cuda' else 'CPU (the cpu tag) and thread count'} in {precision.name}"
             + (" (a CPU with native bf16: one without trains in fp32, so it cannot repeat this run exactly)"
                if device.type == "cpu" and precision.dtype is not None else ""))
    if cfg.compile:
        return (f"deterministic in eager code {where}; compile: true runs Inductor-generated kernels, "
                f"which torch does not guarantee to be bitwise reproducible")
    return f"bitwise deterministic {where} (ops without a deterministic implementation warn in the trial log)"


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one epoch's order and augmentation, on the training device (no host-device copy per batch):
    resuming at an epoch replays it exactly. CPU and CUDA draw different streams from the same seed."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


def build_optimizer(model: nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW from ``cfg.optimizer``."""
    o = cfg.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)


def onecycle_factor(step: int, total: int, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> float:
    """OneCycle (Smith & Topin 2019) as ``torch.optim.lr_scheduler.OneCycleLR`` defines it, as a multiple of the
    peak lr: cosine warm-up from peak/25 over the first 30% of the steps, cosine annealing to peak/25/1e4 at the last."""
    start, low = 1 / div_factor, 1 / div_factor / final_div_factor
    peak_step = pct_start * total - 1
    if step <= peak_step:
        begin, end, pct = start, 1.0, step / peak_step if peak_step > 0 else 1.0
    else:
        begin, end, pct = 1.0, low, (step - peak_step) / (total - 1 - peak_step)
    return end + (begin - end) / 2 * (math.cos(math.pi * min(pct, 1.0)) + 1)


def lr_factor(s: ScheduleConfig, epochs: int, steps_per_epoch: int, step: int) -> float:
    """Multiplier of the base lr at optimiser ``step`` (0-based, stepped per batch): linear per-step warm-up, then
    the named schedule (multistep by epoch, cosine and onecycle by step)."""
    warmup, total = s.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    factors = {
        "constant": lambda: 1.0,
        "multistep": lambda: s.gamma ** sum(step // steps_per_epoch >= m for m in s.milestones),
        "cosine": lambda: 0.5 * (1 + math.cos(math.pi * progress)),
        "onecycle": lambda: onecycle_factor(step, total),
    }
    return factors[s.name]()


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps in one epoch (the last batch may be short)."""
    return max(1, math.ceil(n_train / batch_size))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, n_train: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (``train_epoch`` steps it after every batch); its state_dict (last_epoch = steps) resumes it."""
    per_epoch = steps_per_epoch(n_train, cfg.batch_size)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg.schedule, cfg.epochs, per_epoch, step))


@dataclass
class Precision:
    """Autocast dtype (None: fp32) and the grad scaler fp16 needs."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @property
    def name(self) -> str:
        """What the training steps compute in: the run's ``precision`` tag."""
        if self.dtype is None:
            return "fp32"
        return f"{str(self.dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float16', 'fp16')} autocast" + \
            (" + GradScaler" if self.scaler is not None else "")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


FP32 = Precision(None, None)  # evaluation, everywhere: the logged logits, the pt2 model and Grad-CAM agree


@contextlib.contextmanager
def exact_fp32():
    """IEEE fp32 for evaluation on a GPU too: cuDNN runs fp32 convolutions as TF32 on Ampere and later GPUs unless told
    not to (``torch.backends.cudnn.allow_tf32`` is True by default), which would put the logged logits further from
    the fp32 that the pt2 model and the analysis compute on a CPU than rounding does. No effect on a CPU."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def pick_precision(device: torch.device, amp: bool) -> Precision:
    """With ``amp``, for the training steps: bf16 autocast on CUDA where supported (fp16 + GradScaler where not), bf16
    autocast on a CPU that computes bf16 natively (AVX512-BF16, AMX: 1.7-2.5x fp32's images/s, measured in the
    bench), fp32 on any other CPU (emulated bf16 is slower than fp32). Evaluation is always fp32 (``FP32``)."""
    if not amp:
        return FP32
    if device.type == "cuda":
        return Precision(torch.bfloat16, None) if torch.cuda.is_bf16_supported() else Precision(torch.float16, torch.amp.GradScaler("cuda"))
    return Precision(torch.bfloat16, None) if device.type == "cpu" and cpu_native_bf16() else FP32


def train_epoch(model, bundle: DataBundle, cfg: TrialConfig, optimizer, precision: Precision, gen, augmenter: Augmenter, device,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict[str, float]:
    """One pass over the training split (the schedule stepped after every batch); returns loss, accuracy and throughput."""
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    for x, y, _ in iterate_batches(bundle, bundle.train, cfg.batch_size, gen, augmenter, cfg.channels_last):
        with precision.autocast(device):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if precision.scaler is not None:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(y)  # stays on the device: read once per epoch, no sync per step
        correct += (logits.argmax(1) == y).sum()
    n = len(bundle.train)
    loss, acc = loss_sum.item() / n, correct.item() / n  # the epoch's one host-device sync, before the clock stops
    seconds = time.perf_counter() - start
    return {
        metrics.TRAIN_LOSS: loss,
        metrics.TRAIN_ACC: acc,
        metrics.EPOCH_SECONDS: seconds,
        metrics.IMAGES_PER_SECOND: n / seconds,
    }


@torch.inference_mode()
def predict(model, bundle: DataBundle, split: Split, batch_size: int, precision: Precision, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 (N, C), source indices) for a split, never augmented, in split order; with ``FP32``, IEEE fp32
    on a GPU too (``exact_fp32``)."""
    model.eval()
    logits, indices = [], []
    with exact_fp32() if precision.dtype is None else contextlib.nullcontext():
        for x, _, idx in iterate_batches(bundle, split, batch_size):
            with precision.autocast(device):
                logits.append(model(x).float())
            indices.append(idx)
    return torch.cat(logits), torch.cat(indices)


def evaluate(model, bundle: DataBundle, split: Split, cfg: TrialConfig, precision: Precision, device, prefix: str) -> dict[str, float]:
    """Loss and accuracy of a split under ``prefix`` (``val`` or ``test``)."""
    logits, _ = predict(model, bundle, split, cfg.eval_batch_size, precision, device)
    loss = nn.functional.cross_entropy(logits, split.y).item()
    return {f"{prefix}/loss": loss, f"{prefix}/acc": (logits.argmax(1) == split.y).float().mean().item()}


def classification_report(probs: np.ndarray, labels: np.ndarray, classes: list[str], threshold: float) -> dict:
    """Accuracy, macro precision/recall/F1, per-class accuracy, confusion matrix, confident errors."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = len(classes)
    preds = probs.argmax(1)
    confusion = confusion_matrix(labels, preds, labels=range(k))
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=range(k), average=None, zero_division=0)
    confident_errors = int(metrics.confident_errors(probs, labels, threshold).sum())
    summary = {
        metrics.TEST_ACC: float((preds == labels).mean()),
        metrics.TEST_PRECISION: float(precision.mean()),
        metrics.TEST_RECALL: float(recall.mean()),
        metrics.TEST_F1: float(f1.mean()),
        metrics.TEST_CONFIDENT_ERRORS: confident_errors,
    }
    summary.update({metrics.TEST_CLASS_ACC.format(c): float(recall[i]) for i, c in enumerate(classes)})
    return {"metrics": summary, "confusion": confusion}
