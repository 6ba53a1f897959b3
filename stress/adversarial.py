"""Adversarial stress: accuracy under small worst-case L-infinity perturbations (FGSM, PGD) in pixel space [0, 1].

The attacked function is ``normalise -> model``, so epsilon is in pixel units (8/255 = eight grey levels) whatever
the data's normalisation. Lives below training and analysis, like ``corruptions.py``.

Accuracy at epsilon is the worst case over the grid up to it: an image counts as broken at epsilon if the attack
fooled the model at that epsilon or a smaller one (a perturbation within a smaller ball is within the larger ball), so
the curve cannot rise with epsilon, and epsilon = 0 is the clean accuracy. PGD starts from the FGSM point and keeps
an image at the first point that fools the model, so it breaks at least every image FGSM breaks.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_zoo.loader import standardise
from stress.corruptions import first_per_class
from tracking import metrics

EPSILONS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)


def _loss_gradient(model, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The gradient of the cross-entropy with respect to the [0, 1] pixels (normalisation inside the attacked function)."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(standardise(x, mean, std)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model, x: torch.Tensor, y: torch.Tensor, eps: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Goodfellow et al. 2015: one signed-gradient step of size ``eps``, clipped to [0, 1]."""
    return (x + eps * _loss_gradient(model, x, y, mean, std).sign()).clamp(0, 1)


def pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, mean: torch.Tensor, std: torch.Tensor, steps: int = 10,
        step_size: float = 0.25) -> torch.Tensor:
    """Madry et al. 2018, L-infinity: from the FGSM point, ``steps`` signed-gradient steps of ``step_size * eps``, each
    projected onto the eps-ball around ``x`` and [0, 1]; an image stays at the first point that fools the model."""
    adv = fgsm(model, x, y, eps, mean, std)
    with torch.no_grad():
        fooled = model(standardise(adv, mean, std)).argmax(1) != y
    for _ in range(steps):
        active = ~fooled
        if not active.any():
            break
        xa, ya, x0 = adv[active], y[active], x[active]
        step = xa + step_size * eps * _loss_gradient(model, xa, ya, mean, std).sign()
        step = torch.max(torch.min(step, x0 + eps), x0 - eps).clamp(0, 1)
        adv[active] = step
        with torch.no_grad():
            fooled[active] = model(standardise(step, mean, std)).argmax(1) != ya
    return adv


ATTACKS = {"fgsm": fgsm, "pgd": pgd}


def robust_accuracy(model, images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray,
                    epsilons: Sequence[float] = EPSILONS, steps: int = 10, step_size: float = 0.25, batch_size: int = 250,
                    device: str | torch.device = "cpu") -> dict:
    """Accuracy under every attack at 0 and each epsilon (worst case up to it, see the module's docstring) on uint8
    ``images``, and per attack the smallest epsilon at which each image that was right flips (None: never)."""
    model = model.eval().to(device)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    eps_grid = sorted(float(e) for e in epsilons)
    result = {"images": int(len(labels)), "epsilons": [0.0, *eps_grid], "steps": steps, "step_size": step_size, "accuracy": {}, "first_flip": {}}
    clean = np.zeros(len(labels), bool)
    broken = {name: np.zeros((len(eps_grid), len(labels)), bool) for name in ATTACKS}
    for start in range(0, len(labels), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).float().div(255)
        y = torch.as_tensor(labels[start : start + batch_size], device=device).long()
        with torch.no_grad():
            right = (model(standardise(x, m, s)).argmax(1) == y).cpu().numpy()
        clean[start : start + len(y)] = right
        attacked = np.flatnonzero(right)  # an image already wrong is broken at every epsilon: no need to attack it
        if not len(attacked):
            continue
        xa, ya = x[torch.from_numpy(attacked).to(device)], y[torch.from_numpy(attacked).to(device)]
        for name, attack in ATTACKS.items():
            kwargs = {"steps": steps, "step_size": step_size} if name == "pgd" else {}
            for k, eps in enumerate(eps_grid):
                adv = attack(model, xa, ya, eps, m, s, **kwargs)
                with torch.no_grad():
                    broken[name][k, start + attacked] = (model(standardise(adv, m, s)).argmax(1) != ya).cpu().numpy()
    result["clean"] = float(clean.mean())
    for name, fooled in broken.items():
        cumulative = np.logical_or.accumulate(fooled | ~clean, axis=0)  # broken at this epsilon or a smaller one
        result["accuracy"][name] = [result["clean"], *(1 - cumulative.mean(1)).tolist()]
        first = np.where(cumulative.any(0) & clean, cumulative.argmax(0), -1)
        result["first_flip"][name] = [None if k < 0 else eps_grid[k] for k in first.tolist()]
    return result


def stress_test(model, images: np.ndarray, labels: np.ndarray, index: np.ndarray, n_classes: int, n_images: int,
                mean: np.ndarray, std: np.ndarray, steps: int = 10, step_size: float = 0.25, batch_size: int = 250,
                device: str | torch.device = "cpu") -> dict:
    """``robust_accuracy`` on the class-balanced subset of ``n_images`` test images (the same subset in a trial and in the
    analysis: same labels, same rule), as logged in ``adversarial.json``: ``requested`` and ``images`` (the subset's
    size), the settings, ``accuracy`` per attack at [0, *epsilons], ``first_flip_<attack>`` ({test index: the smallest
    epsilon that flips it}) and ``metrics`` (the accuracies under their metric names)."""
    pos = first_per_class(labels, n_classes, n_images)
    result = robust_accuracy(model, images[pos], labels[pos], mean, std, steps=steps, step_size=step_size, batch_size=batch_size, device=device)
    for name, first in result.pop("first_flip").items():
        result[f"first_flip_{name}"] = {int(index[q]): e for q, e in zip(pos, first) if e is not None}
    result["requested"] = n_images
    result["metrics"] = {metrics.ADVERSARIAL_ACC.format(name, eps * 255): acc
                         for name, accs in result["accuracy"].items() for eps, acc in zip(result["epsilons"][1:], accs[1:])}
    return result


def from_json(text: str) -> dict:
    """An ``adversarial.json`` read back: the first-flip maps keyed by test index again (JSON made them strings)."""
    result = json.loads(text)
    for name in ATTACKS:
        key = f"first_flip_{name}"
        result[key] = {int(k): v for k, v in result.get(key, {}).items()}
    return result
