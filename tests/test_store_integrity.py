"""A store whose predictions were edited: a file that is not what a trial writes leaves its run out, and predictions its
run's own weights do not make are refused before any work (analysis/integrity.py)."""
import numpy as np
import pytest

from analysis.__main__ import main as analysis_main
from analysis.integrity import PROB_TOLERANCE, model_disagreement, verify_runs
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


def test_the_logged_predictions_are_what_the_logged_weights_make_on_every_test_image(store):
    """The honest store: recomputed on the CPU, on all 120 test images, every run's probabilities are the logged ones
    (the trials also ran on this CPU, with channels_last: rounding apart)."""
    trials, uri = store
    images = ImageCache()
    for run in find_runs("tiny", uri, log=lambda *_: None):
        x, mean, std = images.get(run)
        assert model_disagreement(load_model(run), x, mean, std, run.predictions, np.arange(len(x))) is None


@pytest.mark.parametrize("forged", ["every failure made right", "one image", "one image, by 1.2x the tolerance"])
def test_predictions_the_weights_do_not_make_are_refused_naming_the_run(store, forged):
    """A residual run of the tiny sweep has confident failures: hiding them (each set to its true label at 0.99) is
    refused (all of their predicted-class probability moved to the true class), as is a change to one image, when every
    image is checked; moving half the tolerance is not."""
    trials, uri = store
    name = next(n for n in sorted(trials) if n.startswith("residual_cnn"))
    folder = trials[name][1]
    wrong = np.flatnonzero(~next(r for r in find_runs("tiny", uri, log=lambda *_: None) if r.name == name).predictions.correct)
    assert len(wrong) >= 5
    changed = wrong if forged == "every failure made right" else wrong[:1]

    def nudge(f, by):  # ``by`` of each changed image's probability moved from its predicted class to its true class
        top = f["probs"][changed].argmax(1)
        by = np.minimum(by, f["probs"][changed, top])
        f["probs"][changed, top] -= by
        f["probs"][changed, f["labels"][changed]] += by

    logged = (folder / metrics.PREDICTIONS_FILE).read_bytes()
    rewrite(folder, lambda f: nudge(f, 1.2 * PROB_TOLERANCE if "1.2x" in forged else 1.0))
    with pytest.raises(InputError, match=rf"run {name} \({trials[name][0]}\): on {len(changed)} of 120 test images drawn at random"):
        verify_runs(find_runs("tiny", uri, log=lambda *_: None), ImageCache(), n_images=10**6)
    (folder / metrics.PREDICTIONS_FILE).write_bytes(logged)
    rewrite(folder, lambda f: nudge(f, PROB_TOLERANCE / 2))  # rounding, not a change
    verify_runs(find_runs("tiny", uri, log=lambda *_: None), ImageCache(), n_images=10**6)


def test_the_analysis_refuses_a_forged_run_before_any_work(store, tmp_path, capsys):
    """``python -m analysis`` on a store where one run's predictions were replaced by its true labels: exit 2, the run
    named, no report written. The default check draws 128 of the 120 test images: all of them."""
    trials, uri = store
    name = sorted(trials)[-1]
    rewrite(trials[name][1], lambda f: f.update(probs=np.eye(f["probs"].shape[1], dtype=np.float32)[f["labels"]]))
    out = tmp_path / "report"
    assert analysis_main(["--experiment", "tiny", "--tracking-uri", uri, "--out", str(out), "--no-log", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"run {name} ({trials[name][0]}): on " in err and "does not judge a model on predictions it did not make" in err
    assert not (out / "report.html").exists() and not (out / "runs").exists()
