"""How one trial trains: the single Ray Tune function trainable behind every experiment.

``train(config)`` is what Ray calls; ``fit(cfg, ...)`` is the story, in stages: device and seeds,
data on the device, model and optimiser, resume, the epochs (train, validate, log, checkpoint),
then the test set once (metrics, predictions, weights, figures). The metric names come from
``metrics.py`` and are the same in ``tune.report``, MLflow and ``analysis/``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from config.grid import apply_overrides
from config.schema import build
from config.settings import EarlyStoppingConfig, TrialConfig
from data_zoo import Augmenter, load_bundle
from model_zoo import create_model
from tracking import TrialRun, log_pytorch_model, metrics, run_name
from tracking.private_apis import finish_system_metrics
from training.engine import (
    FP32,
    build_optimizer,
    build_scheduler,
    classification_report,
    cpu_identity,
    determinism,
    epoch_generator,
    exact_fp32,
    evaluate,
    pick_device,
    pick_precision,
    predict,
    seed_everything,
    train_epoch,
)

STATE_FILE = "state.pt"
Report = Callable[[dict, dict], None]  # (metrics, checkpoint state) -> None


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: the trial stops at once instead of burning epochs."""


class EarlyStopper:
    """Counts epochs without improvement of one metric."""

    def __init__(self, cfg: EarlyStoppingConfig, state: dict | None = None):
        self.cfg = cfg
        self.best, self.bad_epochs, self.improved = (state["best"], state["bad_epochs"], False) if state else (None, 0, False)

    @property
    def active(self) -> bool:
        return self.cfg.patience is not None

    def update(self, values: dict[str, float]) -> bool:
        """Record this epoch (``improved`` says whether it is the best so far); True when patience is exhausted."""
        if not self.active or self.cfg.metric not in values:
            return False
        value = values[self.cfg.metric]
        self.improved = self.best is None or (value > self.best if self.cfg.mode == "max" else value < self.best)
        self.best, self.bad_epochs = (value, 0) if self.improved else (self.best, self.bad_epochs + 1)
        return self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}


def trial_config(config: dict) -> TrialConfig:
    """The trial's ``TrialConfig`` from Ray's config (base settings + this grid point's overrides)."""
    problems: list[tuple[str, str]] = []
    cfg = build(TrialConfig, apply_overrides(config["trial"], config.get("overrides", {})), "", problems)
    if problems:
        raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
    return cfg


def train(config: dict) -> None:
    """Ray Tune function trainable: builds everything inside, reports once per epoch, resumes from its checkpoint."""
    from ray import tune

    cfg = trial_config(config)
    checkpoint = tune.get_checkpoint()
    state = load_state(checkpoint.to_directory()) if checkpoint else None
    name = run_name(config["trial"] | {"arch": cfg.arch, "augment": cfg.augment, "seed": cfg.seed}, config.get("overrides", {}))
    sweep = config.get("sweep") or {}
    run = TrialRun.open(sweep, dataclasses.asdict(cfg), name, tune.get_context().get_trial_id(), state and state.get("mlflow_run_id"))

    run.set_tags(placement())
    progress = {"epochs": state["epoch"] if state else 0, "tested": False}

    def report(values: dict, checkpoint_state: dict) -> None:
        progress.update(epochs=values[metrics.EPOCH], tested=metrics.TEST_ACC in values)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(checkpoint_state, os.path.join(folder, STATE_FILE))
            tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder))

    if run.tag("diverged"):  # a restart would only diverge again at the same epoch
        error = DivergedError(f"not retried, it diverged before: {run.tag('diverged')}")
        run.finish("FAILED", error)
        raise error
    monitor = run.system_metrics()
    try:
        fit(cfg, run, report, state, threads=sweep.get("threads"))
    except DivergedError as err:
        run.set_tags({"diverged": str(err)})
        run.finish("FAILED", err)
        raise
    except Exception as err:
        run.finish("FAILED", err)
        raise
    except SystemExit:  # Tune stopped the trial inside tune.report: a scheduler (ASHA at a rung or at max_t) or the driver
        if progress["tested"]:  # it had trained every epoch and logged the test set: it finished
            run.finish("FINISHED")
        else:  # pruned or interrupted: the driver's callback adds stopped_by when a scheduler decided it
            run.set_tags({"epochs_completed": progress["epochs"]})
            run.finish("KILLED")
        raise
    except BaseException as err:  # interrupted (Ctrl-C): the run must not stay RUNNING
        run.finish("KILLED", err)
        raise
    finally:
        if monitor is not None:
            finish_system_metrics(monitor)
    run.finish("FINISHED")


