"""Acceptance: a 3-seed x 2-augmentation sweep on two architectures; the report states each change beside seed churn."""
import html
import json
import re

import pytest

import sweep
from analysis.pipeline import run_analysis
from tests.conftest import write_experiments


@pytest.fixture(scope="module")
def churn_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("churn")
    grid = {"arch": ["plain_cnn", "residual_cnn"], "augment": ["none", "cutout"], "seed": [1, 2, 3]}
    path = write_experiments(tmp / "e.yaml", {"churn": {"epochs": 1, "robustness": True, "robustness_images": 40, "adversarial": True,
                                                               "adversarial_images": 20, "adversarial_steps": 3, "grid": grid}})
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    assert sweep.main(["--config", str(path), "--experiment", "churn", "--tracking-uri", uri, "--storage", str(tmp / "ray")]) == 0
    out = tmp / "report"
    report = run_analysis("churn", uri, out, threshold=0.5, max_cams=4, log_to_mlflow=False, corruption_images=40, road_images=4)
    return json.loads((out / "compare" / "none_vs_cutout" / "comparison.json").read_text()), html.unescape(report.read_text()), uri, out


def test_comparison_json_has_per_architecture_intervals_and_seed_churn(churn_report):
    data, *_ = churn_report
    strata = {s["stratum"]: s for s in data["strata"]}
    assert set(strata) == {"plain_cnn", "residual_cnn", "pooled over architectures"}
    for arch in ("plain_cnn", "residual_cnn"):
        s = strata[arch]
        pairs = [p for p in data["pairs"] if p["arch"] == arch]
        assert s["pairs"] == len(pairs) == 3
        deltas = [p["variant_acc"] - p["baseline_acc"] for p in pairs]
        assert s["delta"][0] == pytest.approx(sum(deltas) / 3)
        assert s["delta_ci95"][0] < s["delta"][0] < s["delta_ci95"][1] or s["delta"][1] == 0
        assert s["churn"]["pairs"] == 6  # ordered pairs of 3 baseline seeds
        assert s["fixed"][0] == pytest.approx(sum(len(p["fixed"]) for p in pairs) / 3)
    assert strata["pooled over architectures"]["pairs"] == 6 and strata["pooled over architectures"]["churn"]["pairs"] == 12
    holm = [p["mcnemar"]["p_holm"] for p in data["pairs"]]
    assert all(h >= p["mcnemar"]["p_value"] for h, p in zip(holm, data["pairs"]))


def test_report_conclusions_state_the_change_beside_the_churn(churn_report):
    data, text, *_ = churn_report
    conclusions = text[text.index("<h2 id='conclusions'>"):text.index("<div id='comparisons'>")]
    sentences = re.findall(r"augment=cutout vs augment=none \(([^)]+)\): accuracy change ([-+]\d+\.\d+) ± [^<]*?"
                           r"introduced ([\d.]+) ± ([\d.]+)\. The change moves failures (beyond|within) that churn\.", conclusions)
    assert len(sentences) == len(data["strata"]) == 3  # the rule itself: tests/test_verdict.py, on numbers known by hand
    for (stratum, delta, new_mean, new_std, where), s in zip(sorted(sentences), sorted(data["strata"], key=lambda s: s["stratum"])):
        assert stratum == s["stratum"] and float(delta) == pytest.approx(s["delta"][0] * 100, abs=0.006)
        assert (float(new_mean), float(new_std)) == pytest.approx(s["churn"]["new"], abs=0.06)
        assert where == ("beyond" if s["beyond_churn"] else "within")
    assert "McNemar p < 0.05 in" not in text and "p (Holm)" in text


