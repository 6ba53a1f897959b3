"""The data every trial of a launch will load, checked (and with ``download: true`` downloaded) once by the driver
before Ray starts: what would fail every trial fails here, once, naming the data set, its path and the fix."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

from config.errors import InputError
from config.schema import trial_configs
from config.settings import ExperimentConfig


def data_configs(cfg: ExperimentConfig) -> list[tuple[dict, set[str]]]:
    """The distinct ``data`` sections the trials of ``cfg`` will load (a grid may vary them), each with the
    published-corruption folders (``robustness_data``) its trials read."""
    seen: dict[str, tuple[dict, set[str]]] = {}
    for trial in trial_configs(cfg):
        data = dataclasses.asdict(trial.data)
        _, published = seen.setdefault(json.dumps(data, sort_keys=True, default=str), (data, set()))
        if trial.robustness and trial.robustness_data:
            published.add(trial.robustness_data)
    return list(seen.values())


def prepare_data(cfg: ExperimentConfig, log=print) -> None:
    """Download (with ``download: true``) or check every data set the trials need, decoding it into the cache once.

    Raises InputError naming the data set, its path, the cause and the fix, before any trial starts."""
    from data_zoo import load_images
    from data_zoo.loader import source_options
    from data_zoo.sources import get_source
    from stress.corruptions.published import PublishedArraysError, check_folder

    for data, published in data_configs(cfg):
        log(f"data: checking {data['name']} at {data['root']}")
        new = first_missing(data.get("root"))
        try:
            images = load_images(data["name"], data.get("root"), data.get("cache_dir"), **source_options(data))
        except (OSError, RuntimeError, ValueError) as err:
            if new is not None:  # a download that failed left the folders it made for it (a mistyped root): nothing else
                remove_empty_folders(new)
            hint = get_source(data["name"]).hint or "check data.root"
            cause = f"{type(err).__name__}: {str(err).splitlines()[0][:600]}" if str(err) else type(err).__name__
            raise InputError(f"data set {data['name']!r} is not usable at {data['root']} ({cause}). Fix: {hint}") from None
        if problem := split_problem(data, images):
            raise InputError(f"data set {data['name']!r} at {data['root']}: {problem}")
        for folder in sorted(published):
            try:
                present = check_folder(folder, images.test_y, images.test_x.shape[2:])
            except PublishedArraysError as err:
                raise InputError(f"robustness_data for {data['name']!r}: {err}") from None
            log(f"corruptions: {len(present)} read from the published arrays in {folder}, the rest generated")


def first_missing(root: str | None) -> Path | None:
    """The outermost folder of ``root`` (itself or a parent) that does not exist yet, if any."""
    if not root:
        return None
    missing = [p for p in (Path(root), *Path(root).parents) if not p.exists()]
    return missing[-1] if missing else None


def remove_empty_folders(top: Path) -> None:
    """Remove ``top`` and the folders below it, bottom up, where they hold nothing (a file keeps its folders)."""
    for folder, _, _ in os.walk(top, topdown=False):  # (bottom up: a folder after everything below it)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def split_problem(data: dict, images) -> str | None:
    """Why the trials could not split ``images`` as ``data`` asks (each would die on it), with the setting that works."""
    import numpy as np

    classes = len(images.classes)
    if classes < 2:
        return f"{classes} class: a classifier needs at least two (data.num_classes for synthetic data)"
    for key, labels in (("subset", images.train_y), ("test_subset", images.test_y)):
        size = data.get(key)
        if size and size < classes:
            return (f"data.{key} {size} is below the number of classes ({classes}): 0 images per class; "
                    f"use --set data.{key}={classes * 10} (or more), or leave it out")
    val = round((data.get("subset") or 0) * data.get("val_fraction", 0.0))
    if data.get("subset") and data.get("val_fraction") and val < classes:
        return (f"the validation split, data.val_fraction x data.subset = {val} images, is below the number of classes ({classes}): "
                f"0 per class; use --set data.subset={-(-classes // data['val_fraction'])} (or more)")
    fewest = int(np.bincount(images.train_y, minlength=classes).min())
    if round(fewest * data.get("val_fraction", 0.0)) >= fewest:
        return f"a class has {fewest} training image(s), all of which data.val_fraction {data['val_fraction']} puts in validation"
    return None