def placement() -> dict[str, str]:
    """Where Ray placed this trial: its node, that node's host name and the GPU ids it was given (empty on CPU)."""
    import socket

    import ray

    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.host": socket.gethostname(),
            "ray.gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())}


def load_state(folder: str) -> dict:
    """A trial checkpoint (weights-only unpickling: tensors, numbers, strings)."""
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated, not a checkpoint, or not weights-only: all unusable
        raise RuntimeError(f"cannot read checkpoint {path} ({err}); delete the trial's checkpoint folder to restart it from scratch") from err


def fit(cfg: TrialConfig, run: TrialRun, report: Report, state: dict | None = None, threads: int | None = None) -> dict[str, float]:
    """Train one trial to the end (or early stop), evaluate the test set once, log everything."""
    # 1. Device, precision and seeds. Threads follow the CPUs Ray gave the trial, so a rerun computes identically.
    started, device = time.perf_counter(), pick_device()
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed, cfg.deterministic)
    precision = pick_precision(device, cfg.amp)
    reproducible = determinism(device, cfg, precision)
    if cfg.deterministic and cfg.compile:
        print(f"warning: {reproducible}")
    run.set_tags({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cpu": cpu_identity(),
                  "torch.num_threads": torch.get_num_threads(), "precision": precision.name, "determinism": reproducible})

    # 2. Data on the training device as uint8; batches are normalised and augmented there.
    bundle = load_bundle(dataclasses.asdict(cfg.data), device)
    run.log_dataset(dataclasses.asdict(cfg.data), bundle)
    augmenter = Augmenter(cfg.augment, cfg.augment_params, fill=bundle.black())

    # 3. Model, optimiser, schedule, precision.
    model = create_model(cfg.arch, len(bundle.classes), **cfg.model).to(device)
    if cfg.channels_last:  # faster on CUDA and, for the small CNNs, on CPU too
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(bundle.train))
    stopper, start_epoch = EarlyStopper(cfg.early_stopping, state and state["stopper"]), 0
    best: dict = {}  # with early stopping: the weights and epoch of the best validation epoch so far

    # 4. Resume: weights, optimiser, schedule, scaler and RNG exactly where the checkpoint left them.
    if state:
        start_epoch, best = restore(state, model, optimizer, scheduler, precision)
    step_model = torch.compile(model) if cfg.compile else model

    # 5. Epochs: train (the lr schedule steps per batch), validate (fp32), log to MLflow, report to Tune with a checkpoint.
    values: dict[str, float] = {metrics.TIME_SETUP: time.perf_counter() - started}
    for epoch in range(start_epoch, cfg.epochs):
        lr = optimizer.param_groups[0]["lr"]
        values |= train_epoch(step_model, bundle, cfg, optimizer, precision, epoch_generator(cfg.seed, epoch, device), augmenter, device, scheduler)
        if not math.isfinite(values[metrics.TRAIN_LOSS]):
            raise DivergedError(f"training loss is {values[metrics.TRAIN_LOSS]} at epoch {epoch + 1} (lr {lr:g}); lower optimizer.lr or set grad_clip")
        trained = time.perf_counter()
        if bundle.val is not None:
            values.update(evaluate(step_model, bundle, bundle.val, cfg, FP32, device, "val"))
        values.update({metrics.LR: lr, metrics.EPOCH: epoch + 1})
        last = stopper.update(values) or epoch + 1 == cfg.epochs
        if stopper.improved:
            best = {"best_model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "best_epoch": epoch + 1}
        run.log_epoch(values, epoch + 1)
        if last:  # 6. The test set, once, at the end: with early stopping, with the weights of the best validation epoch.
            if best:
                model.load_state_dict(best["best_model"])
            values.update(finish(model, bundle, cfg, device, run, epoch + 1, best.get("best_epoch", epoch + 1)))
        report(values, checkpoint_state(model, optimizer, scheduler, precision, epoch + 1, stopper, run, best))
        if last:
            break
        values = {metrics.TIME_EPOCH_REST: time.perf_counter() - trained}  # reported with the next epoch, beside its training
    return values


def checkpoint_state(model, optimizer, scheduler, precision, epoch: int, stopper: EarlyStopper, run: TrialRun, best: dict) -> dict:
    """Everything a restart resumes from: weights, optimiser, schedule, scaler, RNG, epoch, early stopping, the run."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler else {}, "rng": torch.get_rng_state(),
            "epoch": epoch, "stopper": stopper.state_dict(), "mlflow_run_id": run.run_id or "", **best}


def restore(state: dict, model, optimizer, scheduler, precision) -> tuple[int, dict]:
    """Load a checkpoint's weights, optimiser, schedule, scaler and RNG; return (epochs done, best epoch so far)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if precision.scaler is not None and state.get("scaler"):
        precision.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return state["epoch"], {k: state[k] for k in ("best_model", "best_epoch") if k in state}


def finish(model, bundle, cfg: TrialConfig, device, run: TrialRun, step: int, test_epoch: int) -> dict[str, float]:
    """Test metrics, and the artifacts analysis needs: weights, predictions, config, figures.

    Evaluated in fp32 (no autocast) on every device, so the logged logits, the pt2 model and Grad-CAM agree."""
    from tracking.plots import plot_confusion, plot_curves

    start = time.perf_counter()
    logits, index = predict(model, bundle, bundle.test, cfg.eval_batch_size, FP32, device)
    probs = torch.softmax(logits, 1).cpu().numpy()
    labels = bundle.test.y.cpu().numpy()
    report = classification_report(probs, labels, bundle.classes, cfg.threshold)
    results = {metrics.TEST_LOSS: float(torch.nn.functional.cross_entropy(logits, bundle.test.y).item()), **report["metrics"],
               metrics.TEST_EPOCH: test_epoch}
    results[metrics.TIME_TEST] = (tested := time.perf_counter()) - start
    with exact_fp32():  # the stress tests in IEEE fp32 like the test set: the analysis spot-checks them on a CPU
        robust = robustness(model, bundle, cfg, device) if cfg.robustness else None
        results[metrics.TIME_ROBUSTNESS] = (corrupted := time.perf_counter()) - tested
        attacked = adversarial_test(model, bundle, cfg, device) if cfg.adversarial else None
    results[metrics.TIME_ADVERSARIAL] = (started_artifacts := time.perf_counter()) - corrupted
    for extra in (robust, attacked):
        results.update(extra["metrics"] if extra else {})
    if run.client is None:
        return results
    run.log_metrics(results, step)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        if not (cfg.log_model and store_model(run, model, bundle)):  # the weights' one copy: the logged model, else weights.pt
            torch.save(model.state_dict(), out / metrics.WEIGHTS_FILE)
        val = {}
        if bundle.val is not None:  # for calibration: temperature scaling is fitted on the validation split
            val_logits, val_index = predict(model, bundle, bundle.val, cfg.eval_batch_size, FP32, device)
            val = {"val_logits": val_logits.cpu().numpy(), "val_labels": bundle.val.y.cpu().numpy(), "val_index": val_index.cpu().numpy()}
        np.savez_compressed(out / metrics.PREDICTIONS_FILE, probs=probs.astype(np.float32), logits=logits.cpu().numpy(), labels=labels,
                            preds=probs.argmax(1), index=index.cpu().numpy(), classes=np.array(bundle.classes), **val)
        (out / metrics.CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        if robust:  # per severity too: the analysis reuses it instead of running the same inference again on the CPU
            (out / metrics.ROBUSTNESS_FILE).write_text(json.dumps(robust, indent=1))
        if attacked:
            (out / metrics.ADVERSARIAL_FILE).write_text(json.dumps(attacked, indent=1))
        np.savetxt(out / "confusion_matrix.csv", report["confusion"], fmt="%d", delimiter=",", header=",".join(bundle.classes))
        history = {k: [(m.step, m.value) for m in run.client.get_metric_history(run.run_id, k)] for k in metrics.EPOCH_METRICS}
        plot_curves({"run": history}, out / "training_curves.png")
        plot_confusion(report["confusion"], bundle.classes, out / "confusion_matrix.png")
        run.log_artifacts(out)
    results[metrics.TIME_ARTIFACTS] = time.perf_counter() - started_artifacts
    run.log_metrics({metrics.TIME_ARTIFACTS: results[metrics.TIME_ARTIFACTS]}, step)
    return results


def store_model(run: TrialRun, model, bundle) -> bool:
    """Log the final model as the run's MLflow logged model (torch.export pt2: 0.5-0.9 s a small-CNN trial on a CPU), the
    one copy of its weights; False (with a warning, so that weights.pt is stored instead) where it cannot be exported."""
    example = bundle.normalise(bundle.test.x[:2]).cpu().numpy()
    try:
        log_pytorch_model(run, copy.deepcopy(model).to(memory_format=torch.contiguous_format), example)
        return True
    except Exception as err:  # an architecture torch.export cannot trace must not lose the trial's weights
        print(f"warning: the model could not be logged as an MLflow model ({type(err).__name__}: {err}); its weights go to {metrics.WEIGHTS_FILE}",
              file=sys.stderr)
        return False


def robustness(model, bundle, cfg: TrialConfig, device) -> dict:
    """The corruption stress test on a class-balanced test subset: ``requested`` and ``images`` (the subset's size),
    ``accuracy`` (per corruption, severities 1-5), ``summary`` (the 15-corruption mean, its per-severity profile, the
    extras apart), ``source`` (published arrays or generated), ``cache`` (generated sets read or stored) and
    ``metrics`` (as logged)."""
    from data_zoo.cache import default_cache_dir
    from stress import corruptions
    from stress.corruptions.published import published_sets
    from stress.corruptions.stored import SetCache

    labels = bundle.test.y.cpu().numpy()
    pos = corruptions.first_per_class(labels, len(bundle.classes), cfg.robustness_images)
    classify = corruptions.classifier(model, bundle.mean, bundle.std, cfg.eval_batch_size, device)
    x = bundle.test.x.cpu().numpy()[pos]
    published = published_sets(cfg.robustness_data, bundle.test.index.cpu().numpy()[pos], labels[pos], x.shape[2:]) if cfg.robustness_data else None
    cache = SetCache(cfg.data.cache_dir or default_cache_dir(), x, seed=0)  # generated by the first trial on this subset, read by the rest
    accuracy = corruptions.corruption_accuracy(classify, None, labels[pos], sets=corruptions.corrupted_sets(x, published=published, cache=cache))
    print(cache.summary())
    summary = corruptions.summarise(accuracy)
    values = {metrics.CORRUPTION_ACC.format(name): float(np.mean(acc)) for name, acc in accuracy.items()}
    values[metrics.MEAN_CORRUPTION_ACC], values[metrics.EXTRAS_CORRUPTION_ACC] = summary["mean"], summary["extras_mean"]
    values.update({metrics.SEVERITY_CORRUPTION_ACC.format(s): v for s, v in zip(corruptions.SEVERITIES, summary["per_severity"])})
    return {"requested": cfg.robustness_images, "images": int(len(pos)), "accuracy": accuracy, "summary": summary,
            "source": corruptions.source(published, cfg.robustness_data), "cache": cache.record(), "metrics": values}


def adversarial_test(model, bundle, cfg: TrialConfig, device) -> dict:
    """FGSM and PGD accuracy per epsilon on a class-balanced test subset, on the trial's own device (the analysis reads
    ``adversarial.json`` instead of attacking again on its CPU)."""
    from stress import adversarial

    labels = bundle.test.y.cpu().numpy()
    return adversarial.stress_test(model.eval(), bundle.test.x.cpu().numpy(), labels, bundle.test.index.cpu().numpy(), len(bundle.classes), cfg.adversarial_images,
                                   bundle.mean.cpu().numpy(), bundle.std.cpu().numpy(), cfg.adversarial_steps, cfg.adversarial_step_size,
                                   batch_size=cfg.eval_batch_size, device=device)
