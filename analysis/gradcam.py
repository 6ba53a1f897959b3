"""Grad-CAM with pytorch-grad-cam on a model's registered (or chosen) target layer, batched.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017. The library's context-manager form releases its hooks on exit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from analysis.runs import RunRecord
from config.errors import InputError


def compute_cams(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, classes: Sequence[int], batch_size: int = 256) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] at input resolution, for each input's given class."""
    device = next(model.parameters()).device
    out = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size].to(device)
            targets = [ClassifierOutputTarget(int(c)) for c in classes[start : start + batch_size]]
            out.append(cam(input_tensor=batch, targets=targets))
    return np.concatenate(out) if out else np.zeros((0, *inputs.shape[-2:]), np.float32)


def faithfulness(model: nn.Module, inputs: torch.Tensor, cams: np.ndarray, classes: Sequence[int], seed: int = 0) -> np.ndarray:
    """ROAD score per map (Rong et al., ICML 2022, pytorch-grad-cam's ``ROADCombined``, percentiles 20-80): the change
    of the class's softmax when the least relevant pixels are imputed away minus its change when the most relevant are,
    halved, i.e. (drop under most-relevant-first - drop under least-relevant-first) / 2. Positive means the map points
    at what the model uses. The imputation noise is seeded, so the same inputs give the same scores.

    Assembled from the library's parts as its ``ROADCombined`` is (least-relevant-first first, so the seeded noise
    falls the same), with the clean images' softmax computed once instead of once per percentile and ``SparseImputer``
    for its imputer: the library's own scores, bit for bit, in half the time."""
    from pytorch_grad_cam.metrics.perturbation_confidence import PerturbationConfidenceMetric, RemoveLeastRelevantFirst, RemoveMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    if not len(inputs):
        return np.zeros(0)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    inputs, imputer = inputs.to(next(model.parameters()).device), SparseImputer()
    with torch.no_grad():
        clean = np.float32([target(output).cpu().numpy() for target, output in zip(targets, model(inputs))])

    def mean_change(removal) -> np.ndarray:  # the library's AveragerAcrossThresholds over its PerturbationConfidenceMetric
        after = [PerturbationConfidenceMetric(removal(p, imputer))(inputs, cams, targets, model, return_diff=False) for p in (20, 40, 60, 80)]
        return np.mean(np.float32([a - clean for a in after]), axis=0)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        least_first = mean_change(RemoveLeastRelevantFirst)
        return np.asarray((least_first - mean_change(RemoveMostRelevantFirst)) / 2, dtype=float).reshape(-1)


class SparseImputer:
    """ROAD's noisy linear imputation (pytorch-grad-cam's ``NoisyLinearImputer``: each removed pixel the weighted mean
    of its 8 neighbours, solved as one sparse system, plus noise 0.01) with the system built in one go: the library
    fills a ``lil_matrix`` entry by entry, half of ROAD's time; this gives the same matrix, and so the same pixels."""

    noise = 0.01

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from scipy.sparse.linalg import spsolve

        a, b = imputation_system(mask.numpy(), img.numpy())
        solved = torch.tensor(spsolve(a, b), dtype=torch.float).t()
        filled = img.reshape(img.shape[0], -1).clone()
        filled[:, np.flatnonzero(mask.reshape(-1).numpy() == 0)] = solved + self.noise * torch.randn_like(solved)
        return filled.reshape_as(img)


def imputation_system(mask: np.ndarray, img: np.ndarray):
    """(A, b) of the library's ``setup_sparse_system``: one equation per removed pixel (mask 0), one unknown each,
    A in CSC form; the same neighbour order, so the same floating-point sums."""
    from pytorch_grad_cam.metrics.road import neighbors_weights
    from scipy.sparse import coo_matrix

    height, width = mask.shape
    known, values = mask.reshape(-1) > 0.5, img.reshape(img.shape[0], -1)
    removed = np.flatnonzero(mask.reshape(-1) == 0)
    unknown_id = np.zeros(known.size, dtype=int)
    unknown_id[removed] = np.arange(len(removed))
    b, weight_sum = np.zeros((len(removed), img.shape[0])), np.ones(len(removed))
    rows, cols, weights = [], [], []
    for (dy, dx), weight in neighbors_weights:
        y, x = removed // width + dy, removed % width + dx
        inside = (y >= 0) & (x >= 0) & (y < height) & (x < width)
        ids, neighbour = np.flatnonzero(inside), (y * width + x)[inside]
        given = known[neighbour]  # the neighbour's value is kept (right-hand side) or is another unknown (matrix)
        b[ids[given], :] -= weight * values[:, neighbour[given]].T
        rows.append(ids[~given])
        cols.append(unknown_id[neighbour[~given]])
        weights.append(np.full(len(rows[-1]), weight))
        weight_sum[~inside] -= weight
    rows.append(np.arange(len(removed)))
    cols.append(np.arange(len(removed)))
    weights.append(-weight_sum)
    a = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(len(removed), len(removed)))
    return a.tocsc(), b


def reference_maps(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Maps that know nothing of the model, the scale for a ROAD score: seeded uniform noise and a centred Gaussian blob."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    blob = np.exp(-(xx**2 + yy**2) / (2 * (size / 4) ** 2)).astype(np.float32)
    return {"random map": np.random.default_rng(seed).random((n, size, size)).astype(np.float32), "centred blob": np.repeat(blob[None], n, 0)}


def layer_resolution(model: nn.Module, layer: nn.Module, size: int = 32) -> tuple[int, int]:
    """Spatial size of ``layer``'s output for a ``size`` x ``size`` input."""
    shapes = []
    handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[-2:])))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        handle.remove()
    return shapes[0]


def resolve_layers(spec: str | None, runs: list[RunRecord]) -> dict[str, str]:
    """``--layer`` as architecture -> module path, checked against every run's model before any work.

    ``layer3`` applies to every architecture; ``resnet18=layer3,plain_cnn=stages.1`` names one per architecture
    (the others keep their registered layer). Raises InputError listing the layers each architecture has."""
    import torch

    from model_zoo import create_model

    if not spec:
        return {}
    configs = {r.config["arch"]: r for r in runs}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        layers = {arch: parts[0] for arch in configs}
    elif all("=" in p for p in parts):
        layers = dict(p.split("=", 1) for p in parts)
    else:
        raise InputError(f"--layer {spec!r}: give one module path (layer3) or ARCH=PATH pairs (resnet18=layer3,plain_cnn=stages.1)")
    problems = []
    for arch, path in layers.items():
        if arch not in configs:
            problems.append(f"{arch}: no run of this sweep uses it (architectures: {', '.join(sorted(configs))})")
            continue
        with torch.device("meta"):
            model = create_model(arch, len(configs[arch].predictions.classes), **configs[arch].config.get("model", {}))
        names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
        if path not in dict(model.named_modules()):
            problems.append(f"{arch} has no layer {path!r}; its layers: {', '.join(names)}")
    if problems:
        raise InputError(f"--layer {spec}: " + "; ".join(problems) + ". Name a layer per architecture, e.g. --layer resnet18=layer3")
    return layers
