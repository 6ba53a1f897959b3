"""analysis/: failures, transitions, McNemar, Grad-CAM localisation, the report, a tracking server."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tracking import metrics

from analysis import compare, failures as fail, gradcam
from analysis.pipeline import run_analysis
from analysis.artifacts import ArtifactReader
from analysis.runs import Predictions, find_runs
from tests.conftest import copy_store, mlflow_service

CLASSES = ["a", "b", "c"]


def preds(probs, labels, index=None) -> Predictions:
    probs = np.asarray(probs, float)
    return Predictions(probs, np.asarray(labels), np.asarray(index if index is not None else np.arange(len(labels))), CLASSES)


def test_mine_failures_fields_and_order():
    p = preds([[0.05, 0.93, 0.02], [0.97, 0.02, 0.01], [0.2, 0.7, 0.1], [0.01, 0.04, 0.95]], [0, 1, 0, 2], index=[10, 11, 12, 13])
    found = fail.mine_failures(p, 0.9)
    assert [f["test_index"] for f in found] == [11, 10]  # most confident first; index 12 is below 0.9, 13 is right
    f = found[0]
    assert (f["true_class"], f["predicted_class"], f["confidence"]) == ("b", "a", 0.97)
    assert f["margin"] == pytest.approx(0.95) and f["true_class_prob"] == pytest.approx(0.02)


def test_transitions_on_a_hand_built_pair():
    labels = [0, 1, 2, 0, 1, 2]
    base = preds([[0.02, 0.95, 0.03],   # 0: confident failure, variant right -> fixed
                  [0.96, 0.02, 0.02],   # 1: confident failure, variant wrong -> still
                  [0.1, 0.1, 0.8],      # 2: right; variant confidently wrong -> new
                  [0.3, 0.6, 0.1],      # 3: unconfident failure: in no set
                  [0.1, 0.8, 0.1],      # 4: right, variant right
                  [0.92, 0.05, 0.03]],  # 5: confident failure, variant still wrong (unconfidently)
                 labels, index=[100, 101, 102, 103, 104, 105])
    variant = preds([[0.9, 0.05, 0.05], [0.01, 0.01, 0.98], [0.95, 0.03, 0.02], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4]],
                    labels, index=[100, 101, 102, 103, 104, 105])
    t = compare.transitions(base, variant, 0.9)
    assert (t.fixed, t.still, t.new) == ([100], [101, 105], [102])
    with pytest.raises(ValueError, match="different test images"):
        compare.transitions(base, preds(variant.probs, labels, index=[0, 1, 2, 3, 4, 5]), 0.9)


def test_mcnemar_on_textbook_examples():
    # Agresti, Categorical Data Analysis (2002), Table 10.1: approval ratings 794 / 150 / 86 / 570; b + c = 236
    base = np.array([1] * 794 + [1] * 150 + [0] * 86 + [0] * 570, bool)
    variant = np.array([1] * 794 + [0] * 150 + [1] * 86 + [0] * 570, bool)
    result = compare.mcnemar(base, variant)
    assert (result["b"], result["c"]) == (150, 86)
    assert result["statistic"] == pytest.approx(63**2 / 236, abs=1e-9)  # Agresti's 17.36 without, 16.82 with the continuity correction
    assert result["p_value"] == pytest.approx(4.11e-5, rel=0.01)
    # b + c < 25: the exact binomial test, two-sided P(X <= 2 | n = 11, 1/2) x 2 = 2 x (1 + 11 + 55) / 2048
    small = compare.mcnemar(np.array([1, 1] + [0] * 9 + [1] * 5, bool), np.array([0, 0] + [1] * 9 + [1] * 5, bool))
    assert small["test"] == "exact binomial" and small["p_value"] == pytest.approx(134 / 2048)


def test_holm_adjustment_on_a_worked_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert compare.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_seed_churn_counts_every_ordered_pair_of_seeds():
    from analysis.runs import RunRecord

    def record(seed, correct_conf):
        probs = np.array([[0.95, 0.03, 0.02] if c else [0.02, 0.96, 0.02] for c in correct_conf])
        r = RunRecord(f"s{seed}", f"s{seed}", {"seed": str(seed), "arch": "a"}, {}, None, "")
        r.__dict__["predictions"] = preds(probs, [0] * len(correct_conf))
        return r

    runs = [record(1, [1, 1, 0, 0]), record(2, [0, 1, 1, 0]), record(3, [1, 1, 1, 1])]
    churn = compare.seed_churn(runs, 0.9)
    # fixed a->b: a's confident failures b gets right. 1->2: {2}, 1->3: {2,3}, 2->1: {0}, 2->3: {0,3}, 3->x: none
    assert churn["pairs"] == 6
    assert churn["fixed"][0] == pytest.approx(np.mean([1, 2, 1, 2, 0, 0]))
    assert churn["new"][0] == pytest.approx(np.mean([1, 0, 1, 0, 2, 2]))  # new a->b equals fixed b->a
    assert compare.seed_churn(runs[:1], 0.9) is None


class RegionModel(nn.Module):
    """Logits depend only on the top-left 8x8 pixels: the rest of the image is masked out before the convs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 3)
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., :8, :8] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.head(self.features(x * self.mask).mean(dim=(2, 3)))


