"""A store whose results were edited: a predictions file that is not what a trial writes leaves its run out; metrics its
predictions do not bear out, and predictions its run's own weights do not make, are refused before any work
(analysis/integrity.py)."""
import numpy as np
import pytest

from analysis.__main__ import main as analysis_main
from analysis.integrity import PROB_TOLERANCE, metric_problems, model_disagreement, verify_runs
from analysis.runs import ImageCache, find_runs, load_model
from config.errors import InputError
from tests.conftest import copy_store
from tracking import metrics

EDITS = {  # what a trial never writes -> what the note says
    "no probs": (lambda f: f.pop("probs"), "no probs array"),
    "rows dropped": (lambda f: f.update(probs=f["probs"][:-5]), "labels has shape (120,) where probs of shape (115, 10) needs (115,)"),
    "a NaN": (lambda f: f["probs"].__setitem__((3, 0), np.nan), "probs are not class probabilities"),
    "rows summing to 2": (lambda f: f.update(probs=f["probs"] * 2), "probs are not class probabilities"),
    "a label out of range": (lambda f: f["labels"].__setitem__(0, 10), "labels outside [0, 10)"),
    "a repeated index": (lambda f: f["index"].__setitem__(1, f["index"][0]), "negative or repeated test indices"),
    "three classes": (lambda f: f.update(classes=f["classes"][:3]), "classes has shape (3,) where probs of shape (120, 10) needs (10,)"),
    "float labels": (lambda f: f.update(labels=f["labels"].astype(float)), "labels is float64, not integers"),
    "an object array": (lambda f: f.update(probs=f["probs"].astype(object)), "not readable as arrays (Object arrays cannot be loaded"),
    "logits of another shape": (lambda f: f.update(logits=f["logits"][:, :4]), "logits is not finite of shape (120, 10)"),
}


@pytest.fixture
def store(finished_sweep, tmp_path):
    """A copy of the session's 4-run store: {run name: (run id, artifact folder)}, and its URI."""
    trials = copy_store(finished_sweep["tmp"] / "mlruns", tmp_path / "mlruns")
    return trials, f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def rewrite(folder, edit) -> None:
    """The run's predictions.npz, rewritten with ``edit`` applied to its arrays."""
    path = folder / metrics.PREDICTIONS_FILE
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    edit(arrays)
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path)


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_a_predictions_file_that_no_trial_writes_leaves_its_run_out_with_the_reason(store, edit):
    trials, uri = store
    name = sorted(trials)[0]
    rewrite(trials[name][1], EDITS[edit][0])
    notes = []
    runs = find_runs("tiny", uri, log=notes.append)
    assert sorted(r.name for r in runs) == sorted(trials)[1:]
    assert len(notes) == 1 and notes[0].startswith(f"note: skipping {name} (FINISHED): {metrics.PREDICTIONS_FILE} ") and EDITS[edit][1] in notes[0]


def test_the_logged_results_are_what_the_logged_weights_make_on_every_test_and_validation_image(store):
    """The honest store: its metrics are what its predictions say, and recomputed on the CPU, on all 120 test and 79
    validation images, every run's probabilities are the logged ones (the trials also ran on this CPU, with channels_last:
    rounding apart)."""
    trials, uri = store
    images = ImageCache()
    runs = find_runs("tiny", uri, log=lambda *_: None)
    for run in runs:
        x, mean, std = images.get(run)
        p = run.predictions
        assert metric_problems(run) == [] and len(images.validation(run)) == len(p.val_logits) == 79  # 20% of each class's images
        assert model_disagreement(load_model(run), x, mean, std, p.probs, p.index, p.classes, np.arange(len(x)), "test") is None
    verify_runs(runs, images, n_images=10**6)  # and the validation images: raises where any differs by more than the tolerance


def refused(uri: str) -> str:
    """The InputError message of verifying every image of every run of the store."""
    with pytest.raises(InputError) as caught:
        verify_runs(find_runs("tiny", uri, log=lambda *_: None), ImageCache(), n_images=10**6)
    return str(caught.value)


@pytest.mark.parametrize("forged", ["every failure made right", "one image", "one image, by 1.2x the tolerance"])
def test_predictions_the_weights_do_not_make_are_refused_naming_the_run(store, forged):
    """A residual run of the tiny sweep has failures: hiding them (all of their predicted-class probability moved to the
    true class) is refused, as is a change to one image, when every image is checked; moving half the tolerance is not."""
    trials, uri = store
    name = next(n for n in sorted(trials) if n.startswith("residual_cnn"))
    folder = trials[name][1]
    p = next(r for r in find_runs("tiny", uri, log=lambda *_: None) if r.name == name).predictions
    wrong = np.flatnonzero(~p.correct)
    assert len(wrong) >= 5
    margin = p.probs[wrong].max(1) - p.probs[wrong, p.labels[wrong]]
    clear = wrong[[int(margin.argmax())]]  # a failure whose class moving 1.2x the tolerance cannot flip
    assert margin.max() > 2.4 * PROB_TOLERANCE
    changed = wrong if forged == "every failure made right" else clear

    def nudge(f, by, changed=changed):  # ``by`` of each changed image's probability moved from its predicted class to its true class
        top = f["probs"][changed].argmax(1)
        by = np.minimum(by, f["probs"][changed, top])
        f["probs"][changed, top] -= by
        f["probs"][changed, f["labels"][changed]] += by

    logged = (folder / metrics.PREDICTIONS_FILE).read_bytes()
    rewrite(folder, lambda f: nudge(f, 1.2 * PROB_TOLERANCE if "1.2x" in forged else 1.0))
    message = refused(uri)
    assert f"run {name} ({trials[name][0]}): " in message and f"on {len(changed)} of 120 test images drawn at random" in message
    assert (f"its test/acc metric is {p.correct.mean():.4f}, its test predictions are right on" in message) == ("1.2x" not in forged)
    (folder / metrics.PREDICTIONS_FILE).write_bytes(logged)
    rewrite(folder, lambda f: nudge(f, PROB_TOLERANCE / 2, clear))  # rounding, not a change
    verify_runs(find_runs("tiny", uri, log=lambda *_: None), ImageCache(), n_images=10**6)


