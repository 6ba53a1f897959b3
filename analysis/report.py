"""The HTML report, and the analysis run that keeps it in MLflow.

Built for 36+ runs: conclusions and comparisons first, one overview table whose rows link to per-run
sections collapsed in ``<details>``, a table of contents, and figures as PNG files beside the HTML
(relative, lazy-loaded links), so the page opens fast and the folder is one MLflow artifact.
"""
from __future__ import annotations

import contextvars
import html
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import metrics
import tracking
from analysis.label_issues import weak_ensemble_warning

if TYPE_CHECKING:
    import pandas as pd

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}.note{color:#555;font-size:.9em}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.4em .8em}
details{margin:.3em 0;border:1px solid #ddd;border-radius:4px;padding:.2em .6em}summary{cursor:pointer;font-weight:600}
.conclusions details{border:none;padding:0;font-size:.92em}.conclusions summary{font-weight:normal;color:#555}
nav{font-size:.9em}nav a{margin-right:1em}.conclusions li{margin:.3em 0}"""
ROOT: contextvars.ContextVar[Path] = contextvars.ContextVar("report_root")  # figure links are relative to the report's folder


def esc(value) -> str:
    return html.escape(str(value))


def img(path: Path | None, alt: str) -> str:
    """A lazy-loaded <img> of a figure file beside the report (a relative link: the folder moves as a whole)."""
    if not path or not Path(path).exists():
        return ""
    src = Path(os.path.relpath(Path(path).resolve(), ROOT.get().resolve())).as_posix()
    return f'<figure><img alt="{esc(alt)}" loading="lazy" src="{esc(src)}"><figcaption class="note">{esc(alt)}</figcaption></figure>'


class Link(str):
    """A table cell that links to ``href`` (a run's collapsed section)."""

    def __new__(cls, text: str, href: str):
        obj = super().__new__(cls, text)
        obj.href = href
        return obj


def cell(value) -> str:
    return f"<a href='{esc(value.href)}'>{esc(value)}</a>" if isinstance(value, Link) else esc(value)


def table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pm(pair: tuple[float, float], signed: bool = False, scale: float = 100) -> str:
    """'mean ± std' in percent."""
    return f"{pair[0] * scale:{'+' if signed else ''}.2f} ± {pair[1] * scale:.2f}"


def fmt(value: float, scale: float = 100) -> str:
    return "-" if value is None or value != value else f"{value * scale:.2f}"


def setup_section(experiment: str, uri: str, threshold: float, analyses) -> str:
    cfg = analyses[0].run.config
    keys = ("epochs", "batch_size", "optimizer", "schedule", "data")
    rows = [[k, json.dumps(cfg.get(k), default=str)] for k in keys]
    varying = sorted({k for a in analyses for k, v in a.run.params.items() if any(b.run.params.get(k) != v for b in analyses)} - {"data.root"})
    return (f"<h2>Setup</h2><p>Experiment <b>{esc(experiment)}</b>, {len(analyses)} finished runs from <code>{esc(uri)}</code>. "
            f"A failure is a misclassified test image with confidence &gt; {threshold}. Settings that vary across runs: "
            f"{esc(', '.join(varying) or 'none')}. Shared settings of the first run:</p>" + table(["setting", "value"], rows))


def selection_key(a) -> tuple:
    """Runs ranked on the validation split (never on test); test accuracy only breaks ties or stands in without validation."""
    m = a.run.metrics
    return (m.get(metrics.VAL_ACC, float("-inf")), m.get(metrics.TEST_ACC, 0))


def results_section(analyses, figures: dict) -> str:
    rows = []
    for a in sorted(analyses, key=selection_key, reverse=True):
        m = a.run.metrics
        road = [f"{a.road[k]:+.3f}" if k in a.road else "-" for k in ("Grad-CAM", "random map", "centred blob")]
        rows.append([Link(a.run.name, "#" + anchor(a.run.name)), fmt(m.get(metrics.TEST_ACC)), fmt(m.get(metrics.TEST_F1)), fmt(m.get(metrics.VAL_ACC)), m.get(metrics.TEST_EPOCH, "-"),
                     len(a.failures), len(a.failures_excluding_label_errors), f"{a.layer} ({a.resolution[0]}x{a.resolution[1]})", *road, a.run.run_id[:8]])
    images = next((a.road.get("images") for a in analyses if a.road), 0)
    return ("<h2 id='results'>Results: every run</h2>" + table(["run", "test acc %", "macro F1 %", "val acc %", "tested epoch", "failures", "excl. likely label errors", "Grad-CAM layer",
                                       "ROAD Grad-CAM", "ROAD random map", "ROAD centred blob", "run id"], rows)
            + f"<p class='note'>ROAD (pytorch-grad-cam's ROADCombined, percentiles 20-80, seeded imputation) on the same {images} seeded test "
              "images per run, for the predicted class: (drop when the most relevant pixels are removed - drop when the least relevant are) / 2. "
              "Positive means the map points at what the model uses. A random map and a centred blob know nothing of the model: Grad-CAM "
              "is to be trusted only as far as its score exceeds theirs. Tested epoch: the epoch whose weights were tested (the best "
              "validation epoch under early stopping).</p>"
            + img(figures.get("metrics"), "test metrics per run") + img(figures.get("curves"), "training (solid) and validation (dashed) curves")
            + img(figures.get("per_class"), "per-class test accuracy") + img(figures.get("worst"), "worst classes"))


def anchor(name: str) -> str:
    return "run-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def failures_section(analyses, figures: dict) -> str:
    parts = ["<h2 id='failures'>High-confidence failures and Grad-CAM, per run</h2><p class='note'>One collapsed section per run; "
             "open it from here or from its name in the table above.</p>"]
    for a in analyses:
        cats = [[c.name, c.evidence, ", ".join(map(str, c.test_indices[:12])) + (" ..." if len(c.test_indices) > 12 else "")] for c in a.categories]
        parts.append(f"<details id='{anchor(a.run.name)}'><summary>{esc(a.run.name)}: {len(a.failures)} failures, "
                     f"{len(a.failures_excluding_label_errors)} excluding likely label errors</summary>")
        parts.append(table(["category", "evidence", "test indices"], cats) if cats else "<p class='note'>No failure above the threshold.</p>")
        parts.append(img(a.figures.get("failures"), "most confident failures: #index truth->prediction confidence"))
        parts.append(img(a.figures.get("gradcam"), f"Grad-CAM on {a.layer} ({a.resolution[0]}x{a.resolution[1]}) for the predicted and the true class"))
        parts.append(img(a.figures.get("adversarial"), "images that flip at the smallest epsilon under PGD: Grad-CAM of the clean and of the "
                                                          "adversarial prediction (#index truth->adversarial prediction at epsilon)"))
        parts.append(img(a.figures.get("confusion"), f"normalised confusion matrix, {a.run.name}") + "</details>")
    parts.append(img(figures.get("gallery"), "class gallery: Grad-CAM of the predicted class for the first test images of chosen classes"))
    return "".join(parts)


def comparison_section(comparisons) -> str:
    parts = []
    for c in comparisons:
        rows = [[r["class"], pm(r["baseline"]), pm(r["variant"]), pm(r["delta"], signed=True), f"[{r['delta_ci95'][0] * 100:+.2f}, {r['delta_ci95'][1] * 100:+.2f}]"]
                for r in c.per_class]
        pairs = [[p["baseline"], p["variant"], fmt(p["baseline_acc"]), fmt(p["variant_acc"]), len(p["fixed"]), len(p["still"]), len(p["new"]),
                  f"{p['mcnemar']['b']}/{p['mcnemar']['c']}", p["mcnemar"]["test"], f"{p['mcnemar']['p_value']:.3g}", f"{p['mcnemar'].get('p_holm', 1):.3g}"]
                 for p in c.pairs]
        strata = [[s["stratum"], s["pairs"], pm(s["delta"], signed=True), f"[{s['delta_ci95'][0] * 100:+.2f}, {s['delta_ci95'][1] * 100:+.2f}]",
                   pm(s["fixed"], scale=1), pm(s["new"], scale=1), churn_text(s["churn"], "fixed"), churn_text(s["churn"], "new"), churn_verdict(s)] for s in c.strata]
        parts.append(f"<h2>Comparison: {esc(c.baseline)} vs {esc(c.variant)}</h2><p>{len(c.pairs)} matched pairs (identical settings but {esc(c.baseline.split('=')[0])}).</p>"
                     + table(["baseline", "variant", "base acc %", "variant acc %", "fixed", "still failing", "new", "McNemar b/c", "test", "p", "p (Holm)"], pairs)
                     + "<p class='note'>McNemar's test per pair; p (Holm): adjusted for the family of pairs (Holm-Bonferroni).</p>"
                     + table(["architecture", "pairs", "accuracy change (points)", "95% interval", "fixed per pair", "new per pair",
                              "seed churn: fixed", "seed churn: new", "beyond seed churn?"], strata)
                     + "<p class='note'>Per architecture, then pooled (marked). Seed churn: the same counts between two seeds of the baseline "
                       "configuration (every ordered pair of seeds), the failures that move with no change at all. A change moves failures "
                       "beyond that churn when its mean fixed or new count lies outside the churn's mean ± 2 std.</p>"
                     + "<p class='note'>Per class, pooled over every pair: accuracy in %, mean ± std over pairs, with the 95% t-interval of the change.</p>"
                     + table(["class", "baseline", "variant", "change", "95% interval"], rows)
                     + img(c.figures.get("per_class_delta"), "per-class accuracy change")
                     + img(c.figures.get("before_after"), "Grad-CAM before and after on failures the change fixed and introduced"))
    return "".join(parts)


def calibration_section(extra: dict) -> str:
    summary, figure = extra["calibration"]
    rows = [[name, f"{c['ece']:.4f}", "-" if c["temperature"] is None else f"{c['temperature']:.3f}", f"{c.get('ece_scaled', float('nan')):.4f}",
             c["confident_failures"], c.get("confident_failures_scaled", "-")] for name, c in summary.items()]
    return ("<h2>Calibration</h2><p>Expected calibration error over 15 confidence bins. Temperature scaling is fitted on each run's "
            "validation split and only reported here: every other number in this report uses the raw probabilities. The same validation "
            "split also chose the model (the epoch under early stopping, the best run by the experiment's metric), so the temperature is "
            "fitted on data that is not independent of the selection; the test split touches neither.</p>"
            + table(["run", "ECE", "temperature", "ECE after scaling", "confident failures", "after scaling"], rows) + img(figure, "reliability diagrams"))


def robustness_section(extra: dict) -> str:
    result = extra.get("robustness")
    if not result:
        return ""
    rows = [[name, fmt(r["clean"]), fmt(r["mean_corruption_acc"]), f"{r['mce'] * 100:.1f}"] for name, r in result["runs"].items()]
    return (f"<h2>Corruption robustness</h2><p>{result['images']} class-balanced test images under {len(next(iter(result['runs'].values()))['accuracy'])} corruptions at severities 1-5 "
            f"(the formulas and CIFAR parameters of make_cifar_c.py, generated with fixed seeds; see corruptions.py); "
            f"{result.get('measured_in_trials', 0)} of {len(result['runs'])} runs measured at the end of their trial (robustness: true), "
            f"the others by this analysis. mCE is relative to "
            f"{esc(', '.join(result['baseline_runs']))} (100 = as robust as the baseline).</p>"
            + table(["run", "clean acc %", "mean corruption acc %", "mCE"], rows) + img(result.get("figure"), "accuracy per corruption and run"))


def adversarial_section(extra: dict) -> str:
    result = extra.get("adversarial")
    if not result:
        return ""
    eps = [f"{e * 255:g}/255" for e in result["epsilons"]]
    headers = ["run", *(f"{attack.upper()} {e}" for attack in result["attacks"] for e in eps[1:]), "clean %"]
    rows = [[name, *(fmt(r["accuracy"][attack][k]) for attack in result["attacks"] for k in range(1, len(eps))), fmt(r["clean"])]
            for name, r in sorted(result["runs"].items(), key=lambda kv: -kv[1]["accuracy"]["pgd"][-1])]
    return (f"<h2>Adversarial robustness</h2><p>Accuracy (%) of every run under L-inf FGSM and PGD ({result['steps']} steps of "
            f"{result['step_size']:g} epsilon, from the FGSM point) on {result['images']} class-balanced test images, in pixel space with "
            f"the model's normalisation inside the attacked function. Each figure is the worst case up to that epsilon (an image broken "
            f"at a smaller epsilon counts as broken), so it cannot rise with epsilon, and PGD breaks every image FGSM breaks. Per run, "
            f"the images that flip at the smallest epsilon with Grad-CAM before and after are in its section below; all numbers in "
            f"adversarial.json. {result.get('measured_in_trials', 0)} of {len(result['runs'])} runs were attacked by their trial "
            f"(<code>adversarial: true</code>, on the trial's device), the others by this analysis.</p>" + table(headers, rows) + img(result.get("figure"), "accuracy against epsilon per run (PGD solid, FGSM dashed)"))


def label_issues_section(extra: dict, shown: int = 20) -> str:
    result = extra.get("label_issues")
    if not result:
        return ""
    rows = [[c["test_index"], c["given_class"], c["suggested_class"], f"{c['quality']:.3f}", f"{c['mean_prob_given']:.3f}",
             f"{c['runs_failing_confidently']}/{result['runs']}", "yes" if c["flagged"] else "no"] for c in result["candidates"][:shown]]
    return (f"<h2>Likely label errors</h2><p>{result['count']} of {result['test_images']} test images are flagged as likely mislabelled by "
            f"confident learning (Northcutt et al. 2021): {esc(result['method'])}. The runs never trained on the test set, so their "
            f"probabilities are out-of-sample. A confident failure on such an image says more about the label than about the model: "
            f"failure counts are given both ways (all, and excluding these). All candidates: label_issues.json.</p>"
            + (f"<p class='warn'>{esc(warning)}</p>" if (warning := weak_ensemble_warning(result)) else "")
            + f"<p class='note'>The {len(rows)} lowest label-quality scores:</p>"
            + (table(["test index", "given label", "suggested", "quality", "mean p(given)", "runs failing confidently", "flagged"], rows) if rows else "")
            + img(result.get("figure"), "flagged as likely label errors: #index given and suggested label (quality score)"))


def persistent_section(extra: dict) -> str:
    result = extra.get("persistent")
    if not result:
        return ""
    groups = result["groups"]
    flagged = result.get("likely_label_errors", {})
    parts = [f"<h2>Persistent failures</h2><p>Of the test images any of the {result['runs']} runs gets confidently wrong, "
             f"{len(groups['persistent'])} are confidently wrong in (nearly) every run (all but at most one) and {len(groups['dependent'])} "
             f"depend on seed or setting. Flagged as likely label errors (see above): {len(flagged.get('persistent', []))} of the "
             f"persistent and {len(flagged.get('dependent', []))} of the dependent ones"
             + (f" (test indices {', '.join(map(str, flagged['persistent'][:20]))})" if flagged.get("persistent") else "") + ".</p>"]
    for key, values in result["fixes"].items():
        rows = [[value, fmt(v["persistent"]), fmt(v["dependent"])] for value, v in values.items()]
        parts.append(f"<p>Share of each group classified correctly, by {esc(key)}:</p>" + table([key, "persistent %", "seed/setting-dependent %"], rows))
    parts.append(img(result.get("figure"), "failures (nearly) every run makes: #index truth->usual prediction (runs failing)"))
    return "".join(parts)


def conclusions(analyses, comparisons, extra: dict | None = None) -> list[str]:
    """Sentences computed from the numbers above, nothing else."""
    out = []
    best = max(analyses, key=selection_key)
    out.append(f"Best run by validation accuracy: {best.run.name}, {fmt(best.run.metrics.get(metrics.VAL_ACC))}% on validation, "
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
            out.append(f"Most robust to corruptions: {best} (mCE {runs[best]['mce'] * 100:.1f}, mean corruption accuracy {runs[best]['mean_corruption_acc'] * 100:.1f}% "
                       f"vs {runs[best]['clean'] * 100:.1f}% clean).")
    return out


def comparison_conclusions(comparisons) -> list[tuple[str, list[str]]]:
    """Per comparison: its headline sentence (the pooled stratum, or the only one) and the per-architecture ones."""
    out = []
    for c in comparisons:
        sentences = [change_sentence(c, st) for st in c.strata]
        out.append((sentences[-1], sentences[:-1]))
    return out


def conclusion_items(general: list[str], per_comparison: list[tuple[str, list[str]]]) -> str:
    """The conclusions list: the per-architecture sentences of a comparison collapsed under its pooled one, so the list
    stays on the first screen at 36+ runs."""
    items = [f"<li>{esc(line)}</li>" for line in general]
    for headline, strata in per_comparison:
        more = (f"<details><summary>per architecture ({len(strata)})</summary><ul>" + "".join(f"<li>{esc(s)}</li>" for s in strata)
                + "</ul></details>") if strata else ""
        items.append(f"<li>{esc(headline)}{more}</li>")
    return "<ul class='conclusions'>" + "".join(items) + "</ul>"


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
    """``out/report.html`` (conclusions first, figures linked beside it) plus ``out/summary.json``."""
    general, per_comparison = conclusions(analyses, comparisons, extra), comparison_conclusions(comparisons)
    lines = general + [line for headline, strata in per_comparison for line in (*strata, headline)]
    token = ROOT.set(out)
    try:
        nav = "<nav>" + "".join(f"<a href='#{key}'>{title}</a>" for key, title in SECTIONS) + "</nav>"
        body = (f"<h1>Stress test: {esc(experiment)}</h1>" + nav
                + f"<h2 id='conclusions'>Conclusions</h2><p class='note'>{len(analyses)} runs; computed from the numbers below.</p>"
                + conclusion_items(general, per_comparison)
                + "<div id='comparisons'>" + comparison_section(comparisons) + "</div>"
                + results_section(analyses, figures) + "<div id='robustness'>" + robustness_section(extra) + "</div>"
                + "<div id='adversarial'>" + adversarial_section(extra) + "</div>"
                + "<div id='calibration'>" + calibration_section(extra) + "</div><div id='label-issues'>" + label_issues_section(extra) + "</div>"
                + "<div id='persistent'>" + persistent_section(extra) + "</div>"
                + failures_section(analyses, figures) + "<div id='setup'>" + setup_section(experiment, uri, threshold, analyses) + "</div>")
    finally:
        ROOT.reset(token)
    path = out / "report.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>stresslab: {esc(experiment)}</title><style>{STYLE}</style></head><body>{body}</body></html>")
    summary = {"experiment": experiment, "threshold": threshold, "conclusions": lines,
               "runs": [{"run_id": a.run.run_id, "name": a.run.name, "failures": len(a.failures),
                         "failures_excluding_likely_label_errors": len(a.failures_excluding_label_errors), "test_acc": a.run.metrics.get(metrics.TEST_ACC)}
                        for a in analyses]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return path


def log_analysis_run(uri: str, experiment: str, out: Path, threshold: float) -> str:
    """Log the output folder as artifacts of an MLflow run of kind ``analysis`` in the same experiment (FAILED if the upload fails)."""
    mlflow_client = tracking.client(uri)
    exp_id = tracking.ensure_experiment(mlflow_client, experiment, "", uri)
    run = tracking.retry(lambda: mlflow_client.create_run(exp_id, run_name=f"analysis-{out.name}", tags={tracking.KIND_TAG: "analysis", **tracking.environment_tags("analysis")}))
    status = "FAILED"
    try:
        mlflow_client.log_param(run.info.run_id, "threshold", threshold)
        for item in sorted(out.iterdir()):
            if item.name.startswith("."):
                continue
            if item.is_dir():
                tracking.retry(lambda: mlflow_client.log_artifacts(run.info.run_id, str(item), item.name))
            else:
                tracking.retry(lambda: mlflow_client.log_artifact(run.info.run_id, str(item)))
        import mlflow

        mlflow.set_tracking_uri(uri)  # log_table resolves the global URI
        for name, table in analysis_tables(out).items():  # shown in the run's artifact view; mlflow.load_table reads them across runs
            tracking.retry(lambda: mlflow.log_table(table, f"{TABLES_DIR}/{name}.json", run_id=run.info.run_id))
        status = "FINISHED"
    finally:
        tracking.retry(lambda: mlflow_client.set_terminated(run.info.run_id, status=status))
    return run.info.run_id


TABLES_DIR = "tables"


def analysis_tables(out: Path) -> dict[str, "pd.DataFrame"]:
    """The analysis's main tables, flat, from the JSON files it wrote: ``runs`` (one row per run), ``failures`` (one
    per confident failure, every run), ``comparison_pairs`` (one per baseline/variant pair) and ``comparison_strata``
    (one per architecture stratum and pooled, with the seed churn beside it)."""
    import pandas as pd

    summary = json.loads((out / "summary.json").read_text())
    failures = []
    for path in sorted((out / "runs").glob("*/failures.json")):
        found = json.loads(path.read_text())
        failures += [{"run_name": found["run_name"], "run_id": found["run_id"], **{k: v for k, v in f.items() if k != "position"}}
                     for f in found["failures"]]
    pairs, strata = [], []
    for path in sorted((out / "compare").glob("*/comparison.json")):
        result, comparison = json.loads(path.read_text()), path.parent.name
        pairs += [{"comparison": comparison, **{k: v for k, v in p.items() if k not in ("fixed", "still", "new", "mcnemar")},
                   "fixed": len(p["fixed"]), "still_failing": len(p["still"]), "new": len(p["new"]),
                   **{f"mcnemar_{k}": v for k, v in p["mcnemar"].items()}} for p in result["pairs"]]
        strata += [{"comparison": comparison, "stratum": r["stratum"], "pairs": r["pairs"], "delta_mean": r["delta"][0], "delta_std": r["delta"][1],
                    "delta_ci95_low": r["delta_ci95"][0], "delta_ci95_high": r["delta_ci95"][1], "fixed_mean": r["fixed"][0],
                    "new_mean": r["new"][0], "churn": json.dumps(r["churn"]), "beyond_churn": r["beyond_churn"], "verdict": r["verdict"]}
                   for r in result["strata"]]
    return {name: pd.DataFrame(rows) for name, rows in
            (("runs", summary["runs"]), ("failures", failures), ("comparison_pairs", pairs), ("comparison_strata", strata)) if rows}
