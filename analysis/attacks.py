"""FGSM and PGD accuracy per run (``stress/adversarial.py``): read from the trial where it attacked the same subset
with the same settings, else attacked here; the images that flip at the smallest epsilon explained with Grad-CAM
before and after; ``adversarial.json`` and the accuracy-against-epsilon figure over every run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analysis import gradcam, log, photos
from analysis.runs import RunRecord
from config.settings import TrialConfig
from data_zoo.loader import standardise
from stress import adversarial
from tracking import metrics, plots

if TYPE_CHECKING:
    from analysis.failures import RunAnalysis, RunSettings


DEFAULT_ADVERSARIAL = (TrialConfig.adversarial_images, TrialConfig.adversarial_steps, TrialConfig.adversarial_step_size)  # the trials' defaults
SPOT_CHECKED_IMAGES = 8  # of a trial's attacked images, attacked again here (both attacks, every epsilon) before its file is reused


def spot_check(model, x: np.ndarray, mean, std, pred, logged: dict, rng: np.random.Generator, n_images: int = SPOT_CHECKED_IMAGES) -> str | None:
    """How the trial's adversarial.json is not what its run gives, or None: its accuracies must be what its own clean
    accuracy and first flips make (the curve is their count), and ``n_images`` of its subset, drawn at random (fresh
    entropy), attacked again from the run's weights must flip at the logged epsilons (one may differ: a flip at the
    boundary between two epsilons can go either way on another device)."""
    eps, clean, n = logged["epsilons"][1:], logged["clean"], logged["images"]
    for name in adversarial.ATTACKS:
        flips = list(logged.get(f"first_flip_{name}", {}).values())
        made = [clean, *(clean - sum(f is not None and f <= e for f in flips) / n for e in eps)]
        if len(logged["accuracy"].get(name, [])) != len(made) or np.abs(np.subtract(logged["accuracy"][name], made)).max() > 1e-9:
            return f"its {name} accuracies are not what its clean accuracy and first flips give"
    pos = adversarial.first_per_class(pred.labels, len(pred.classes), logged["requested"])
    if len(pos) != n:
        return f"it attacked {n} images where its subset has {len(pos)}"
    drawn = pos[np.sort(rng.choice(len(pos), min(n_images, len(pos)), replace=False))]
    again = adversarial.robust_accuracy(model, x[drawn], pred.labels[drawn], mean, std, eps, logged["steps"], logged["step_size"])
    differ = [(name, int(i), logged.get(f"first_flip_{name}", {}).get(int(i)), now) for name in adversarial.ATTACKS
              for i, now in zip(pred.index[drawn], again["first_flip"][name])]
    differ = [d for d in differ if d[2] != d[3]]
    if len(differ) > 1:
        name, i, was, now = differ[0]
        return f"{len(differ)} first flips of {len(drawn)} images attacked again differ (test image #{i} under {name}: logged {was}, now {now})"
    return None


def adversarial_run(model, target, x: np.ndarray, mean, std, pred, settings: RunSettings, folder: Path, logged: dict | None,
                    shown: int = 8, rng: np.random.Generator | None = None) -> tuple[dict, Path | None]:
    """FGSM and PGD accuracy per epsilon on a class-balanced test subset (read from the trial when it attacked the same
    subset with the same PGD settings, and ``spot_check`` bears it out); Grad-CAM before and after the PGD perturbation for the images that flip at the
    smallest epsilon."""
    import torch

    same = logged is not None and (logged["requested"], logged["steps"], logged["step_size"]) == (settings.adversarial_images, settings.pgd_steps, settings.pgd_step_size)
    if same and (problem := spot_check(model, x, mean, std, pred, logged, rng or np.random.default_rng())):
        log(f"warning: {folder.name}'s {metrics.ADVERSARIAL_FILE} is not what its weights give ({problem}): attacked again here")
        same = False
    result = dict(logged, measured_in_trial=True) if same else dict(
        adversarial.stress_test(model, x, pred.labels, pred.index, len(pred.classes), settings.adversarial_images, mean, std,
                                settings.pgd_steps, settings.pgd_step_size), measured_in_trial=False)
    position = {int(i): q for q, i in enumerate(pred.index)}
    first_pgd = [(e, position[i]) for i, e in result["first_flip_pgd"].items()]
    flips = sorted(first_pgd)[:shown]
    if not flips:
        return result, None
    chosen = np.array([q for _, q in flips])
    m, s = torch.as_tensor(mean).view(1, -1, 1, 1), torch.as_tensor(std).view(1, -1, 1, 1)
    clean = torch.from_numpy(x[chosen]).float().div(255)
    y = torch.as_tensor(pred.labels[chosen]).long()
    adv = torch.cat([adversarial.pgd(model, clean[i : i + 1], y[i : i + 1], e, m, s, settings.pgd_steps, settings.pgd_step_size) for i, (e, _) in enumerate(flips)])
    with torch.no_grad():
        after = model(standardise(adv, m, s)).argmax(1).numpy()
    before_cams = gradcam.compute_cams(model, target, standardise(clean, m, s), pred.preds[chosen])
    after_cams = gradcam.compute_cams(model, target, standardise(adv, m, s), after)
    titles = [f"#{pred.index[q]} {pred.classes[pred.labels[q]]}->{pred.classes[a]} at {e * 255:.0f}/255" for (e, q), a in zip(flips, after)]
    figure = photos.cam_figure(x[chosen], {"Grad-CAM: clean prediction": before_cams, "Grad-CAM: after PGD": after_cams}, titles,
                                folder / "adversarial_flips.webp")
    return result, figure


def adversarial_settings(runs: list[RunRecord], given: tuple) -> tuple[int, int, float]:
    """(images, PGD steps, PGD step) for the analysis's attack: each as given, else the trials' where every run's trial
    attacked with the same settings (so every run is read, none attacked again), else DEFAULT_ADVERSARIAL."""
    logged = {(a["requested"], a["steps"], a["step_size"]) if (a := r.trial_adversarial) else None for r in runs}
    trials = logged.pop() if len(logged) == 1 and None not in logged else DEFAULT_ADVERSARIAL
    return tuple(value if value is not None else default for value, default in zip(given, trials))


def adversarial_summary(analyses: list[RunAnalysis], out: Path) -> dict | None:
    """adversarial.json (every run's accuracy per attack and epsilon) and the accuracy-vs-epsilon curves."""
    results = {a.run.name: a.adversarial for a in analyses if a.adversarial}
    if not results:
        return None
    first = next(iter(results.values()))
    summary = {"images": first["images"], "epsilons": first["epsilons"], "attacks": sorted(adversarial.ATTACKS), "steps": first["steps"],
               "step_size": first["step_size"],
               "measured_in_trials": sum(r["measured_in_trial"] for r in results.values()), "runs": results}
    (out / "adversarial.json").write_text(json.dumps(summary, indent=1))
    curves = {name: {attack: list(zip([e * 255 for e in r["epsilons"]], r["accuracy"][attack])) for attack in summary["attacks"]}
              for name, r in results.items()}
    summary["figure"] = plots.plot_attack_curves(curves, out / "adversarial_accuracy.png",
                                                 f"accuracy under FGSM and PGD ({summary['steps']} steps) on {summary['images']} test images")
    return summary
