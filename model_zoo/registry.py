"""Model registry: lowercase names -> factories, each with its Grad-CAM target layer.

Modelled on timm's ``_registry.py``: ``@register_model`` on a factory, ``create_model`` that fails
with the list of known names, ``list_models``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model."""

    name: str
    factory: Callable[..., nn.Module]
    gradcam_layer: str  # dotted submodule path of the default Grad-CAM target
    paper: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(gradcam_layer: str, paper: str) -> Callable:
    """Decorator: register a factory under its function name."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, factory, gradcam_layer, paper)
        return factory

    return wrap


def require_positive_ints(*, lists: dict | None = None, **values) -> None:
    """Raise ValueError naming every architecture hyperparameter in ``values`` that is not a positive integer and every
    one in ``lists`` (``widths``) that is not a non-empty list of them: a width or an SE reduction of 0 must fail when
    the experiment file is read, not inside a trial."""
    def ok(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    bad = [f"{key} must be a positive integer, got {v!r}" for key, v in values.items() if not ok(v)]
    bad += [f"{key} must be a non-empty list of positive integers, got {v!r}" for key, v in (lists or {}).items()
            if not (isinstance(v, list | tuple) and len(v) > 0 and all(ok(x) for x in v))]
    if bad:
        raise ValueError("; ".join(bad))


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names fail with the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model for ``num_classes`` classes."""
    return get_entry(name).factory(num_classes=num_classes, **kwargs)


def gradcam_target(model: nn.Module, name: str, layer: str | None = None) -> nn.Module:
    """The Grad-CAM target module of ``model``: ``layer`` if given, else the registered default."""
    path = layer or get_entry(name).gradcam_layer
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Sequential) and n]
        raise KeyError(f"model {name!r} has no layer {path!r}; try one of: {', '.join(convs[:20])}") from err
