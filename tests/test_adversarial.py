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
        assert all(b <= a for a, b in zip(acc, acc[1:])), (name, acc)
    assert all(p <= f for p, f in zip(result["accuracy"]["pgd"], result["accuracy"]["fgsm"])), result["accuracy"]
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
