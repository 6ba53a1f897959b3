"""Dotted setting paths (``optimizer.lr``), merging the layers of the file and ``--set``, and the search space: each
grid entry a list or a seeded draw (choice, uniform, loguniform), expanded into the trials' points."""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import yaml

from config.errors import ConfigError
from config.yaml12 import load_yaml

SEARCH_KINDS = ("choice", "uniform", "loguniform")


# --- dotted paths, merging, overrides ---------------------------------------------------------


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``, recursing into mappings (lists are replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def set_path(data: dict, dotted: str, value: Any) -> dict:
    """Copy of ``data`` with ``a.b.c`` set to ``value`` (intermediate mappings created)."""
    out = copy.deepcopy(data)
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"--set {dotted}: {key!r} is not a mapping"])
    node[leaf] = value
    return out


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``['epochs=2', 'data.name=imagefolder']`` -> {'epochs': 2, 'data.name': 'imagefolder'} (YAML-typed)."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {pair!r}: expected KEY=VALUE, e.g. --set epochs=2"])
        try:
            out[key.strip()] = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:  # '[1', or a mapping with a key twice
            raise ConfigError([f"--set {key.strip()}: {raw!r} is not valid YAML ({getattr(err, 'problem', None) or err})"]) from None
    return out


# --- the search space -------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def grid_candidates(key: str, spec: Any, where: str, problems: list[tuple[str, str]], grid: bool = True) -> list[tuple[str, Any]]:
    """(path, value) pairs to validate for one grid entry: every listed value, or a range's bounds. A value listed twice
    in a grid (not a ``choice``, where a repeat weighs the draw) would only train the same trials again."""
    if isinstance(spec, list):
        if not spec:
            problems.append((where, "an empty list: give at least one value"))
        for i, v in enumerate(spec):
            if grid and v in spec[:i]:
                problems.append((f"{where}[{i}]", f"{v!r} is listed twice (also at [{spec.index(v)}]): each grid point would run twice"))
        return [(f"{where}[{i}]", v) for i, v in enumerate(spec)]
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS:
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            return grid_candidates(key, args, f"{where}.choice", problems, grid=False)
        if not (isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args) and args[0] < args[1]):
            problems.append((f"{where}.{kind}", f"expected [low, high] numbers with low < high, got {args!r}"))
            return []
        if kind == "loguniform" and args[0] <= 0:
            problems.append((f"{where}.{kind}", f"loguniform needs low > 0, got {args[0]}"))
        return [(f"{where}.{kind}[{i}]", float(a)) for i, a in enumerate(args)]
    problems.append((where, f"expected a list (grid) or one of {{{', '.join(k + ': ...' for k in SEARCH_KINDS)}}}, got {spec!r}"))
    return []


def grid_trials(grid: dict) -> int:
    """Number of grid points (random-search entries count once; num_samples multiplies)."""
    sizes = [len(v) for v in grid.values() if isinstance(v, list)]
    return int(max(1, math.prod(sizes)))


def expand_grid(grid: dict, num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """Concrete override dicts, one per trial, in Ray's order (grid product x samples). For dry runs."""
    import random

    rng = random.Random(seed)
    lists = {k: v for k, v in grid.items() if isinstance(v, list)}
    out = []
    for _ in range(num_samples):
        for combo in itertools.product(*lists.values()) if lists else [()]:
            point = dict(zip(lists, combo))
            for key, spec in grid.items():
                if isinstance(spec, dict):
                    point[key] = _sample(spec, rng)
            out.append(point)
    return out


def _sample(spec: dict, rng) -> Any:
    import math

    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(args)
    if kind == "uniform":
        return rng.uniform(*args)
    return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))


def apply_overrides(trial: dict, overrides: dict[str, Any]) -> dict:
    """A trial dict with each dotted ``overrides`` key set (one grid point)."""
    for key, value in overrides.items():
        trial = set_path(trial, key, value)
    return trial
