"""Metric names, defined once: ``tune.report``, MLflow and ``analysis/`` all use these strings."""

TRAIN_LOSS = "train/loss"
TRAIN_ACC = "train/acc"
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
LR = "lr"
EPOCH_SECONDS = "time/epoch_s"
IMAGES_PER_SECOND = "time/images_per_s"
EPOCH = "epoch"
# Where a trial's time goes, in seconds: its start (data, model; with the first epoch), from the second epoch on the
# previous epoch's rest (its validation, logging, checkpoint and report: beside time/epoch_s, the two add up to the time
# between two epochs' metrics), and at the end the test set, the corruption test, the attacks and the artifacts
# (weights, predictions, figures, the logged model).
TIME_SETUP = "time/setup_s"
TIME_EPOCH_REST = "time/epoch_rest_s"
TIME_TEST = "time/test_s"
TIME_ROBUSTNESS = "time/robustness_s"
TIME_ADVERSARIAL = "time/adversarial_s"
TIME_ARTIFACTS = "time/artifacts_s"

TEST_LOSS = "test/loss"
TEST_ACC = "test/acc"
TEST_PRECISION = "test/precision_macro"
TEST_RECALL = "test/recall_macro"
TEST_F1 = "test/f1_macro"
TEST_CONFIDENT_ERRORS = "test/confident_errors"  # errors made with confidence > threshold
TEST_EPOCH = "test/epoch"  # the epoch whose weights were tested: the best validation epoch under early stopping, else the last
TEST_CLASS_ACC = "test/class_acc/{}"  # .format(class name)
CORRUPTION_ACC = "robustness/{}"  # .format(corruption name): accuracy averaged over severities 1-5
MEAN_CORRUPTION_ACC = "robustness/mean"  # over CIFAR-10-C's 15 benchmark corruptions and 5 severities: the figure papers report
SEVERITY_CORRUPTION_ACC = "robustness/severity_{}"  # .format(1-5): the 15 corruptions' mean at that severity
EXTRAS_CORRUPTION_ACC = "robustness/extras_mean"  # the 4 held-out extra corruptions, apart from the 15
ROBUSTNESS_FILE = "robustness.json"
ADVERSARIAL_ACC = "adversarial/{}/eps_{:g}_255"  # .format(attack, epsilon * 255): accuracy under the attack up to that epsilon
ADVERSARIAL_FILE = "adversarial.json"

EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, LR, EPOCH_SECONDS, IMAGES_PER_SECOND)
FINAL_METRICS = (TEST_LOSS, TEST_ACC, TEST_PRECISION, TEST_RECALL, TEST_F1, TEST_CONFIDENT_ERRORS, TEST_EPOCH)

# Artifact names inside each MLflow run.
PREDICTIONS_FILE = "predictions.npz"  # test probs/logits (N, C) float32, labels, preds, index; val_logits, val_labels
WEIGHTS_FILE = "weights.pt"  # state_dict, torch.load(..., weights_only=True): the weights' one copy when log_model is false
MODEL_PT2 = "data/model.pt2"  # in a logged model's artifacts: the exported program, the weights' one copy when log_model is true
CONFIG_FILE = "config.yaml"  # the resolved trial config

# A high-confidence failure: a test image misclassified with confidence above the threshold (0.9 unless a run or the
# analysis is given another). One definition for the trials' test/confident_errors and every analysis.
CONFIDENCE_THRESHOLD = 0.9


def confident_errors(probs, labels, threshold: float = CONFIDENCE_THRESHOLD):
    """Bool mask over images (numpy): argmax of ``probs`` is not the label and the top probability exceeds ``threshold``."""
    return (probs.argmax(1) != labels) & (probs.max(1) > threshold)


def at_epoch(values, epoch, default=None):
    """The last of ``values`` ((epoch, value) pairs in logging order) logged at ``epoch``, else ``default``: an epoch
    metric of the weights a trial tested (``TEST_EPOCH``), which under early stopping is not the latest one."""
    at = [value for step, value in values if step == epoch]
    return at[-1] if at else default
