"""The HTML report, and the analysis run that keeps it in MLflow.

Built for 36+ runs: conclusions and comparisons first, one overview table whose rows link to per-run
sections collapsed in ``<details>``, a table of contents, and figures as PNG files beside the HTML
(relative, lazy-loaded links), so the page opens fast and the folder is one MLflow artifact.
"""
from __future__ import annotations

import contextvars
import json
import os
from collections import Counter
from pathlib import Path

import jinja2
import markupsafe
import numpy as np

from analysis.label_issues import weak_ensemble_warning
from tracking import metrics

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}.note{color:#555;font-size:.9em}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.4em .8em}
details{margin:.3em 0;border:1px solid #ddd;border-radius:4px;padding:.2em .6em}summary{cursor:pointer;font-weight:600}
.conclusions details{border:none;padding:0;font-size:.92em}.conclusions summary{font-weight:normal;color:#555}
nav{font-size:.9em}nav a{margin-right:1em}.conclusions li{margin:.3em 0}"""
ROOT: contextvars.ContextVar[Path] = contextvars.ContextVar("report_root")  # figure links are relative to the report's folder
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


class Link(str):
    """A table cell that links to ``href`` (a run's collapsed section)."""

    def __new__(cls, text: str, href: str):
        obj = super().__new__(cls, text)
        obj.href = href
        return obj


def figure(path: Path | None, alt: str) -> dict | None:
    """A figure file beside the report, as a relative link (the folder moves as a whole); None if it was not made."""
    if not path or not Path(path).exists():
        return None
    return {"src": Path(os.path.relpath(Path(path).resolve(), ROOT.get().resolve())).as_posix(), "alt": alt}


def pm(pair: tuple[float, float], signed: bool = False, scale: float = 100) -> str:
    """'mean ± std' in percent."""
    return f"{pair[0] * scale:{'+' if signed else ''}.2f} ± {pair[1] * scale:.2f}"


def fmt(value: float, scale: float = 100) -> str:
    return "-" if value is None or value != value else f"{value * scale:.2f}"


def interval(low_high: tuple[float, float]) -> str:
    return f"[{low_high[0] * 100:+.2f}, {low_high[1] * 100:+.2f}]"


def setup_view(experiment: str, uri: str, threshold: float, analyses) -> dict:
    cfg = analyses[0].run.config
    varying = sorted({k for a in analyses for k, v in a.run.params.items() if any(b.run.params.get(k) != v for b in analyses)} - {"data.root"})
    return {"experiment": experiment, "runs": len(analyses), "uri": uri, "threshold": threshold, "varying": ", ".join(varying) or "none",
            "rows": [[k, json.dumps(cfg.get(k), default=str)] for k in ("epochs", "batch_size", "optimizer", "schedule", "data")]}


def selection_key(a) -> tuple:
    """Runs ranked on the validation split (never on test), by the tested weights' epoch (under early stopping the best,
    not the last); test accuracy only breaks ties or stands in without validation."""
    val = a.run.tested(metrics.VAL_ACC)
    return (float("-inf") if val is None else val, a.run.metrics.get(metrics.TEST_ACC, 0))


def results_view(analyses, figures: dict) -> dict:
    rows = []
    for a in sorted(analyses, key=selection_key, reverse=True):
        m = a.run.metrics
        road = [f"{a.road[k]:+.3f}" if k in a.road else "-" for k in ("Grad-CAM", "random map", "centred blob")]
        rows.append([Link(a.run.name, "#" + anchor(a.run.name)), fmt(m.get(metrics.TEST_ACC)), fmt(m.get(metrics.TEST_F1)), fmt(a.run.tested(metrics.VAL_ACC)),
                     m.get(metrics.TEST_EPOCH, "-"), len(a.failures), len(a.failures_excluding_label_errors),
                     f"{a.layer} ({a.resolution[0]}x{a.resolution[1]})", *road, a.run.run_id[:8]])
    shown = (("metrics", "test metrics per run"), ("curves", "training (solid) and validation (dashed) curves"),
             ("per_class", "per-class test accuracy"), ("worst", "worst classes"))
    return {"headers": ["run", "test acc %", "macro F1 %", "val acc %", "tested epoch", "failures", "excl. likely label errors", "Grad-CAM layer",
                        "ROAD Grad-CAM", "ROAD random map", "ROAD centred blob", "run id"], "rows": rows,
            "road_images": next((a.road.get("images") for a in analyses if a.road), 0),
            "figures": [figure(figures.get(key), alt) for key, alt in shown]}


def anchor(name: str) -> str:
    return "run-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def failures_view(analyses) -> list[dict]:
    out = []
    for a in analyses:
        figures = (("failures", "most confident failures: #index truth->prediction confidence"),
                   ("gradcam", f"Grad-CAM on {a.layer} ({a.resolution[0]}x{a.resolution[1]}) for the predicted and the true class"),
                   ("adversarial", "images that flip at the smallest epsilon under PGD: Grad-CAM of the clean and of the adversarial "
                                   "prediction (#index truth->adversarial prediction at epsilon)"),
                   ("confusion", f"normalised confusion matrix, {a.run.name}"))
        out.append({"anchor": anchor(a.run.name), "name": a.run.name, "failures": len(a.failures), "kept": len(a.failures_excluding_label_errors),
                    "categories": [[c.name, c.evidence, ", ".join(map(str, c.test_indices[:12])) + (" ..." if len(c.test_indices) > 12 else "")]
                                   for c in a.categories],
                    "figures": [figure(a.figures.get(key), alt) for key, alt in figures]})
    return out


def comparison_view(c) -> dict:
    pairs = [[p["baseline"], p["variant"], fmt(p["baseline_acc"]), fmt(p["variant_acc"]), len(p["fixed"]), len(p["still"]), len(p["new"]),
              f"{p['mcnemar']['b']}/{p['mcnemar']['c']}", p["mcnemar"]["test"], f"{p['mcnemar']['p_value']:.3g}", f"{p['mcnemar'].get('p_holm', 1):.3g}"]
             for p in c.pairs]
    strata = [[s["stratum"], s["pairs"], pm(s["delta"], signed=True), interval(s["delta_ci95"]), pm(s["fixed"], scale=1), pm(s["new"], scale=1),
               churn_text(s["churn"], "fixed"), churn_text(s["churn"], "new"), churn_verdict(s)] for s in c.strata]
    classes = [[r["class"], pm(r["baseline"]), pm(r["variant"]), pm(r["delta"], signed=True), interval(r["delta_ci95"])] for r in c.per_class]
    return {"baseline": c.baseline, "variant": c.variant, "key": c.baseline.split("=")[0],
            "pairs": {"headers": ["baseline", "variant", "base acc %", "variant acc %", "fixed", "still failing", "new", "McNemar b/c", "test", "p",
                                  "p (Holm)"], "rows": pairs},
            "strata": {"headers": ["architecture", "pairs", "accuracy change (points)", "95% interval", "fixed per pair", "new per pair",
                                   "seed churn: fixed", "seed churn: new", "beyond seed churn?"], "rows": strata},
            "classes": {"headers": ["class", "baseline", "variant", "change", "95% interval"], "rows": classes},
            "per_class_delta": figure(c.figures.get("per_class_delta"), "per-class accuracy change"),
            "before_after": figure(c.figures.get("before_after"), "Grad-CAM before and after on failures the change fixed and introduced")}


def calibration_view(extra: dict) -> dict:
    summary, path = extra["calibration"]
    rows = [[name, f"{c['ece']:.4f}", "-" if c["temperature"] is None else f"{c['temperature']:.3f}", f"{c.get('ece_scaled', float('nan')):.4f}",
             c["confident_failures"], c.get("confident_failures_scaled", "-")] for name, c in summary.items()]
    return {"headers": ["run", "ECE", "temperature", "ECE after scaling", "confident failures", "after scaling"], "rows": rows,
            "figure": figure(path, "reliability diagrams")}


def robustness_view(extra: dict) -> dict | None:
    """The corruption section: per run the 15-corruption mean, its per-severity profile, the extras apart and the
    mCE; the published anchor as the table's last row and in a sentence; where the corrupted images came from."""
    result = extra.get("robustness")
    if not result:
        return None
    rows = [[name, fmt(r["clean"]), fmt(r["mean_corruption_acc"]), *map(fmt, r["per_severity"]), fmt(r["extras_mean_acc"]), f"{r['mce'] * 100:.1f}"]
            for name, r in result["runs"].items()]
    a = result["anchor"]
    rows.append([f"{a['name']} (published)", fmt(a["clean"]), fmt(a["mean_corruption_acc"]), *map(fmt, a["per_severity"]), "-", "-"])
    sources = {r["source"]["kind"] for r in result["runs"].values()}
    return {"images": result["images"], "measured_in_trials": result.get("measured_in_trials", 0), "baseline_runs": ", ".join(result["baseline_runs"]),
            "runs": len(result["runs"]), "source": " / ".join(sorted(sources)), "anchor": anchor_sentence(a),
            "table": {"headers": ["run", "clean acc %", "15-corruption mean %", *[f"severity {s} %" for s in range(1, 6)], "4 extras mean %", "mCE (15)"],
                      "rows": rows},
            "figure": figure(result.get("figure"), "accuracy per corruption and run")}


def anchor_sentence(a: dict) -> str:
    """The sweep's best run beside the published anchor, and what differs between the two figures."""
    said = (f"The sweep's most robust run, {a['best_run']}, keeps {a['best_mean_corruption_acc'] * 100:.1f}% accuracy over the 15 CIFAR-10-C "
            f"corruptions x 5 severities ({a['best_clean'] * 100:.1f}% clean); the published anchor, {a['name']}, keeps "
            f"{a['mean_corruption_acc'] * 100:.2f}% ({a['clean'] * 100:.2f}% clean) on {a['source']}. What differs: {'; '.join(a['differs'])}.")
    return said if a["comparable_data"] else said + " The anchor is a CIFAR-10 figure; this sweep's data is another, so the two do not compare."


def adversarial_view(extra: dict) -> dict | None:
    result = extra.get("adversarial")
    if not result:
        return None
    eps = [f"{e * 255:g}/255" for e in result["epsilons"]]
    headers = ["run", *(f"{attack.upper()} {e}" for attack in result["attacks"] for e in eps[1:]), "clean %"]
    rows = [[name, *(fmt(r["accuracy"][attack][k]) for attack in result["attacks"] for k in range(1, len(eps))), fmt(r["clean"])]
            for name, r in sorted(result["runs"].items(), key=lambda kv: -kv[1]["accuracy"]["pgd"][-1])]
    return {"steps": result["steps"], "step_size": f"{result['step_size']:g}", "images": result["images"],
            "measured_in_trials": result.get("measured_in_trials", 0), "table": {"headers": headers, "rows": rows},
            "figure": figure(result.get("figure"), "accuracy against epsilon per run (PGD solid, FGSM dashed)")}


def label_issues_view(extra: dict, shown: int = 20) -> dict | None:
    result = extra.get("label_issues")
    if not result:
        return None
    rows = [[c["test_index"], c["given_class"], c["suggested_class"], f"{c['quality']:.3f}", f"{c['mean_prob_given']:.3f}",
             f"{c['runs_failing_confidently']}/{result['runs']}", "yes" if c["flagged"] else "no"] for c in result["candidates"][:shown]]
    return {"count": result["count"], "test_images": result["test_images"], "method": result["method"], "warning": weak_ensemble_warning(result),
            "headers": ["test index", "given label", "suggested", "quality", "mean p(given)", "runs failing confidently", "flagged"], "rows": rows,
            "figure": figure(result.get("figure"), "flagged as likely label errors: #index given and suggested label (quality score)")}


def label_issues_section(extra: dict) -> str:
    """The label-error section alone, as HTML."""
    return str(TEMPLATES.get_template("sections.html.j2").module.label_issues(label_issues_view(extra)))


def persistent_view(extra: dict) -> dict | None:
    result = extra.get("persistent")
    if not result:
        return None
    groups, flagged = result["groups"], result.get("likely_label_errors", {})
    fixes = [(key, {"headers": [key, "persistent %", "seed/setting-dependent %"],
                    "rows": [[value, fmt(v["persistent"]), fmt(v["dependent"])] for value, v in values.items()]})
             for key, values in result["fixes"].items()]
    return {"runs": result["runs"], "persistent": len(groups["persistent"]), "dependent": len(groups["dependent"]),
            "flagged_persistent": flagged.get("persistent", []), "flagged_dependent": len(flagged.get("dependent", [])), "fixes": fixes,
            "figure": figure(result.get("figure"), "failures (nearly) every run makes: #index truth->usual prediction (runs failing)")}


def conclusions(analyses, comparisons, extra: dict | None = None) -> list[str]:
    """Sentences computed from the numbers above, nothing else."""
    out = []
    best = max(analyses, key=selection_key)
    out.append(f"Best run by validation accuracy: {best.run.name}, {fmt(best.run.tested(metrics.VAL_ACC))}% on validation, "
               f"{fmt(best.run.metrics.get(metrics.TEST_ACC))}% test accuracy and {len(best.failures)} high-confidence failures.")
    pairs = Counter((f["true_class"], f["predicted_class"]) for a in analyses for f in a.failures)
    total = sum(pairs.values())
    if total:
        (t, p), n = pairs.most_common(1)[0]
        out.append(f"Most frequent confident confusion across runs: {t} -> {p}, {n} of {total} failures ({n / total:.0%}).")
        shares = [f["cam_border_share"] for a in analyses for f in a.failures if "cam_border_share" in f]
        if shares:
            out.append(f"Grad-CAM of the explained failures puts on average {np.mean(shares):.0%} of its mass outside the central 16x16 square "
                       f"(a uniform map: 75%); {np.mean(np.array(shares) > 0.75):.0%} of them lean on the border more than uniform.")
    if extra:
        cal = extra["calibration"][0]
        eces = [c["ece"] for c in cal.values()]
        out.append(f"Mean ECE across runs: {np.mean(eces):.3f} (range {min(eces):.3f} to {max(eces):.3f}).")
        if extra.get("label_issues"):
            li = extra["label_issues"]
            total, kept = sum(len(a.failures) for a in analyses), sum(len(a.failures_excluding_label_errors) for a in analyses)
            out.append(f"Likely label errors (cleanlab on the mean probabilities of {li['runs']} runs): {li['count']} of {li['test_images']} test images; "
                       f"of the {total} confident failures over all runs, {kept} remain after excluding them."
                       + (f" Not to be trusted: the runs' mean prediction is right on only {li['ensemble_accuracy']:.1%} of the test images, "
                          f"and weak models make confident learning flag widely." if li.get("weak_ensemble") else ""))
        if extra.get("persistent"):
            g = extra["persistent"]["groups"]
            flagged = len(extra["persistent"].get("likely_label_errors", {}).get("persistent", []))
            out.append(f"{len(g['persistent'])} test images are confidently misclassified by (nearly) every run ({flagged} of them likely label errors); "
                       f"{len(g['dependent'])} failures depend on seed or setting.")
        if extra.get("adversarial"):
            runs = extra["adversarial"]["runs"]
            best = max(runs, key=lambda n: runs[n]["accuracy"]["pgd"][-1])
            eps = extra["adversarial"]["epsilons"][-1] * 255
            out.append(f"Most robust to PGD at {eps:g}/255: {best}, {runs[best]['accuracy']['pgd'][-1] * 100:.1f}% (clean {runs[best]['clean'] * 100:.1f}%); "
                       f"mean over runs {np.mean([r['accuracy']['pgd'][-1] for r in runs.values()]) * 100:.1f}%.")
        if extra.get("robustness"):
            runs = extra["robustness"]["runs"]
            best = min(runs, key=lambda n: runs[n]["mce"])
            out.append(f"Most robust to corruptions: {best} (mCE {runs[best]['mce'] * 100:.1f}, mean accuracy over the 15 corruptions "
                       f"{runs[best]['mean_corruption_acc'] * 100:.1f}% vs {runs[best]['clean'] * 100:.1f}% clean; published anchor "
                       f"{extra['robustness']['anchor']['mean_corruption_acc'] * 100:.2f}%).")
    return out


def comparison_conclusions(comparisons) -> list[tuple[str, list[str]]]:
    """Per comparison: its headline sentence (the pooled stratum, or the only one) and the per-architecture ones."""
    out = []
    for c in comparisons:
        sentences = [change_sentence(c, st) for st in c.strata]
        out.append((sentences[-1], sentences[:-1]))
    return out


def churn_text(churn: dict | None, key: str) -> str:
    return "-" if churn is None else f"{churn[key][0]:.1f} ± {churn[key][1]:.1f} ({churn['pairs']} seed pairs)"


def churn_verdict(s: dict) -> str:
    return {None: "no reference: one seed", True: "yes", False: "no, within"}[s["beyond_churn"]]


def change_sentence(c, s: dict) -> str:
    """One conclusion per architecture (and pooled): accuracy interval, fixed/introduced beside the seed churn."""
    low, high = s["delta_ci95"]
    text = (f"{c.variant} vs {c.baseline} ({s['stratum']}): accuracy change {s['delta'][0] * 100:+.2f} ± {s['delta'][1] * 100:.2f} points over "
            f"{s['pairs']} pairs (95% interval [{low * 100:+.2f}, {high * 100:+.2f}]): {s['verdict']}. Per pair it fixed {s['fixed'][0]:.1f} "
            f"confident failures and introduced {s['new'][0]:.1f}")
    churn = s["churn"]
    if churn is None:
        return text + ("; the seed-churn reference is missing (one seed per configuration), so it cannot be told apart from what a new "
                       "seed alone moves: add seeds to the grid, e.g. seed: [42, 43, 44].")
    where = "beyond" if s["beyond_churn"] else "within"
    return text + (f"; seed-to-seed churn of the baseline: fixed {churn['fixed'][0]:.1f} ± {churn['fixed'][1]:.1f}, introduced "
                   f"{churn['new'][0]:.1f} ± {churn['new'][1]:.1f}. The change moves failures {where} that churn.")


SECTIONS = (("conclusions", "Conclusions"), ("comparisons", "Comparisons"), ("results", "Every run"), ("robustness", "Corruptions"),
            ("adversarial", "Adversarial"), ("calibration", "Calibration"), ("label-issues", "Label errors"), ("persistent", "Persistent failures"), ("failures", "Per run: failures and Grad-CAM"), ("setup", "Setup"))


def write_report(out: Path, experiment: str, uri: str, threshold: float, analyses, comparisons, figures: dict, extra: dict) -> Path:
    """``out/report.html`` (conclusions first, figures linked beside it; rendered from templates/, every value escaped)
    plus ``out/summary.json``."""
    general, per_comparison = conclusions(analyses, comparisons, extra), comparison_conclusions(comparisons)
    lines = general + [line for headline, strata in per_comparison for line in (*strata, headline)]
    token = ROOT.set(out)
    try:
        page = TEMPLATES.get_template("report.html.j2").render(
            experiment=experiment, style=markupsafe.Markup(STYLE), nav=SECTIONS, runs=len(analyses), general=general, per_comparison=per_comparison,
            comparisons=[comparison_view(c) for c in comparisons], results=results_view(analyses, figures), robustness=robustness_view(extra),
            adversarial=adversarial_view(extra), calibration=calibration_view(extra), label_issues=label_issues_view(extra),
            persistent=persistent_view(extra), failures=failures_view(analyses),
            gallery=figure(figures.get("gallery"), "class gallery: Grad-CAM of the predicted class for the first test images of chosen classes"),
            setup=setup_view(experiment, uri, threshold, analyses))
    finally:
        ROOT.reset(token)
    path = out / "report.html"
    path.write_text(page)
    summary = {"experiment": experiment, "threshold": threshold, "conclusions": lines,
               "runs": [{"run_id": a.run.run_id, "name": a.run.name, "failures": len(a.failures),
                         "failures_excluding_likely_label_errors": len(a.failures_excluding_label_errors), "test_acc": a.run.metrics.get(metrics.TEST_ACC)}
                        for a in analyses]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return path