def test_the_trials_corruption_test_is_reused_and_equals_the_analysis_own(churn_report, tmp_path):
    """Every run's trial ran the test on 40 images, so the report reads it; computed again here for one run per
    architecture, it gives the same accuracy per corruption and severity, and the logged metrics are their means."""
    import mlflow
    import numpy as np

    from analysis.robustness import robustness_step
    from analysis.runs import ImageCache
    from analysis.runs import find_runs

    *_, uri, out = churn_report
    report = json.loads((out / "robustness.json").read_text())
    assert report["images"] == 40 and report["measured_in_trials"] == 12
    runs = find_runs("churn", uri)
    picked = [next(r for r in runs if r.params["arch"] == arch) for arch in ("plain_cnn", "residual_cnn")]
    again = robustness_step(picked, ImageCache(), tmp_path, 40, None, reuse=False)
    client = mlflow.MlflowClient(uri)
    for run in picked:
        computed = again["runs"][run.name]
        assert computed["measured"] == "analysis" and report["runs"][run.name]["measured"] == "trial"
        assert len(computed["accuracy"]) == 19 and all(len(v) == 5 for v in computed["accuracy"].values())
        assert report["runs"][run.name]["accuracy"] == computed["accuracy"], run.name  # fractions of 40 images: exact
        assert report["runs"][run.name]["clean"] == pytest.approx(computed["clean"], abs=1e-12)
        logged = client.get_run(run.run_id).data.metrics
        for name, accuracy in computed["accuracy"].items():
            assert logged[f"robustness/{name}"] == pytest.approx(np.mean(accuracy), abs=1e-12), (run.name, name)
        assert logged["robustness/mean"] == pytest.approx(computed["mean_corruption_acc"], abs=1e-12)  # the 15, not the 19
        assert report["runs"][run.name]["source"]["kind"] == computed["source"]["kind"] == "generated"


