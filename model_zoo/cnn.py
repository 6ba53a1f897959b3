"""VGG-style CIFAR CNN, plain and with residual connections.

Plain: stacks of 3x3 conv-BN-ReLU in stages with max-pooling between them (Simonyan & Zisserman,
"Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015; BN from Ioffe &
Szegedy 2015). Residual: the *same* backbone with identity shortcuts around each block (He et al.,
"Deep Residual Learning for Image Recognition", CVPR 2016); where a block changes the width the
shortcut is a 1x1 projection, the only parameters the residual variant adds.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from model_zoo.registry import register_model, require_positive_ints


IMAGE_SIZE = 32  # CIFAR; every data set of data_zoo is decoded to 32x32
MAX_STAGES = IMAGE_SIZE.bit_length()  # 6: five max-pools take 32x32 to 1x1


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution + batch norm (no activation: blocks add it after the shortcut)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    """Two conv-BN layers with ReLU; optional residual shortcut and optional channel attention."""

    def __init__(self, cin: int, cout: int, residual: bool, attention: nn.Module | None = None):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout), conv_bn(cout, cout)
        self.attention = attention or nn.Identity()
        self.residual = residual
        needs_projection = residual and cin != cout
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if needs_projection else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attention(self.conv2(torch.relu(self.conv1(x))))
        if self.residual:
            out = out + self.shortcut(x)
        return torch.relu(out)


class StagedCNN(nn.Module):
    """Stem, then ``len(widths)`` stages of ``blocks_per_stage`` blocks, max-pool between stages."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        residual: bool = False,
        attention: type[nn.Module] | None = None,
    ):
        super().__init__()
        require_positive_ints(blocks_per_stage=blocks_per_stage, lists={"widths": widths})
        if len(widths) > MAX_STAGES:
            raise ValueError(f"widths has {len(widths)} stages, at most {MAX_STAGES}: the max-pool between two stages halves "
                             f"the image, and a {IMAGE_SIZE}x{IMAGE_SIZE} image is one pixel after {MAX_STAGES - 1}")
        self.stem = nn.Sequential(conv_bn(3, widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(blocks_per_stage):
                blocks.append(Block(cin, width, residual, attention(width) if attention else None))
                cin = width
            if i < len(widths) - 1:
                blocks.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))  # global average pool; its backward, unlike CUDA's adaptive pool, is deterministic


PAPER_VGG = "Simonyan & Zisserman, ICLR 2015"
LAST_STAGE = "stages"  # the Grad-CAM target: its output is the last stage's, for any number of widths


@register_model(gradcam_layer=LAST_STAGE, paper=PAPER_VGG)
def plain_cnn(num_classes: int, **kwargs) -> nn.Module:
    """VGG-style plain CNN (the seeds' baseline)."""
    return StagedCNN(num_classes, residual=False, **kwargs)


@register_model(gradcam_layer=LAST_STAGE, paper="He et al., CVPR 2016")
def residual_cnn(num_classes: int, **kwargs) -> nn.Module:
    """``plain_cnn`` with residual connections added and nothing else changed (seed 003)."""
    return StagedCNN(num_classes, residual=True, **kwargs)
