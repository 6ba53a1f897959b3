"""What is checked before anything starts: the store and folders a sweep writes, the paths and GPUs it asks for, and
what a cluster's nodes can see. Each problem raises InputError, PermissionError or ConfigError naming the fix."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import tracking
from config.errors import ConfigError, InputError
from config.settings import PATH_SETTINGS, ExperimentConfig


def check_writable(args: argparse.Namespace) -> None:
    """The tracking store must answer (or, local, be where it can be made), and Ray's results folder (unless only a model
    is registered) and a local MLflow store must be writable, before anything starts."""
    if "://" in args.storage:  # Path() would make "s3:" a local folder, where the launch record and --resume then look
        raise InputError(f"--storage {args.storage}: a URI; stresslab keeps its launch records (for --resume) beside Ray's results, "
                         "in a folder: pass a local or shared folder (a bucket mounted as a folder works)")
    folders = [] if args.register_best else [Path(args.storage)]
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_store(uri, creating=not (args.register_best or args.rerun_best))
    if db := tracking.store.sqlite_path(uri):
        folders.append(db.parent)
        if not args.register_best:  # the runs' artifacts (weights, predictions): written at each trial's end
            folders.append(tracking.store.artifact_folder(uri))
    need = float(os.environ.get("STRESSLAB_MIN_FREE_MB", "100")) * 2**20
    for folder in folders:
        flag = "--storage" if folder == Path(args.storage) else "--tracking-uri"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_bytes(b"\0" * 65536)
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"cannot write to {folder} ({err.strerror}); choose a writable folder with {flag}") from err
        if (free := shutil.disk_usage(folder).free) < need:
            raise PermissionError(f"{folder} has {free / 2**20:.0f} MB free, below the {need / 2**20:.0f} MB a sweep needs "
                                  f"(STRESSLAB_MIN_FREE_MB); free some space or choose another folder with {flag}")


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Data root, cache and published corruption arrays made absolute, in the base settings and in the grid: trials
    run in Ray's own working directories, where a relative path means something else."""
    absolute = lambda path: path if path is None else str(Path(path).expanduser().resolve())
    data = dataclasses.replace(cfg.data, root=absolute(cfg.data.root), cache_dir=absolute(cfg.data.cache_dir))
    cfg = dataclasses.replace(cfg, robustness_data=absolute(cfg.robustness_data))
    grid = dict(cfg.grid)
    for key in PATH_SETTINGS:
        spec = grid.get(key)
        if isinstance(spec, list):
            grid[key] = [absolute(v) for v in spec]
        elif isinstance(spec, dict) and isinstance(spec.get("choice"), list):
            grid[key] = {**spec, "choice": [absolute(v) for v in spec["choice"]]}
    return dataclasses.replace(cfg, data=data, grid=grid)


def available_gpus() -> float:
    """GPUs a local Ray will have: the CUDA devices, or what RAY_OVERRIDE_RESOURCES declares to Ray (its own override)."""
    import torch

    declared = json.loads(os.environ.get("RAY_OVERRIDE_RESOURCES") or "{}").get("GPU")
    return float(declared) if declared is not None else torch.cuda.device_count()


def check_gpus(name: str, cfg: ExperimentConfig, gpus: float, per: str = "machine") -> None:
    """Refuse a per-trial GPU request no single node can meet (a trial runs on one node; Ray would wait forever)."""
    if cfg.resources.gpu > gpus:
        where = "this machine has" if per == "machine" else "the largest node of this cluster has"
        raise ConfigError([f"experiments.{name}.resources.gpu: {cfg.resources.gpu:g} GPU per trial but {where} {gpus:g}; "
                           f"use --set resources.gpu=0 to run on CPU"])


# Filesystems every node of a cluster can see (a local disk of the head is not one of them).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "cephfs", "ceph", "glusterfs", "fuse.")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (the mount point deepest above it); '' if unknown."""
    import psutil

    path, best = Path(path).resolve(), ("", "")
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if (path == mount or mount in path.parents) and len(part.mountpoint) > len(best[0]):
            best = (part.mountpoint, part.fstype)
    return best[1]


def shared_storage_warnings(uri: str, storage: str) -> list[str]:
    """With --address, trials on other nodes write to the MLflow store and to --storage: say so where they cannot."""
    local = []  # (what, path as given, folder whose filesystem counts, fix)
    if db := tracking.store.sqlite_path(uri):
        local.append(("a local SQLite MLflow store", str(db), db.parent, "start an MLflow server on the head and pass --tracking-uri http://HEAD:5000"))
    if "://" not in storage:  # (a URI is refused before this, by check_writable)
        local.append(("--storage", storage, Path(storage), "use a folder every node sees"))
    found = []
    for what, path, folder, hint in local:
        kind = filesystem_type(folder)
        if not kind.startswith(SHARED_FILESYSTEMS):
            found.append(f"{what} ({path}, {kind or 'unknown'} filesystem) is visible to this node only; trials on other nodes "
                         f"of the cluster cannot write there ({hint})")
    return found
