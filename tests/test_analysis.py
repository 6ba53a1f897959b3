"""analysis/: failures, transitions, McNemar, Grad-CAM localisation, the report, a tracking server."""
import json

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from analysis import compare, failures as fail, gradcam
from analysis.pipeline import run_analysis
from analysis.runs import Predictions, find_runs
from tests.conftest import mlflow_service

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


def test_mcnemar_equals_direct_computation():
    rng = np.random.default_rng(0)
    a, b = rng.random(500) < 0.8, rng.random(500) < 0.85
    result = compare.mcnemar(a, b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    expected = (abs(only_a - only_b) - 1) ** 2 / (only_a + only_b)
    assert (result["b"], result["c"]) == (only_a, only_b)
    assert result["statistic"] == pytest.approx(expected)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(expected, 1))
    small = compare.mcnemar(np.array([1, 1, 1, 0, 1], bool), np.array([0, 0, 1, 1, 1], bool))
    assert small["p_value"] == pytest.approx(stats.binomtest(2, 3, 0.5).pvalue)  # exact test when b + c < 25


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
    x = torch.randn(8, 3, 32, 32)
    classes = model(x).argmax(1).tolist()
    right = np.zeros((8, 32, 32), np.float32)
    right[:, :8, :8] = 1
    wrong = 1 - right
    assert gradcam.faithfulness(model, x, right, classes).mean() > gradcam.faithfulness(model, x, wrong, classes).mean()


def test_border_fraction():
    centre_only = np.zeros((1, 32, 32))
    centre_only[0, 8:24, 8:24] = 1
    assert fail.border_fraction(centre_only)[0] == pytest.approx(0.0)
    assert fail.border_fraction(np.ones((1, 32, 32)))[0] == pytest.approx(fail.UNIFORM_BORDER)


def test_categories_state_their_numbers():
    failures = [{"test_index": i, "true_class": "cat", "predicted_class": "dog", "true_label": 3, "predicted_label": 5, "true_class_prob": 0.005} for i in range(6)]
    failures += [{"test_index": 9, "true_class": "bird", "predicted_class": "airplane", "true_label": 2, "predicted_label": 0, "true_class_prob": 0.05}]
    cats = {c.name: c for c in fail.categorize(failures, 10, cam_border={i: 0.9 if i < 3 else 0.4 for i in range(10)})}
    assert cats["confusion cat -> dog"].test_indices == list(range(6)) and "6 of 7 failures (86%)" in cats["confusion cat -> dog"].evidence
    assert cats["context / background reliance"].test_indices == [0, 1, 2]
    assert cats["true class all but ruled out"].evidence.startswith("6 of 7")


@pytest.fixture(scope="module")
def analysed(finished_sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = run_analysis("tiny", finished_sweep["uri"], out, threshold=0.5, baseline="arch=plain_cnn", variant="arch=residual_cnn", gallery=("class1", "class3"))
    return out, path


def test_report_is_written_with_embedded_figures(analysed):
    out, path = analysed
    text = path.read_text()
    assert text.count("data:image/png;base64,") >= 10 and "<h2>Conclusions</h2>" in text and "McNemar" in text
    assert 'src="http' not in text and "src='http" not in text  # standalone
    for name in ("training_curves.png", "metrics.png", "per_class_accuracy.png", "worst_classes.png", "class_gallery.png", "summary.json"):
        assert (out / name).exists(), name


def test_mined_failures_equal_brute_force_from_the_logged_predictions(analysed, finished_sweep):
    out, _ = analysed
    runs = find_runs("tiny", finished_sweep["uri"], out / ".artifacts")
    assert len(runs) == 4
    for run in runs:
        logged = np.load(run.folder / "predictions.npz")
        probs, labels, index = logged["probs"], logged["labels"], logged["index"]
        expected = sorted(int(index[i]) for i in range(len(labels)) if probs[i].argmax() != labels[i] and probs[i].max() > 0.5)
        written = json.loads((out / "runs" / run.name / "failures.json").read_text())
        assert sorted(f["test_index"] for f in written["failures"]) == expected
        assert written["count"] == len(expected) and written["gradcam_layer"] == "stages.2"


def test_comparison_pairs_runs_by_seed(analysed):
    out, _ = analysed
    data = json.loads((out / "compare" / "plain_cnn_vs_residual_cnn" / "comparison.json").read_text())
    assert {(p["baseline"], p["variant"]) for p in data["pairs"]} == {("plain_cnn-none-s1", "residual_cnn-none-s1"), ("plain_cnn-none-s2", "residual_cnn-none-s2")}
    overall = next(r for r in data["per_class"] if r["class"] == "overall")
    deltas = [p["variant_acc"] - p["baseline_acc"] for p in data["pairs"]]
    assert overall["delta"][0] == pytest.approx(np.mean(deltas)) and overall["delta"][1] == pytest.approx(np.std(deltas, ddof=1))


def test_tracking_server_gives_the_same_failures(finished_sweep, analysed, tmp_path):
    with mlflow_service("server", finished_sweep["uri"]) as base:
        run_analysis("tiny", base, tmp_path, threshold=0.5, max_cams=20, log_to_mlflow=False, corruption_images=0)
    local_out, _ = analysed
    for folder in (local_out / "runs").iterdir():
        local = json.loads((folder / "failures.json").read_text())
        remote = json.loads((tmp_path / "runs" / folder.name / "failures.json").read_text())
        assert [f["test_index"] for f in remote["failures"]] == [f["test_index"] for f in local["failures"]]
        assert [f["confidence"] for f in remote["failures"]] == [f["confidence"] for f in local["failures"]]
