"""What the driver checks and records around a launch: the data, once, before Ray starts; a record per launch.

Each launch writes ``<storage>/<sweep id>/stresslab.json`` (experiment, sweep id, kind, MLflow ids, status), so
``--resume`` finds the newest interrupted *sweep* of exactly that experiment, never a ``--rerun-best`` launch or
an experiment whose name merely starts the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from config.settings import ExperimentConfig
from config.schema import InputError, trial_configs

RECORD_FILE = "stresslab.json"
FINISHED = "finished"


def write_record(storage: str, sweep: dict, status: str) -> None:
    """Create or update the launch record of ``sweep`` (atomically: a reader never sees half a file)."""
    folder = Path(storage) / sweep["sweep_id"]
    folder.mkdir(parents=True, exist_ok=True)
    record = {k: sweep[k] for k in ("experiment", "sweep_id", "kind", "tracking_uri", "experiment_id", "parent_run_id")} | {"status": status}
    tmp = folder / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / RECORD_FILE)


def read_records(storage: str) -> list[dict]:
    """Every launch record under ``storage`` with its Ray folder, oldest first (sweep ids carry the start time)."""
    out = []
    for path in Path(storage).glob(f"*/{RECORD_FILE}"):
        try:
            out.append(json.loads(path.read_text()) | {"path": str(path.parent)})
        except (OSError, ValueError):
            continue  # a record being replaced or damaged is not a launch to resume
    return sorted(out, key=lambda r: (r["sweep_id"].rsplit("-", 2)[-2:], r["sweep_id"]))


def sweeps(storage: str, name: str) -> list[dict]:
    """The launch records of the sweeps (not reruns) of experiment ``name`` under ``storage``, oldest first."""
    return [r for r in read_records(storage) if r["experiment"] == name and r["kind"] == "trial"]


def resume_target(storage: str, name: str) -> dict:
    """The newest sweep of experiment ``name`` that did not finish."""
    candidates = [r for r in sweeps(storage, name) if r["status"] != FINISHED]
    if not candidates:
        raise InputError(f"no interrupted sweep of {name!r} under {storage} to resume (launches that finished, --rerun-best launches and "
                         f"other experiments are never resumed); start one without --resume")
    return candidates[-1]


@contextlib.contextmanager
def ray_output_to(log: Path, enabled: bool = True):
    """Send everything this process writes to stdout and stderr (Ray's trial tables, forwarded worker logs, MLflow's
    links) to ``log``, at the file-descriptor level; the sweep view keeps writing to the real terminal."""
    from launch.callbacks import CONSOLE

    if not enabled:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    worker_logs_to(log)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log, "a") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        CONSOLE.append(terminal)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            CONSOLE.remove(terminal)
            terminal.write("\n" if terminal.isatty() else "")
            terminal.close()


def worker_logs_to(log: Path) -> None:
    """The trials' output that Ray forwards to this driver goes to ``log``, every line (no "[repeated Nx]"
    folding), for as long as Ray runs: its last lines arrive after the sweep has returned, when stdout is the terminal
    again, and Ray printed its folded lines there at shutdown. No public API routes them: this swaps the handler
    ray.init(log_to_driver=True) installs."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # (log_to_driver=False, or no Ray yet)
        return

    def to_log(data: dict) -> None:
        try:
            with open(log, "a") as sink:
                ray_worker.print_worker_logs(data, sink)
        except OSError:  # the launch's folder is gone (a sweep into a temporary folder, then deleted): nothing to keep
            pass

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_log)


# --- the data, checked once by the driver -------------------------------------------------------


def data_configs(cfg: ExperimentConfig) -> list[dict]:
    """The distinct ``data`` sections the trials of ``cfg`` will load (a grid may vary them)."""
    seen: dict[str, dict] = {}
    for trial in trial_configs(cfg):
        data = dataclasses.asdict(trial.data)
        seen.setdefault(json.dumps(data, sort_keys=True, default=str), data)
    return list(seen.values())


def prepare_data(cfg: ExperimentConfig, log=print) -> None:
    """Download (with ``download: true``) or check every data set the trials need, decoding it into the cache once.

    Raises InputError naming the data set, its path, the cause and the fix, before any trial starts."""
    from data_zoo import load_images
    from data_zoo.loader import source_options
    from data_zoo.sources import get_source

    for data in data_configs(cfg):
        log(f"data: checking {data['name']} at {data['root']}")
        try:
            images = load_images(data["name"], data.get("root"), data.get("cache_dir"), **source_options(data))
        except (OSError, RuntimeError, ValueError) as err:
            hint = get_source(data["name"]).hint or "check data.root"
            cause = f"{type(err).__name__}: {str(err).splitlines()[0][:600]}" if str(err) else type(err).__name__
            raise InputError(f"data set {data['name']!r} is not usable at {data['root']} ({cause}). Fix: {hint}") from None
        if problem := split_problem(data, images):
            raise InputError(f"data set {data['name']!r} at {data['root']}: {problem}")


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
    fewest = int(np.bincount(images.train_y, minlength=classes).min())
    if round(fewest * data.get("val_fraction", 0.0)) >= fewest:
        return f"a class has {fewest} training image(s), all of which data.val_fraction {data['val_fraction']} puts in validation"
    return None