def test_gradcam_mass_lands_in_the_only_region_the_logit_sees():
    model = RegionModel().eval()
    x = torch.randn(16, 3, 32, 32)
    logits = model(x)
    cams = gradcam.compute_cams(model, model.features, x, logits.argmax(1).tolist(), batch_size=5)
    assert cams.shape == (16, 32, 32)
    region = cams[:, :10, :10].sum(axis=(1, 2)) / (cams.sum(axis=(1, 2)) + 1e-12)  # 8x8 plus the two convs' 1-pixel reach
    assert (region > 0.8).mean() >= 0.9, region
    assert gradcam.layer_resolution(model, model.features) == (32, 32)


def test_road_faithfulness_prefers_the_map_of_the_region_the_model_uses():
    model = RegionModel().eval()
    with torch.no_grad():
        model.head.weight *= 30  # confident logits, so removing evidence moves the softmax
    x = torch.randn(16, 3, 32, 32)
    classes = model(x).argmax(1).tolist()
    right = np.zeros((16, 32, 32), np.float32)
    right[:, :8, :8] = 1
    right += np.random.default_rng(0).random((16, 32, 32)).astype(np.float32) * 1e-3  # break ties inside and outside
    scores = gradcam.faithfulness(model, x, right, classes)
    assert np.array_equal(scores, gradcam.faithfulness(model, x, right, classes))  # seeded imputation
    wrong = gradcam.faithfulness(model, x, 1 - right, classes)
    random = gradcam.faithfulness(model, x, gradcam.reference_maps(16, 32)["random map"], classes)
    assert (scores > 0).all() and (wrong < 0).all(), (scores, wrong)  # every image, not only on average
    assert scores.mean() > random.mean() + 0.01 and random.mean() > wrong.mean() + 0.01


def test_road_scores_are_pytorch_grad_cams_own_bit_for_bit():
    """faithfulness() assembles ROAD with SparseImputer: the library's ROADCombined, under the same seed, gives the same
    scores exactly, on random maps and on flat ones (where every percentile removes every pixel)."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, rng = RegionModel().eval(), np.random.default_rng(1)
    x, classes = torch.randn(12, 3, 32, 32), rng.integers(0, model.head.out_features, 12).tolist()
    cams = rng.random((12, 32, 32)).astype(np.float32)
    cams[0], cams[1] = 0.5, 0  # no pixel below any percentile: all of them imputed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        library = ROADCombined(percentiles=[20, 40, 60, 80])(x, cams, [ClassifierOutputSoftmaxTarget(c) for c in classes], model)
    assert np.array_equal(gradcam.faithfulness(model, x, cams, classes), np.asarray(library, dtype=float))


class Masked(nn.Module):
    """Channel 0 keeps the top-left quarter of its input, channel 1 the bottom-right one."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 2, 8, 8)
        mask[0, 0, :4, :4] = 1
        mask[0, 1, 4:, 4:] = 1
        self.register_buffer("mask", mask)
        self.scale = nn.Parameter(torch.ones(()))  # a weight, so the activations carry gradients

    def forward(self, x):
        return x.mean(1, keepdim=True) * self.mask * self.scale


