"""Squeeze-and-Excitation CNN: ``plain_cnn``'s backbone with an SE block in every conv block.

Hu, Shen & Sun, "Squeeze-and-Excitation Networks", CVPR 2018: global-average-pool each channel
(squeeze), two FC layers with a reduction ratio (excitation), rescale the channels by the sigmoid.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from model_zoo.cnn import LAST_STAGE, StagedCNN
from model_zoo.registry import register_model, require_positive_ints


class SqueezeExcite(nn.Module):
    """Channel attention: ``x * sigmoid(W2 relu(W1 avgpool(x)))``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


@register_model(gradcam_layer=LAST_STAGE, paper="Hu et al., CVPR 2018")
def se_cnn(num_classes: int, reduction: int = 16, **kwargs) -> nn.Module:
    """``plain_cnn`` with Squeeze-and-Excitation in every block (seed 004)."""
    require_positive_ints(reduction=reduction)
    return StagedCNN(num_classes, residual=False, attention=partial(SqueezeExcite, reduction=reduction), **kwargs)
