"""Load ``experiments.yaml``, apply ``--set`` overrides, validate everything, expand the grid.

Every problem is reported with its place in the file (``experiments.quick.grid.arch[2]: unknown
model 'resnet19'; known: ...``) and all of them at once, before Ray or MLflow is touched.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from config.errors import ConfigError
from config.grid import apply_overrides, deep_merge, expand_grid, grid_candidates, parse_sets, set_path
from config.settings import ExperimentConfig, TrialConfig, nested_configs
from config.yaml12 import load_yaml

TOP_KEYS = ("defaults", "default_experiment", "experiments")
# An experiment's name becomes an MLflow filter value, a folder under --storage and the artifact folder, and a sweep id.
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
EXPERIMENT_NAME_RULE = "letters, digits, '-', '_' and '.', not starting with a dot"


# --- dict -> dataclass, with path-named type errors ------------------------------------------


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list or hint is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def build(cls: type, data: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    """Build dataclass ``cls`` from ``data``; append (dotted key, message) for every bad key or type."""
    if not isinstance(data, dict):
        problems.append((path, f"must be a mapping, got {type(data).__name__}"))
        return cls()
    hints, nested = typing.get_type_hints(cls), nested_configs(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            problems.append((where, f"unknown key {key!r}; known: {', '.join(sorted(hints))}"))
        elif isinstance(value, float) and not math.isfinite(value):  # .nan, .inf: no setting means them
            problems.append((where, f"must be a finite number, got {value}"))
        elif key in nested:
            kwargs[key] = build(nested[key], value, where, problems)
        elif not _type_ok(value, hints[key]):
            problems.append((where, f"expected {_type_name(hints[key])}, got {type(value).__name__} {value!r}"))
        else:
            kwargs[key] = float(value) if hints[key] is float else value
    obj = cls(**kwargs)
    for key, message in obj.problems():
        problems.append((f"{path}.{key}" if path else key, message))
    return obj


def registry_problems(cfg: TrialConfig) -> list[tuple[str, str]]:
    """Names the registries do not know, and model kwargs the factory rejects."""
    import torch

    from data_zoo import augment, sources
    from model_zoo import create_model, list_models

    out = []
    if cfg.arch not in list_models():
        out.append(("arch", f"unknown model {cfg.arch!r}; known: {', '.join(list_models())}"))
    else:
        try:
            with torch.device("meta"):  # shape-only build: checks kwargs without allocating weights
                create_model(cfg.arch, num_classes=10, **cfg.model)
        except (TypeError, ValueError) as err:
            out.append(("model", f"{cfg.arch} rejects {cfg.model}: {err}"))
    try:
        augment.resolve_ops(cfg.augment)
    except KeyError as err:
        out.append(("augment", err.args[0]))
    out += [(f"augment_params.{key}" if key else "augment_params", message) for key, message in augment.param_problems(cfg.augment_params)]
    if cfg.data.name not in sources.list_datasets():
        out.append(("data.name", f"unknown dataset {cfg.data.name!r}; known: {', '.join(sources.list_datasets())}"))
    return out


# --- whole-file validation --------------------------------------------------------------------


def _locate(key: str, layers: list[tuple[str, dict]]) -> str:
    """The place a dotted key came from: the last layer (``--set``, experiment, defaults) that sets it."""
    for prefix, raw in reversed(layers):
        node: Any = raw
        if prefix == "--set":
            if any(key == k or key.startswith(k + ".") for k in raw):
                return f"--set {key}"
            if inside := [k for k in raw if k.startswith(key + ".")]:  # a problem of the whole dict (model) a --set changed
                return ", ".join(f"--set {k}" for k in inside)
            continue
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return f"{prefix}.{key}" if prefix else key
    named = [prefix for prefix, _ in layers if prefix != "--set"]  # a default of the schema: the experiment it applies to
    return f"{named[-1]}.{key}" if named and named[-1] else key


def validate_experiment(merged: dict, layers: list[tuple[str, dict]], grid_where: str) -> tuple[ExperimentConfig, list[str]]:
    """Build and check one merged experiment; return it and its path-named problems."""
    problems: list[tuple[str, str]] = []
    cfg = build(ExperimentConfig, merged, "", problems)
    errors = [f"{_locate(k, layers)}: {m}" for k, m in problems + registry_problems(cfg)]
    grid = merged.get("grid") or {}
    if not isinstance(grid, dict):
        return cfg, errors
    base = {k: v for k, v in merged.items() if k != "grid"}
    for key, spec in grid.items():
        local: list[tuple[str, str]] = []
        for where, value in grid_candidates(key, spec, f"{grid_where}.{key}", local):
            point = set_path(base, key, value)
            inner: list[tuple[str, str]] = []
            trial = build(ExperimentConfig, point, "", inner)
            inner += registry_problems(trial)
            local += [(where, m) for k, m in inner if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
        errors += [f"{w}: {m}" for w, m in local]
    return cfg, errors


def load_file(path: str | Path) -> dict:
    """Parse the YAML file (YAML 1.2 scalars, safe types only) and check its top level."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read the config file ({err.strerror})"]) from err
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from err
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping with keys {', '.join(TOP_KEYS)}"])
    problems = [f"{k}: unknown top-level key; known: {', '.join(TOP_KEYS)}" for k in raw if k not in TOP_KEYS]
    if not isinstance(raw.get("experiments"), dict) or not raw["experiments"]:
        problems.append("experiments: must be a non-empty mapping of experiment name -> settings")
    if problems:
        raise ConfigError(problems)
    return raw