class TwoRegionModel(nn.Module):
    """Class k's logit sums channel k of an 8x8 feature map: class 0 sees only the top-left, class 1 the bottom-right."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.AvgPool2d(4), Masked())

    def forward(self, x):
        return self.features(x).sum(dim=(2, 3))


def test_gradcam_of_predicted_and_true_class_differ_on_a_coarse_layer():
    model = TwoRegionModel().eval()
    x = torch.rand(6, 3, 32, 32) + 0.1
    assert gradcam.layer_resolution(model, model.features) == (8, 8)
    first = gradcam.compute_cams(model, model.features, x, [0] * 6)
    second = gradcam.compute_cams(model, model.features, x, [1] * 6)
    share = lambda cams, rows, cols: cams[:, rows, cols].sum(axis=(1, 2)) / cams.sum(axis=(1, 2))
    assert (share(first, slice(0, 16), slice(0, 16)) > 0.8).all() and (share(second, slice(16, 32), slice(16, 32)) > 0.8).all()
    assert (share(first, slice(16, 32), slice(16, 32)) < 0.1).all()


def test_border_fraction():
    centre_only = np.zeros((3, 32, 32))
    centre_only[0, 8:24, 8:24] = 1
    centre_only[1] = 1
    assert fail.border_fraction(centre_only)[0] == pytest.approx(0.0)
    assert fail.border_fraction(centre_only)[1] == pytest.approx(0.75)  # 1 - 16^2 / 32^2
    assert np.isnan(fail.border_fraction(centre_only)[2])  # an all-zero map points nowhere


def test_categories_state_their_numbers():
    failures = [{"test_index": i, "true_class": "cat", "predicted_class": "dog", "true_label": 3, "predicted_label": 5, "true_class_prob": 0.005} for i in range(6)]
    failures += [{"test_index": 9, "true_class": "bird", "predicted_class": "airplane", "true_label": 2, "predicted_label": 0, "true_class_prob": 0.05}]
    border = {i: 0.9 if i < 3 else 0.4 for i in range(7)} | {5: float("nan"), 6: float("nan")}
    cats = {c.name: c for c in fail.categorize(failures, 10, cam_border=border, chance={"border": 0.12, "ruled_out": 0.3})}
    assert cats["confusion cat -> dog"].test_indices == list(range(6)) and "6 of 7 failures (86%)" in cats["confusion cat -> dog"].evidence
    assert "0.1 expected if errors spread evenly" in cats["confusion cat -> dog"].evidence  # 7 / (10 x 9)
    context = cats["context / background reliance"]
    # 3 of the 5 finite maps above a uniform map's 75% border share; their mean share (3 x 0.9 + 2 x 0.4) / 5 = 70%
    assert context.test_indices == [0, 1, 2] and context.evidence == (
        "3 of 5 explained failures (60%) put more Grad-CAM mass on the border than a uniform map would (75%); chance: 12% of the "
        "Grad-CAMs of randomly drawn test images do; mean border share 70%; 2 all-zero maps not counted")
    assert cats["true class all but ruled out"].evidence == ("6 of 7 failures (86%) give the true class < 1% probability; 30% of all of "
                                                             "the run's errors do")


def test_colour_chance_on_two_separable_and_two_identical_classes():
    labels = np.array([0, 0, 1, 1])
    separable = np.array([[0, 0, 0], [10, 0, 0], [200, 0, 0], [210, 0, 0]], float)
    means = np.stack([separable[labels == k].mean(0) for k in (0, 1)])
    assert fail.colour_chance(separable, labels, means) == 0.0
    same = np.array([[0, 0, 0], [10, 0, 0], [0, 0, 0], [10, 0, 0]], float)
    means = np.stack([same[labels == k].mean(0) for k in (0, 1)])
    assert fail.colour_chance(same, labels, means) == 0.0  # equal means: never strictly nearer the other class


@pytest.fixture(scope="module")
def analysed(finished_sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = run_analysis("tiny", finished_sweep["uri"], out, threshold=0.2, baseline="arch=plain_cnn", variant="arch=residual_cnn", gallery=("class1", "class3"),
                        corruption_images=40, road_images=16, max_cams=20)
    return out, path


def test_road_is_reported_beside_its_references(analysed):
    out, path = analysed
    for folder in (out / "runs").iterdir():
        road = json.loads((folder / "failures.json").read_text())["road"]
        assert road["images"] == 16 and set(road) == {"images", "Grad-CAM", "random map", "centred blob"}
    assert "ROAD random map" in path.read_text() and "ROAD centred blob" in path.read_text()


def test_report_is_written_with_embedded_figures(analysed):
    out, path = analysed
    text = path.read_text()
    import re

    sources = re.findall(r'<img alt="[^"]*" loading="lazy" src="([^"]+)"', text)
    assert len(sources) >= 10 and all((out / src).is_file() for src in sources)  # relative links to files beside the report
    assert "base64" not in text and not any(src.startswith(("http", "/")) for src in sources)
    assert text.index("<h2 id='conclusions'>") < text.index("Comparison:") < text.index("<h2 id='results'>") < text.index("<details")
    for name in re.findall(r"<a href='#(run-[^']+)'>", text):  # every overview row opens its run's section
        assert f"<details id='{name}'>" in text
    assert "McNemar" in text
    for name in ("training_curves.png", "metrics.png", "per_class_accuracy.png", "worst_classes.png", "class_gallery.webp", "summary.json"):
        assert (out / name).exists(), name


def full_failures(uri: str) -> dict[str, list[dict]]:
    """Every run's full failure list, from the analysis run's MLflow table (the report folder lists the shown ones)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (run,) = [r for r in client.search_runs([experiment], "tags.`stresslab.kind` = 'analysis'") if r.data.params["threshold"] == "0.2"]
    table = client.load_table(experiment, "tables/failures.json", run_ids=[run.info.run_id])
    return {name: group.to_dict("records") for name, group in table.groupby("run_name", sort=False)}


