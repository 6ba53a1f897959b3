"""Every registered model runs; the constrained variants differ only where they should."""
import pytest
import torch
from torch import nn

import model_zoo


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", model_zoo.list_models())
def test_every_model_forward_finite(name, num_classes):
    model = model_zoo.create_model(name, num_classes=num_classes).eval()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    target = model_zoo.gradcam_target(model, name)
    assert isinstance(target, nn.Module) and any(isinstance(m, nn.Conv2d) for m in target.modules())


def test_registry_lists_the_four_models_and_rejects_unknown_names():
    assert model_zoo.list_models() == ["plain_cnn", "residual_cnn", "resnet18", "se_cnn"]
    with pytest.raises(KeyError, match="unknown model 'resnet19'; known: plain_cnn, residual_cnn, resnet18, se_cnn"):
        model_zoo.create_model("resnet19", num_classes=10)


def test_resnet18_parameter_count():
    assert n_params(model_zoo.create_model("resnet18", num_classes=10)) == 11_173_962


def test_resnet18_gradcam_layer_is_selectable():
    model = model_zoo.create_model("resnet18", num_classes=10)
    assert model_zoo.gradcam_target(model, "resnet18") is model.layer4
    assert model_zoo.gradcam_target(model, "resnet18", "layer3") is model.layer3
    with pytest.raises(KeyError, match="has no layer 'layer9'"):
        model_zoo.gradcam_target(model, "resnet18", "layer9")


def conv_shapes(model: nn.Module, skip: str) -> list[tuple]:
    return [tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and skip not in n]


def test_residual_cnn_is_plain_cnn_plus_projection_shortcuts_only():
    plain, residual = model_zoo.create_model("plain_cnn", 10), model_zoo.create_model("residual_cnn", 10)
    # Same widths and depth: identical main-path convolutions, in order.
    assert conv_shapes(plain, "shortcut") == conv_shapes(residual, "shortcut")
    assert len(conv_shapes(plain, "shortcut")) == 7  # stem + 3 stages x 2 convs
    # The whole parameter difference is the 1x1 projection shortcuts (conv + BN) where width changes.
    shortcut = sum(p.numel() for n, p in residual.named_parameters() if "shortcut" in n)
    assert n_params(residual) - n_params(plain) == shortcut
    assert shortcut == (32 * 64 + 2 * 64) + (64 * 128 + 2 * 128)  # 32->64 and 64->128 projections


def test_se_cnn_adds_only_excitation_layers():
    plain, se = model_zoo.create_model("plain_cnn", 10), model_zoo.create_model("se_cnn", 10)
    assert conv_shapes(plain, "shortcut") == conv_shapes(se, "shortcut")
    attention = sum(p.numel() for n, p in se.named_parameters() if "attention" in n)
    assert attention > 0 and n_params(se) - n_params(plain) == attention


def test_width_knob_changes_the_model():
    narrow = model_zoo.create_model("plain_cnn", 10, widths=[8, 16, 32])
    assert narrow(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert n_params(narrow) < n_params(model_zoo.create_model("plain_cnn", 10))