def test_validation_logits_the_weights_do_not_make_are_refused(store):
    """Validation logits made three times sharper (the same classes, so the val/acc they give is the logged one): only
    the model's check on the validation images can tell, and does."""
    trials, uri = store
    name = sorted(trials)[0]
    rewrite(trials[name][1], lambda f: f.update(val_logits=f["val_logits"] * 3))
    message = refused(uri)
    assert f"run {name} ({trials[name][0]}): on " in message and " of 79 validation images drawn at random" in message
    assert "metric" not in message and "test images" not in message


EDITED_METRICS = {  # how a metric is edited -> what the refusal says
    "test/acc in the run's latest metrics": ("UPDATE latest_metrics SET value = 0.99 WHERE key = 'test/acc' AND run_uuid = ?",
                                             "its test/acc metric is 0.9900, its test predictions are right on"),
    "val/acc in the run's latest metrics (what runs are ranked by)": ("UPDATE latest_metrics SET value = 0.99 WHERE key = 'val/acc' AND run_uuid = ?",
                                                                     "its val/acc metric (0.9900) is not the one its history logged for epoch 2"),
    "val/acc in latest metrics and history": ("UPDATE metrics SET value = 0.99 WHERE key = 'val/acc' AND run_uuid = ?",
                                              "its val/acc for the tested epoch 2 is 0.9900, its validation logits are right on"),
    "test/confident_errors": ("UPDATE latest_metrics SET value = 1000 WHERE key = 'test/confident_errors' AND run_uuid = ?",
                              "its test/confident_errors metric is 1000, its test predictions make"),
}


@pytest.mark.parametrize("edit", EDITED_METRICS, ids=list(EDITED_METRICS))
def test_metrics_their_predictions_do_not_bear_out_are_refused(store, edit):
    import sqlite3

    trials, uri = store
    name = next(n for n in sorted(trials) if n.startswith("residual_cnn"))
    sql, said = EDITED_METRICS[edit]
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
        db.execute(sql, (trials[name][0],))
        if "history" in edit:
            db.execute(sql.replace("UPDATE metrics", "UPDATE latest_metrics"), (trials[name][0],))
    message = refused(uri)
    assert f"run {name} ({trials[name][0]}): its " in message and said in message and "images drawn at random" not in message


def test_the_analysis_refuses_a_forged_run_before_any_work(store, tmp_path, capsys):
    """``python -m analysis`` on a store where one run's predictions were replaced by its true labels: exit 2, the run
    named, no report written. The default check draws 128 of the 120 test images: all of them."""
    trials, uri = store
    name = sorted(trials)[-1]
    rewrite(trials[name][1], lambda f: f.update(probs=np.eye(f["probs"].shape[1], dtype=np.float32)[f["labels"]]))
    out = tmp_path / "report"
    assert analysis_main(["--experiment", "tiny", "--tracking-uri", uri, "--out", str(out), "--no-log", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"run {name} ({trials[name][0]}): " in err and "does not judge a model on results it did not produce" in err
    assert not (out / "report.html").exists() and not (out / "runs").exists()


def test_the_metric_check_counts_confident_errors_as_the_trial_did_in_float32():
    """A top probability of exactly float32(0.8) under the trial threshold 0.8: the trial (``classification_report`` on its
    float32 softmax) does not count it, since 0.8 is compared in float32; the check must not count it either, or an
    honest run would be refused (in float64, float32(0.8) = 0.800000011920929 > 0.8)."""
    from analysis.runs import Predictions, RunRecord
    from training.engine import classification_report

    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9]], np.float32)
    labels = np.array([1, 1, 0])
    logged = classification_report(probs, labels, ["a", "b"], 0.8)["metrics"]
    run = RunRecord("0" * 32, "float32", {}, logged, None, None)
    run.__dict__.update(predictions=Predictions(probs.astype(np.float64), labels, np.arange(3), ["a", "b"]), config={"threshold": 0.8})
    assert logged[metrics.TEST_CONFIDENT_ERRORS] == 1  # only the 0.9 one
    assert metric_problems(run) == []
    run.metrics = {**logged, metrics.TEST_CONFIDENT_ERRORS: 2}
    assert metric_problems(run) == ["its test/confident_errors metric is 2, its test predictions make 1 above 0.8"]