def test_mined_failures_equal_brute_force_from_the_logged_predictions(analysed, finished_sweep):
    out, _ = analysed
    runs = find_runs("tiny", finished_sweep["uri"])
    full = full_failures(finished_sweep["uri"])
    assert len(runs) == 4
    for run in runs:
        logged = np.load(run.artifact("predictions.npz"))
        probs, labels, index = logged["probs"], logged["labels"], logged["index"]
        expected = sorted(int(index[i]) for i in range(len(labels)) if probs[i].argmax() != labels[i] and probs[i].max() > 0.2)
        written = json.loads((out / "runs" / run.name / "failures.json").read_text())
        assert sorted(f["test_index"] for f in full.get(run.name, [])) == expected
        assert written["count"] == len(expected) and written["gradcam_layer"] == "stages"
        shown = min(24, len(expected))  # the report folder keeps what the page shows: the 24 most confident
        assert written["listed"] == shown and [f["test_index"] for f in written["failures"]] == [f["test_index"] for f in full.get(run.name, [])[:shown]]
        confidences = [f["confidence"] for f in full.get(run.name, [])]
        assert confidences == sorted(confidences, reverse=True)


def test_label_issues_are_listed_and_every_failure_count_is_given_both_ways(analysed, finished_sweep):
    """label_issues.json ranks the test images (cleanlab on the 4 runs' mean probabilities); each failure says whether its
    image is flagged, and failures.json, the overview table and the persistent section count both ways."""
    out, path = analysed
    result = json.loads((out / "label_issues.json").read_text())
    runs = find_runs("tiny", finished_sweep["uri"])
    mean = np.mean([r.predictions.probs for r in runs], axis=0)
    labels = runs[0].predictions.labels
    assert result["runs"] == 4 and result["test_images"] == len(labels) and result["count"] == sum(c["flagged"] for c in result["candidates"])
    for c in result["candidates"]:  # self-confidence: the mean probability of the given label
        assert c["quality"] == pytest.approx(mean[c["position"], labels[c["position"]]] / mean[c["position"]].sum(), abs=1e-5)
    flagged = {c["test_index"] for c in result["candidates"] if c["flagged"]}
    text = path.read_text()
    full = full_failures(finished_sweep["uri"])
    for run in runs:
        written = json.loads((out / "runs" / run.name / "failures.json").read_text())
        assert all(f["likely_label_error"] == (f["test_index"] in flagged) for f in written["failures"] + full.get(run.name, []))
        kept = sum(not f["likely_label_error"] for f in full.get(run.name, []))
        assert written["count_excluding_likely_label_errors"] == kept
        assert f"{run.name}: {written['count']} failures, {kept} excluding likely label errors</summary>" in text
    assert "<h2>Likely label errors</h2>" in text and "excl. likely label errors" in text and "<a href='#label-issues'>" in text
    persistent = json.loads((out / "persistent.json").read_text())
    assert persistent["likely_label_errors"]["persistent"] == sorted(set(persistent["groups"]["persistent"]) & flagged)


