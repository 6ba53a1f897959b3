"""Every registered model runs; the constrained variants differ only where they should."""
import re

import numpy as np
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


@pytest.mark.parametrize("name, kwargs, message", [
    ("plain_cnn", {"widths": []}, "widths must be a non-empty list of positive integers, got []"),
    ("residual_cnn", {"widths": [16, 0, 64]}, "widths must be a non-empty list of positive integers, got [16, 0, 64]"),
    ("plain_cnn", {"widths": 16}, "widths must be a non-empty list of positive integers, got 16"),
    ("plain_cnn", {"widths": [16.5, 32]}, "widths must be a non-empty list of positive integers, got [16.5, 32]"),
    ("plain_cnn", {"blocks_per_stage": 0}, "blocks_per_stage must be a positive integer, got 0"),
    ("se_cnn", {"widths": [8] * 7}, "widths has 7 stages, at most 6: the max-pool between two stages halves the image"),
    ("se_cnn", {"reduction": 0}, "reduction must be a positive integer, got 0"),
    ("resnet18", {"width": True}, "width must be a positive integer, got True"),
])
def test_architecture_settings_that_cannot_build_a_network_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_zoo.create_model(name, 10, **kwargs)


@pytest.mark.parametrize("widths", [[8, 8], [8, 8, 8, 8], [8] * 6])  # 6: the most stages, a 1x1 map
@pytest.mark.parametrize("name", ["plain_cnn", "residual_cnn", "se_cnn"])
def test_grad_cam_explains_the_last_stage_whatever_the_number_of_widths(name, widths):
    model = model_zoo.create_model(name, 10, widths=widths).eval()
    seen = []
    model_zoo.gradcam_target(model, name).register_forward_hook(lambda m, i, out: seen.append(out))
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    side = 32 // 2 ** (len(widths) - 1)  # a max-pool between stages
    assert seen[0].shape == (2, 8, side, side)
    assert torch.equal(model.head(seen[0].mean(dim=(2, 3))), logits)  # what the head pools into the logits


def test_the_last_stage_target_gives_the_cams_of_the_third_stage_at_the_default_widths():
    from analysis.gradcam import compute_cams

    torch.manual_seed(0)
    model = model_zoo.create_model("se_cnn", 10).eval()
    x, classes = torch.randn(4, 3, 32, 32), [3, 1, 4, 1]
    cams = compute_cams(model, model_zoo.gradcam_target(model, "se_cnn"), x, classes)
    assert cams.shape == (4, 32, 32) and cams.max() > 0
    np.testing.assert_array_equal(cams, compute_cams(model, model.stages[2], x, classes))