def resolve(path: str | Path, name: str | None = None, sets: list[str] | None = None) -> tuple[str, ExperimentConfig]:
    """Validate the whole file, then return (name, config) of the chosen experiment with ``--set`` applied."""
    raw = load_file(path)
    defaults, experiments = raw.get("defaults") or {}, raw["experiments"]
    name = name or raw.get("default_experiment") or next(iter(experiments))
    errors = []
    if name not in experiments:
        errors.append(f"--experiment {name!r}: no such experiment; known: {', '.join(experiments)}")
    overrides = parse_sets(sets or [])
    chosen = None
    for exp_name, exp in experiments.items():
        if not isinstance(exp_name, str) or not EXPERIMENT_NAME.fullmatch(exp_name):
            errors.append(f"experiments.{exp_name}: invalid experiment name {exp_name!r}; use {EXPERIMENT_NAME_RULE}")
            continue
        exp = exp or {}
        if not isinstance(exp, dict):
            errors.append(f"experiments.{exp_name}: must be a mapping, got {type(exp).__name__}")
            continue
        merged = deep_merge(defaults, exp)
        layers = [("defaults", defaults), (f"experiments.{exp_name}", exp)]
        if exp_name == name:
            for key, value in overrides.items():
                merged = set_path(merged, key, value)
                if isinstance(merged.get("grid"), dict):
                    merged["grid"].pop(key, None)  # a --set value fixes a gridded setting
            layers.append(("--set", overrides))
        cfg, problems = validate_experiment(merged, layers, f"experiments.{exp_name}.grid")
        errors += problems
        if exp_name == name:
            chosen = cfg
    if errors:
        raise ConfigError(errors)
    return name, chosen


def trial_configs(cfg: ExperimentConfig) -> list[TrialConfig]:
    """Every trial of a (validated) experiment, for dry runs and trial tables."""
    out = []
    for point in expand_grid(cfg.grid, cfg.num_samples, cfg.search_seed):
        problems: list[tuple[str, str]] = []
        out.append(build(TrialConfig, apply_overrides(cfg.trial_dict(), point), "", problems))
    return out


def as_dict(cfg: Any) -> dict:
    """A config dataclass as a plain dict."""
    return dataclasses.asdict(cfg)
