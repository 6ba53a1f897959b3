"""The experiment schema: typed dataclasses for one trial and one experiment, built from YAML.

``experiments.yaml`` has ``defaults`` (shared settings), ``default_experiment`` and ``experiments``
(each a set of overrides plus a ``grid`` search space). Building a dataclass from a dict checks
every key and type; ``problems()`` checks values. ``schema.py`` turns both into path-named errors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

from tracking import metrics

PATH_SETTINGS = ("data.root", "data.cache_dir", "robustness_data")  # settings that name a folder: made absolute by the driver, shortened in trial names
SCHEDULES = ("constant", "multistep", "cosine", "onecycle")
OPTIMIZERS = ("sgd", "adamw")
TUNE_SCHEDULERS = ("none", "asha")
MODES = ("max", "min")


SEED_MAX = 2**32 - 1  # NumPy's seed range; derived seeds (per epoch, per subset) stay within torch's 64 bits


def seed_problems(key: str, seed: int) -> list[tuple[str, str]]:
    """A seed outside [0, 2**32 - 1] would fail inside the trial (NumPy refuses it), so it is refused with the file."""
    return [] if 0 <= seed <= SEED_MAX else [(key, f"must be in [0, {SEED_MAX}], got {seed}")]


@dataclass
class DataConfig:
    """Which images, where they live, how they are split."""

    name: str = "cifar10"
    root: str = "./data"  # resolved to an absolute path by the driver
    download: bool = True  # torchvision downloads when the files are missing (needs internet)
    cache_dir: Union[str, None] = None  # decoded-uint8 cache; default $STRESSLAB_CACHE or ~/.cache/stresslab
    val_fraction: float = 0.1
    subset: Union[int, None] = None  # class-balanced training subset size for quick runs (validation: val_fraction x subset)
    test_subset: Union[int, None] = None  # class-balanced test subset (indices keep the official order)
    split_seed: int = 0  # fixed across trial seeds so every seed sees the same split
    num_classes: int = 10  # synthetic only
    n_train: int = 2000  # synthetic only
    n_test: int = 500  # synthetic only

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(("val_fraction", f"must be in [0, 1), got {self.val_fraction}"))
        for key in ("subset", "test_subset", "num_classes", "n_train", "n_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                out.append((key, f"must be >= 1, got {value}"))
        return out + seed_problems("split_seed", self.split_seed)


@dataclass
class OptimizerConfig:
    """Optimiser settings (seed 000: SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.name not in OPTIMIZERS:
            out.append(("name", f"unknown optimizer {self.name!r}; known: {', '.join(OPTIMIZERS)}"))
        if self.lr <= 0:
            out.append(("lr", f"must be > 0, got {self.lr}"))
        if not 0 <= self.momentum < 1:
            out.append(("momentum", f"must be in [0, 1), got {self.momentum}"))
        if self.weight_decay < 0:
            out.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        return out


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per batch, with optional linear warm-up (milestones count epochs)."""

    name: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [25, 40])
    gamma: float = 0.1
    warmup_epochs: int = 0

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.name not in SCHEDULES:
            out.append(("name", f"unknown schedule {self.name!r}; known: {', '.join(SCHEDULES)}"))
        if self.warmup_epochs < 0:
            out.append(("warmup_epochs", f"must be >= 0, got {self.warmup_epochs}"))
        if not 0 < self.gamma <= 1:
            out.append(("gamma", f"must be in (0, 1], got {self.gamma}"))
        return out


@dataclass
class EarlyStoppingConfig:
    """Stop a trial when ``metric`` has not improved for ``patience`` epochs (off when null)."""

    patience: Union[int, None] = None
    metric: str = metrics.VAL_ACC
    mode: str = "max"

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.patience is not None and self.patience < 1:
            out.append(("patience", f"must be >= 1 or null, got {self.patience}"))
        if self.mode not in MODES:
            out.append(("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}"))
        if self.metric not in metrics.EPOCH_METRICS:
            out.append(("metric", f"unknown metric {self.metric!r}; known: {', '.join(metrics.EPOCH_METRICS)}"))
        return out


@dataclass
class TrialConfig:
    """Everything one trial needs; logged with every run, so a run can be rerun exactly."""

    arch: str = "plain_cnn"
    model: dict = field(default_factory=dict)  # keyword arguments of the model factory
    augment: Union[str, list] = "none"  # a preset name or a list of ops
    augment_params: dict = field(default_factory=dict)  # {op: {param: value}}
    seed: int = 42
    epochs: int = 50
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = 0.0
    grad_clip: Union[float, None] = None  # max gradient norm
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    amp: bool = True  # bf16 (or fp16 + scaler) autocast on CUDA; ignored on CPU
    channels_last: bool = True  # NHWC memory layout (faster on CUDA, and for small CNNs on CPU)
    compile: bool = False  # torch.compile the model
    deterministic: bool = True  # cudnn deterministic algorithms
    threshold: float = metrics.CONFIDENCE_THRESHOLD  # confidence above which an error counts as high-confidence
    log_model: bool = True  # log the final model as an MLflow logged model (torch.export pt2; --register-best needs it); the weights are logged either way
    robustness: bool = False  # evaluate the corruption stress test at the end of the trial (logged as metrics + artifact)
    robustness_images: int = 1000  # class-balanced test images it uses
    robustness_data: Union[str, None] = None  # folder of the published CIFAR-10-C / -100-C arrays (<corruption>.npy, labels.npy); null: generated
    adversarial: bool = False  # FGSM and PGD accuracy (L-infinity, adversarial.EPSILONS) at the end of the trial (metrics + artifact)
    adversarial_images: int = 100  # class-balanced test images it attacks
    adversarial_steps: int = 10  # PGD steps
    adversarial_step_size: float = 0.25  # PGD step, as a fraction of epsilon
    data: DataConfig = field(default_factory=DataConfig)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for key in ("epochs", "batch_size", "eval_batch_size", "robustness_images", "adversarial_images"):
            if getattr(self, key) < 1:
                out.append((key, f"must be >= 1, got {getattr(self, key)}"))
        out += seed_problems("seed", self.seed)
        if not 0 <= self.label_smoothing < 1:
            out.append(("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"))
        if self.grad_clip is not None and self.grad_clip <= 0:
            out.append(("grad_clip", f"must be > 0 or null, got {self.grad_clip}"))
        if self.adversarial_steps < 0:
            out.append(("adversarial_steps", f"must be >= 0, got {self.adversarial_steps}"))
        if not 0 < self.adversarial_step_size <= 1:
            out.append(("adversarial_step_size", f"must be in (0, 1] (a fraction of epsilon), got {self.adversarial_step_size}"))
        if not 0 < self.threshold < 1:
            out.append(("threshold", f"must be in (0, 1), got {self.threshold}"))
        if self.early_stopping.patience and self.early_stopping.metric.startswith("val/") and self.data.val_fraction == 0:
            out.append(("early_stopping.metric", f"{self.early_stopping.metric} needs a validation split (data.val_fraction > 0)"))
        return out + self.schedule_problems()

    def schedule_problems(self) -> list[tuple[str, str]]:
        """Schedule settings that the number of epochs cannot honour (they would silently do nothing)."""
        s, out = self.schedule, []
        late = [m for m in s.milestones if not 0 < m < self.epochs]
        if s.name == "multistep" and late:
            inside = f"inside epochs 1..{self.epochs - 1}" if self.epochs > 1 else "below epochs (1: no epoch is)"
            fits = sorted({m for m in (self.epochs // 2, self.epochs * 4 // 5) if 0 < m < self.epochs})
            fix = f"--set schedule.milestones=[{','.join(map(str, fits))}] (seed 000: [25, 40] of 50)" if fits else "--set schedule.milestones=[]"
            out.append(("schedule.milestones", f"milestones {late} are not {inside} (epochs: {self.epochs}), so the lr would never drop there; "
                                               f"use {fix}, or another schedule (--set schedule.name=cosine)"))
        if s.warmup_epochs and s.warmup_epochs >= self.epochs:
            out.append(("schedule.warmup_epochs", f"must be < epochs ({self.epochs}), got {s.warmup_epochs}"))
        if s.name == "onecycle" and s.warmup_epochs:
            out.append(("schedule.warmup_epochs", "onecycle has its own warm-up (30% of the steps); set warmup_epochs: 0"))
        return out


@dataclass
class ResourcesConfig:
    """Per-trial Ray resources; a fractional ``gpu`` packs several small trials on one GPU."""

    cpu: float = 1.0
    gpu: float = 0.0

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.cpu <= 0:
            out.append(("cpu", f"must be > 0, got {self.cpu}"))
        if self.gpu < 0 or (self.gpu > 1 and self.gpu != int(self.gpu)):
            out.append(("gpu", f"must be a fraction in [0, 1] or a whole number, got {self.gpu}"))
        return out


@dataclass
class TuneSchedulerConfig:
    """Ray Tune trial scheduler: ``none`` (FIFO) or ``asha`` (early-stops weak trials)."""

    name: str = "none"
    grace_period: int = 1
    reduction_factor: float = 3.0

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.name not in TUNE_SCHEDULERS:
            out.append(("name", f"unknown scheduler {self.name!r}; known: {', '.join(TUNE_SCHEDULERS)}"))
        if self.grace_period < 1:
            out.append(("grace_period", f"must be >= 1, got {self.grace_period}"))
        if self.reduction_factor <= 1:
            out.append(("reduction_factor", f"must be > 1, got {self.reduction_factor}"))
        return out


@dataclass
class ExperimentConfig(TrialConfig):
    """A trial config plus how to search over it and how to schedule the trials."""

    description: str = ""
    grid: dict = field(default_factory=dict)  # dotted setting path -> list | {choice|uniform|loguniform: ...}
    num_samples: int = 1
    scheduler: TuneSchedulerConfig = field(default_factory=TuneSchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    metric: str = metrics.VAL_ACC
    mode: str = "max"
    max_failures: int = 0  # Ray restarts a crashed trial from its last checkpoint this many times
    max_concurrent_trials: Union[int, None] = None
    search_seed: int = 0  # seeds the draws of {choice|uniform|loguniform} grid entries: every launch runs the same points

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.num_samples < 1:
            out.append(("num_samples", f"must be >= 1, got {self.num_samples}"))
        if self.mode not in MODES:
            out.append(("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}"))
        known = metrics.EPOCH_METRICS + metrics.FINAL_METRICS
        if self.metric not in known:
            out.append(("metric", f"unknown metric {self.metric!r}; known: {', '.join(known)}"))
        if self.metric.startswith("val/") and self.data.val_fraction == 0:
            out.append(("metric", f"{self.metric} needs a validation split (data.val_fraction > 0): the trials are compared on it; "
                                  "or select on test/acc (--set metric=test/acc)"))
        if self.scheduler.name == "asha" and self.scheduler.grace_period > self.epochs:
            out.append(("scheduler.grace_period", f"asha's grace_period ({self.scheduler.grace_period}) must be <= epochs ({self.epochs}): "
                                                  f"no trial could be compared before it ends"))
        if self.scheduler.name == "asha" and self.metric not in metrics.EPOCH_METRICS:
            out.append(("metric", f"asha compares trials every epoch, so metric must be an epoch metric ({', '.join(metrics.EPOCH_METRICS)}), got {self.metric!r}"))
        if self.max_failures < -1:
            out.append(("max_failures", f"must be >= -1 (-1: retry forever), got {self.max_failures}"))
        return out

    def trial_dict(self) -> dict[str, Any]:
        """The ``TrialConfig`` part as a plain dict (what a trial receives and logs)."""
        names = {f.name for f in dataclasses.fields(TrialConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in names}


def nested_configs(cls: type) -> dict[str, type]:
    """Field name -> dataclass type for the fields of ``cls`` that are themselves dataclasses."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)}