def test_adversarial_accuracy_is_reported_per_run_and_epsilon(analysed, finished_sweep):
    """Every run attacked on 100 class-balanced test images; the clean figure is the logged predictions' accuracy there."""
    from stress.corruptions import first_per_class

    out, path = analysed
    result = json.loads((out / "adversarial.json").read_text())
    assert result["epsilons"] == [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255] and result["attacks"] == ["fgsm", "pgd"]
    for run in find_runs("tiny", finished_sweep["uri"]):
        r, p = result["runs"][run.name], run.predictions
        pos = first_per_class(p.labels, len(p.classes), 100)
        assert r["images"] == len(pos) and r["clean"] == pytest.approx(float(p.correct[pos].mean()), abs=1e-9)
        for attack in ("fgsm", "pgd"):
            acc = r["accuracy"][attack]
            assert acc[0] == r["clean"] and len(acc) == len(result["epsilons"])
    text = path.read_text()
    assert "<h2>Adversarial robustness</h2>" in text and "PGD 8/255" in text and (out / "adversarial_accuracy.png").is_file()


def test_runs_analysed_in_worker_processes_give_what_one_process_gives(analysed, finished_sweep, tmp_path):
    from analysis.failures import RunSettings
    from analysis.runs import ImageCache
    from analysis.workers import analyse_runs

    out, _ = analysed
    runs = find_runs("tiny", finished_sweep["uri"])
    settings = RunSettings(0.2, {}, max_cams=2, road_images=4, adversarial_images=0)
    parallel = analyse_runs(runs, ImageCache(), tmp_path, settings, workers=2)
    assert [a.run.name for a in parallel] == [r.name for r in runs]  # in run order, whichever finished first
    models = sum(Path(r.model[1].removeprefix("file://"), "data", "model.pt2").stat().st_size for r in runs)
    assert runs[0].reader.counts["read in place"] >= 3 * len(runs) and runs[0].reader.bytes["read in place"] > models  # the workers' reads, counted
    for a in parallel:
        serial = json.loads((out / "runs" / a.run.name / "failures.json").read_text())["failures"]
        assert [(f["test_index"], f["confidence"]) for f in a.failures[:24]] == [(f["test_index"], f["confidence"]) for f in serial]
        assert (tmp_path / "runs" / a.run.name / "failures.json").is_file() and a.road["images"] == 4


