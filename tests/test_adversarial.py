"""FGSM and PGD: one FGSM step on a linear model against its closed form; on a trained synthetic model, accuracy falls
monotonically with epsilon, PGD never above FGSM, epsilon 0 equal to the clean accuracy."""
import numpy as np
import pytest
import torch
from torch import nn

from stress import adversarial

MEAN, STD = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


def test_fgsm_on_a_linear_model_equals_the_closed_form():
    """logits = W z + b with z = (x - mean) / std: d CE / dx = (W^T (softmax - onehot)) / std per channel, so the
    FGSM image is clip(x + eps sign(W^T (p - y) / std), 0, 1), computed here in NumPy from W alone."""
    torch.manual_seed(0)
    linear = nn.Linear(3 * 8 * 8, 5)
    model = nn.Sequential(nn.Flatten(), linear).eval()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 6)
    W, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    z = ((x - MEAN[:, None, None]) / STD[:, None, None]).reshape(6, -1).astype(np.float64)
    logits = z @ W.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = ((p - np.eye(5)[y]) @ W).reshape(6, 3, 8, 8) / STD[:, None, None]
    eps = 4 / 255
    expected = np.clip(x + eps * np.sign(grad), 0, 1)
    m, s = torch.from_numpy(MEAN).view(1, 3, 1, 1), torch.from_numpy(STD).view(1, 3, 1, 1)
    got = adversarial.fgsm(model, torch.from_numpy(x), torch.from_numpy(y), eps, m, s).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - x).max() <= eps + 1e-6


@pytest.fixture(scope="module")
def trained():
    """plain_cnn trained for 3 epochs on the synthetic set (a bright class-coloured square on noise)."""
    from data_zoo import load_bundle
    from model_zoo import create_model

    torch.manual_seed(0)
    bundle = load_bundle({"name": "synthetic", "n_train": 1000, "n_test": 100, "val_fraction": 0.0})
    model = create_model("plain_cnn", 10, widths=[8, 16, 16])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = bundle.normalise(bundle.train.x), bundle.train.y
    for _ in range(3):
        for i in range(0, len(y), 50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 50]), y[i : i + 50]).backward()
            optimizer.step()
    return model.eval(), bundle.test.x.numpy(), bundle.test.y.numpy(), bundle.mean.numpy(), bundle.std.numpy(), bundle


def test_accuracy_falls_with_epsilon_pgd_never_above_fgsm_and_zero_is_clean(trained):
    model, images, labels, mean, std, bundle = trained
    with torch.no_grad():
        clean = float((model(bundle.normalise(bundle.test.x)).argmax(1).numpy() == labels).mean())
    assert clean > 0.5  # it learned: the attacks have something to break
    result = adversarial.robust_accuracy(model, images, labels, mean, std, steps=3)
    assert result["epsilons"] == [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255] and result["images"] == len(labels)
    for name in ("fgsm", "pgd"):
        acc = result["accuracy"][name]
        assert acc[0] == pytest.approx(clean, abs=1e-12) and result["clean"] == pytest.approx(clean, abs=1e-12)
    assert result["accuracy"]["pgd"][-1] < clean  # 8 grey levels break something
    flips = result["first_flip"]["pgd"]
    broken_at_8 = sum(f is not None for f in flips)
    assert broken_at_8 == round((clean - result["accuracy"]["pgd"][-1]) * len(labels))


def test_pgd_stays_in_the_epsilon_ball_and_the_image_range(trained):
    model, images, labels, mean, std, _ = trained
    x = torch.from_numpy(images[:32]).float().div(255)
    m, s = torch.from_numpy(mean).view(1, -1, 1, 1), torch.from_numpy(std).view(1, -1, 1, 1)
    adv = adversarial.pgd(model, x, torch.from_numpy(labels[:32]), 2 / 255, m, s, steps=5)
    assert (adv - x).abs().max() <= 2 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_on_a_linear_model_both_attacks_break_exactly_the_images_the_closed_form_says():
    """A linear two-class model whose logit difference is a/s x sum of 7 pixels minus their mean: the L-inf attack of
    radius eps lowers every image's margin by exactly eps x ||a/s||_1 (the sign of the gradient is the sign of the
    weights; for a linear model FGSM is the optimal attack and PGD, starting there, cannot do better). So an image
    survives eps iff it was right and its margin exceeds that, counted here by hand from the pixels."""
    from torch import nn

    rng = np.random.default_rng(0)
    n, k, a = 400, 7, 3.0
    mean, std = np.array([0.5 + 0.25 / 255, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)
    images = np.full((n, 3, 32, 32), 128, np.uint8)
    images[:, 0, 0, :k] = rng.integers(100, 156, (n, k))  # interior values: eps <= 8/255 never meets the [0, 1] clamp
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2, bias=False))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, :k] = a  # logit 0 - logit 1 = a/s x (sum of the 7 pixels - 7 x mean)
    sums = (images[:, 0, 0, :k].astype(float) / 255 - mean[0]).sum(1)  # never a multiple of 1/255: no ties
    labels = np.where(sums > 0, 0, 1)
    labels[rng.random(n) < 0.2] ^= 1  # a fifth of the images start wrong
    right = (sums > 0) == (labels == 0)
    result = adversarial.robust_accuracy(model.eval(), images, labels, mean, std, steps=5)
    expected = [float(right.mean())] + [float((right & (np.abs(sums) > k * eps)).mean()) for eps in adversarial.EPSILONS]
    assert 0 < expected[-1] < expected[1] < expected[0]  # each epsilon breaks some images and leaves others
    assert result["accuracy"]["fgsm"] == pytest.approx(expected, abs=1e-12)
    assert result["accuracy"]["pgd"] == pytest.approx(expected, abs=1e-12)
    first = [next((eps for eps in adversarial.EPSILONS if abs(v) <= k * eps), None) if ok else None for v, ok in zip(sums, right)]
    assert result["first_flip"]["pgd"] == pytest.approx(first)
