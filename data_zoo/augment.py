"""Batched augmentations on the training device, with per-image randomness from a seeded generator.

Ops work on a normalised float batch (N, C, H, W). Random draws come from a seeded ``torch.Generator`` on the
batch's device, so a CUDA step copies nothing between host and device (no synchronisation per batch). Each device
is reproducible on its own; CPU and CUDA generators are different streams, so one seed augments differently on each.
Presets are named the way the YAML names them; a list of op names composes ops freely.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

AugmentOp = Callable[..., torch.Tensor]
_OPS: dict[str, AugmentOp] = {}
_PARAMS: dict[str, dict[str, tuple[type, float, float]]] = {}  # op -> parameter -> (type, lowest, highest), as augment_params allows

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "cropflip": ("crop", "flip"),
    "cutout": ("crop", "flip", "cutout"),  # DeVries & Taylor apply Cutout on top of crop + flip
}


def register_op(**params: tuple[type, float, float]) -> Callable[[AugmentOp], AugmentOp]:
    """Decorator: register a batch op under its function name, with the (type, lowest, highest) of each parameter."""
    def wrap(fn: AugmentOp) -> AugmentOp:
        _OPS[fn.__name__], _PARAMS[fn.__name__] = fn, params
        return fn

    return wrap


def list_ops() -> list[str]:
    """Names of the single ops (usable in a list spec)."""
    return sorted(_OPS)


def list_augmentations() -> list[str]:
    """Names of the presets (usable as a plain string spec)."""
    return sorted(PRESETS)


@register_op(padding=(int, 0, 32))
def crop(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random HxW crop of each image zero-padded (black) by ``padding`` pixels on every side."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4) + F.pad(torch.zeros_like(x[:1]), (padding,) * 4, value=1.0) * fill.view(1, c, 1, 1)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen, device=x.device)
    rows = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


@register_op(p=(float, 0.0, 1.0))
def flip(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Horizontal flip of each image with probability ``p``."""
    mask = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    return torch.where(mask[:, None, None, None], x.flip(3), x)


@register_op(length=(int, 1, 32), n_holes=(int, 1, 64))
def cutout(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, length: int = 16, n_holes: int = 1) -> torch.Tensor:
    """Zero ``n_holes`` length x length squares per image, centres anywhere, clipped at the border."""
    n, _, h, w = x.shape
    keep = torch.ones(n, 1, h, w, dtype=torch.bool, device=x.device)
    for _ in range(n_holes):
        centre = torch.stack([torch.randint(0, h, (n,), generator=gen, device=x.device), torch.randint(0, w, (n,), generator=gen, device=x.device)], 1)
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= centre[:, :1] - length // 2) & (rows < centre[:, :1] + length // 2)
        in_cols = (cols >= centre[:, 1:] - length // 2) & (cols < centre[:, 1:] + length // 2)
        keep &= ~(in_rows[:, None, :, None] & in_cols[:, None, None, :])
    return x * keep


def resolve_ops(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Op names for a preset name or a list of op names; unknown names fail with the known ones."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise KeyError(f"unknown augmentation {spec!r}; known: {', '.join(list_augmentations())} (or a list of: {', '.join(list_ops())})")
        return PRESETS[spec]
    unknown = [op for op in spec if op not in _OPS]
    if unknown:
        raise KeyError(f"unknown augmentation op {unknown[0]!r}; known: {', '.join(list_ops())}")
    return tuple(spec)


def param_problems(params: object) -> list[tuple[str, str]]:
    """(``op.param``, message) for every ``augment_params`` entry no op takes: unknown op or parameter, wrong type,
    outside the parameter's range (a crop padding of -40 or a Cutout of length -3 would fail every trial)."""
    if not isinstance(params, dict):
        return [("", f"must be a mapping of op -> {{parameter: value}}, got {type(params).__name__}")]
    out = []
    for op, values in params.items():
        if op not in _OPS:
            out.append((str(op), f"unknown augmentation op {op!r}; known: {', '.join(list_ops())}"))
        elif not isinstance(values, dict):
            out.append((op, f"must be a mapping of parameter -> value, got {type(values).__name__} {values!r}"))
        else:
            out += [(f"{op}.{key}", problem) for key, value in values.items() if (problem := _param_problem(op, key, value))]
    return out


def _param_problem(op: str, key: str, value: object) -> str | None:
    if key not in _PARAMS[op]:
        return f"unknown parameter {key!r} of {op}; known: {', '.join(sorted(_PARAMS[op]))}"
    kind, low, high = _PARAMS[op][key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not number or not low <= value <= high:  # (NaN fails the range)
        return f"must be {'an integer' if kind is int else 'a number'} in [{low:g}, {high:g}], got {value!r}"
    return None


class Augmenter:
    """A composed pipeline: ``Augmenter('cutout', {'cutout': {'length': 8}})(batch, gen)``."""

    def __init__(self, spec: str | Sequence[str], params: dict[str, dict] | None = None, fill: torch.Tensor | None = None):
        self.ops = resolve_ops(spec)
        self.params = params or {}
        problems = param_problems(self.params)
        if problems:
            raise ValueError("; ".join(f"augment_params.{key}: {message}" for key, message in problems))
        self.fill = fill  # normalised value of a black pixel (crop's padding), kept on the device of the batches it fills

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.fill is None or self.fill.device != x.device or self.fill.dtype != x.dtype:  # once per device and dtype, not per batch
            self.fill = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype) if self.fill is None else self.fill.to(x.device, x.dtype)
        for name in self.ops:
            x = _OPS[name](x, gen, self.fill, **self.params.get(name, {}))
        return x