def test_max_cams_0_lists_the_failures_and_explains_none(finished_sweep, tmp_path):
    from analysis.failures import RunSettings
    from analysis.runs import ImageCache
    from analysis.workers import analyse_runs

    runs = [r for r in find_runs("tiny", finished_sweep["uri"]) if r.config["arch"] == "residual_cnn"]  # the plain ones have no failure above 0.2
    analyses = analyse_runs(runs, ImageCache(), tmp_path, RunSettings(0.2, {}, max_cams=0, road_images=0, adversarial_images=0), workers=1)
    for a in analyses:
        folder = tmp_path / "runs" / a.run.name
        assert len(a.failures) == json.loads((folder / "failures.json").read_text())["count"] > 0
        assert (folder / "failures_grid.webp").is_file() and not (folder / "gradcam_failures.webp").exists()
        assert "gradcam" not in a.figures and a.road == {}


def test_comparison_pairs_runs_by_seed(analysed):
    out, _ = analysed
    data = json.loads((out / "compare" / "plain_cnn_vs_residual_cnn" / "comparison.json").read_text())
    assert {(p["baseline"], p["variant"]) for p in data["pairs"]} == {("plain_cnn-none-s1", "residual_cnn-none-s1"), ("plain_cnn-none-s2", "residual_cnn-none-s2")}
    overall = next(r for r in data["per_class"] if r["class"] == "overall")
    deltas = [p["variant_acc"] - p["baseline_acc"] for p in data["pairs"]]
    # two pairs: the mean is their midpoint and the sample std |d1 - d2| / sqrt(2), in closed form
    assert overall["delta"][0] == pytest.approx((deltas[0] + deltas[1]) / 2) and overall["delta"][1] == pytest.approx(abs(deltas[0] - deltas[1]) / 2 ** 0.5)


@pytest.mark.slow  # the default suite analyses through a tracking server in tests/test_gpu_readiness.py
def test_tracking_server_gives_the_same_failures(finished_sweep, analysed, tmp_path):
    with mlflow_service("server", finished_sweep["uri"]) as base:
        run_analysis("tiny", base, tmp_path, threshold=0.2, max_cams=2, log_to_mlflow=False, corruption_images=0, road_images=4)
    local_out, _ = analysed
    for folder in (local_out / "runs").iterdir():
        local = json.loads((folder / "failures.json").read_text())
        remote = json.loads((tmp_path / "runs" / folder.name / "failures.json").read_text())
        assert [f["test_index"] for f in remote["failures"]] == [f["test_index"] for f in local["failures"]]
        assert [f["confidence"] for f in remote["failures"]] == [f["confidence"] for f in local["failures"]]


def test_main_tables_are_logged_as_mlflow_tables(analysed, finished_sweep):
    import mlflow

    out, _ = analysed
    client = mlflow.MlflowClient(finished_sweep["uri"])
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (run,) = [r for r in client.search_runs([experiment], "tags.`stresslab.kind` = 'analysis'") if r.data.params["threshold"] == "0.2"]
    load = lambda name: client.load_table(experiment, f"tables/{name}.json", run_ids=[run.info.run_id])
    written = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/failures.json")}
    failures = load("failures")
    assert len(failures) == sum(w["count"] for w in written.values()) > 0
    for name, w in written.items():
        listed = failures.loc[failures.run_name == name, "test_index"].tolist()
        assert len(listed) == w["count"] and listed[:w["listed"]] == [f["test_index"] for f in w["failures"]]
    runs = load("runs")
    assert dict(zip(runs.name, runs.failures)) == {name: w["count"] for name, w in written.items()}
    comparison = json.loads((out / "compare" / "plain_cnn_vs_residual_cnn" / "comparison.json").read_text())
    assert sorted(load("comparison_pairs").fixed) == sorted(len(p["fixed"]) for p in comparison["pairs"])
    assert set(load("comparison_strata").stratum) == {r["stratum"] for r in comparison["strata"]}