def test_a_trials_corruption_figures_its_weights_do_not_give_are_measured_again(churn_report, tmp_path, capsys):
    """An honest run's robustness.json passes every recomputed set (300 draws cover the 95); one whose figures were all
    moved by 0.5 in the store fails the two drawn ones whatever they are, and is measured again (giving the trial's own
    figures back), with a warning naming it, while the other runs are still read from their trials."""
    import numpy as np

    from analysis.robustness import robustness_step, spot_check
    from analysis.runs import ImageCache, find_runs, load_model
    from stress import corruptions
    from stress.corruptions.stored import SetCache
    from tests.conftest import copy_store
    from tracking import metrics

    *_, uri, out = churn_report
    honest = find_runs("churn", uri)[0]
    x, mean, std = ImageCache().get(honest)
    pos = corruptions.first_per_class(honest.predictions.labels, 10, 40)
    predict = corruptions.classifier(load_model(honest), mean, std)
    assert spot_check(honest.trial_robustness, predict, x[pos], honest.predictions.labels[pos], None, SetCache(tmp_path, x[pos], 0),
                      np.random.default_rng(0), n_sets=300) is None
    trials = copy_store(out.parent / "mlruns", tmp_path / "mlruns")
    name = sorted(trials)[0]
    path = trials[name][1] / metrics.ROBUSTNESS_FILE
    edited = json.loads(path.read_text())
    logged = edited["accuracy"]
    edited["accuracy"] = {c: [a + 0.5 if a < 0.5 else a - 0.5 for a in v] for c, v in logged.items()}
    path.write_text(json.dumps(edited))
    runs = find_runs("churn", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    report = robustness_step(runs, ImageCache(), tmp_path, 40, None)
    assert {n: r["measured"] for n, r in report["runs"].items()} == {r.name: "analysis" if r.name == name else "trial" for r in runs}
    assert report["runs"][name]["accuracy"] == logged  # what the trial had logged (fractions of 40 images: exact)
    said = capsys.readouterr().out
    assert f"warning: {name}'s robustness.json is not what its weights give (its trial logged " in said and "measured again here" in said


def test_the_trials_adversarial_test_is_reused_and_equals_the_analysis_own(churn_report):
    """Every trial attacked 20 test images (3 PGD steps): the analysis takes these settings by default and reads the
    trials' results; attacked again here from the logged weights, one run per architecture gives the same accuracies and first flips, and the metrics logged are those."""
    import mlflow

    from stress import adversarial
    from analysis.runs import ImageCache
    from analysis.runs import find_runs, load_model

    *_, uri, out = churn_report
    report = json.loads((out / "adversarial.json").read_text())
    assert report["measured_in_trials"] == 12 and report["images"] == 20 and report["steps"] == 3
    runs = find_runs("churn", uri)
    client, images = mlflow.MlflowClient(uri), ImageCache()
    for run in [next(r for r in runs if r.params["arch"] == arch) for arch in ("plain_cnn", "residual_cnn")]:
        x, mean, std = images.get(run)
        pred = run.predictions
        again = adversarial.stress_test(load_model(run), x, pred.labels, pred.index, len(pred.classes), 20, mean, std, steps=3)
        logged = report["runs"][run.name]
        assert logged["measured_in_trial"] and logged["accuracy"] == again["accuracy"], run.name
        assert {int(k): v for k, v in logged["first_flip_pgd"].items()} == again["first_flip_pgd"]
        metrics = client.get_run(run.run_id).data.metrics
        assert {k: v for k, v in metrics.items() if k.startswith("adversarial/")} == pytest.approx(again["metrics"])
        assert set(again["metrics"]) == {f"adversarial/{a}/eps_{e}_255" for a in ("fgsm", "pgd") for e in (1, 2, 4, 8)}


def test_a_trials_attack_figures_its_weights_do_not_give_are_attacked_again(churn_report, tmp_path, capsys):
    """An honest adversarial.json passes with all 20 of its images attacked again. PGD accuracies raised without their
    first flips fail the count; every PGD flip dropped with the accuracies made to match fails the images attacked
    again; the first is attacked again by the analysis, which gives the trial's own figures back."""
    import numpy as np

    from analysis.attacks import adversarial_run, spot_check
    from analysis.failures import RunSettings
    from analysis.runs import ImageCache, find_runs, load_model
    from model_zoo import gradcam_target

    *_, uri, out = churn_report
    run = next(r for r in find_runs("churn", uri) if len(r.trial_adversarial["first_flip_pgd"]) >= 2)
    (x, mean, std), model, logged, rng = ImageCache().get(run), load_model(run), run.trial_adversarial, np.random.default_rng(0)
    assert spot_check(model, x, mean, std, run.predictions, logged, rng, n_images=20) is None
    raised = {**logged, "accuracy": {**logged["accuracy"], "pgd": [logged["clean"], *(a + 0.1 for a in logged["accuracy"]["pgd"][1:])]}}
    assert spot_check(model, x, mean, std, run.predictions, raised, rng) == "its pgd accuracies are not what its clean accuracy and first flips give"
    hidden = {**logged, "first_flip_pgd": {}, "accuracy": {**logged["accuracy"], "pgd": [logged["clean"]] * 5}}
    problem = spot_check(model, x, mean, std, run.predictions, hidden, rng, n_images=20)
    assert problem.startswith(f"{len(logged['first_flip_pgd'])} first flips of 20 images attacked again differ (test image #")
    settings = RunSettings(0.5, {}, 4, adversarial_images=20, pgd_steps=3, pgd_step_size=logged["step_size"])
    (tmp_path / "forged").mkdir()
    result, _ = adversarial_run(model, gradcam_target(model, run.config["arch"]), x, mean, std, run.predictions, settings, tmp_path / "forged", raised,
                                rng=np.random.default_rng(1))
    assert not result["measured_in_trial"] and result["accuracy"] == logged["accuracy"] and result["first_flip_pgd"] == logged["first_flip_pgd"]
    assert "warning: forged's adversarial.json is not what its weights give (" in capsys.readouterr().out


def test_trials_with_log_model_off_log_no_model_and_register_best_names_the_setting(churn_report, capsys):
    import mlflow

    from tracking import metrics

    *_, uri, out = churn_report
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("churn")
    runs = client.search_runs([experiment.experiment_id], "tags.`stresslab.kind` = 'trial'")
    assert len(runs) == 12 and client.search_logged_models([experiment.experiment_id]) == []
    assert all(metrics.WEIGHTS_FILE in {a.path for a in client.list_artifacts(r.info.run_id)} for r in runs)  # without a logged model: their one copy
    code = sweep.main(["--config", str(out.parent / "e.yaml"), "--experiment", "churn", "--tracking-uri", uri, "--register-best", "churn-best"])
    err = capsys.readouterr().err
    assert code == 2 and "logged no model (its trials ran with log_model: false)" in err and "log_model: true" in err, err