def test_names_and_values_from_a_tampered_store_stay_data(finished_sweep, tmp_path):
    """Issue 38's store: a run named ../../outside, an augment param ../x (paired, so a comparison folder is made from
    it), a run named with markup and an adversarial.json whose steps is a script. The analysis exits 0, writes nothing
    outside --out, and its report holds no unescaped markup from the store."""
    import sqlite3

    from analysis.__main__ import main as analysis_main

    store = tmp_path / "store" / "mlruns"
    trials = copy_store(finished_sweep["tmp"] / "mlruns", store)
    ids = {name: run_id for name, (run_id, _) in trials.items()}
    names = sorted(ids)  # plain_cnn s1, s2, residual_cnn s1, s2
    with sqlite3.connect(store / "mlflow.db") as db:
        renamed = {names[0]: "../../outside", names[3]: "<img src=x onerror=alert(1)>"}
        for old, new in renamed.items():
            db.execute("UPDATE runs SET name = ? WHERE run_uuid = ?", (new, ids[old]))
            db.execute("UPDATE tags SET value = ? WHERE key = 'mlflow.runName' AND run_uuid = ?", (new, ids[old]))
        seed = db.execute("SELECT value FROM params WHERE key = 'seed' AND run_uuid = ?", (ids[names[0]],)).fetchone()[0]
        db.execute("UPDATE params SET value = '../x' WHERE key = 'augment' AND run_uuid = ?", (ids[names[1]],))
        db.execute("UPDATE params SET value = ? WHERE key = 'seed' AND run_uuid = ?", (seed, ids[names[1]]))  # its pair: names[0]
    planted = {"requested": 10, "images": 10, "steps": "<script>alert(1)</script>", "step_size": 0.25, "epsilons": [0.0], "accuracy": {}, "clean": 1.0}
    (trials[names[2]][1] / metrics.ADVERSARIAL_FILE).write_text(json.dumps(planted))
    out = tmp_path / "work" / "report"
    before = sorted(p for p in tmp_path.rglob("*") if out not in p.parents)
    assert analysis_main(["--experiment", "tiny", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--out", str(out), "--no-log",
                          "--threshold", "0.2", "--corruption-images", "0", "--adversarial-images", "10", "--road-images", "4", "--max-cams", "4",
                          "--workers", "1"]) == 0
    assert sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p not in (out, out.parent)) == before  # nothing outside --out
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(["_.._outside", "_img_src_x_onerror_alert_1__", names[1], names[2]])
    assert [p.name for p in (out / "compare").iterdir()] == ["none_vs_.._x"]
    text = (out / "report.html").read_text()
    assert "<script" not in text.lower() and "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert json.loads((out / "adversarial.json").read_text())["steps"] == 10  # the planted file was not trusted: attacked again


def test_a_local_store_is_read_in_place_and_no_weights_are_copied_under_out(analysed, finished_sweep, capsys):
    """The sweep's store is a local folder: the analysis reads every artifact where it is (the summary line counts them),
    downloads nothing and writes no copy of any weights under --out; its photographic grids are WebP."""
    out, _ = analysed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pt2", ".npz") or ".artifacts" in p.parts]
    assert {p.name for p in files} >= {"failures_grid.webp", "gradcam_failures.webp", "class_gallery.webp"}
    assert not {p.name for p in files} & {"failures_grid.png", "gradcam_failures.png", "class_gallery.png", "failures_grid.jpg"}
    reader = ArtifactReader(finished_sweep["uri"], out / "unused-cache")
    runs = find_runs("tiny", finished_sweep["uri"], reader=reader)
    assert reader.counts["read in place"] == len(runs)  # each run's predictions, read and checked by find_runs
    state = runs[0].state_dict()  # from the logged model's exported program, in the store
    assert "head.weight" in state and reader.counts["read in place"] == len(runs) + 1
    assert reader.counts["downloaded"] == reader.counts["from the cache"] == 0 and not (out / "unused-cache").exists()
