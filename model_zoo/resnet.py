"""ResNet-18 adapted to 32x32 CIFAR images.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016. The ImageNet stem
(7x7 stride-2 conv + max-pool) is replaced by a 3x3 stride-1 conv, so the four stages see 32, 16,
8 and 4 pixels (as in kuangliu/pytorch-cifar): 11,173,962 parameters at 10 classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from model_zoo.registry import register_model, require_positive_ints


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or strided 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages of ``BasicBlock``s, global pool, linear head."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._stage(width, num_blocks[0], 1)
        self.layer2 = self._stage(width * 2, num_blocks[1], 2)
        self.layer3 = self._stage(width * 4, num_blocks[2], 2)
        self.layer4 = self._stage(width * 8, num_blocks[3], 2)
        self.linear = nn.Linear(width * 8, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean(dim=(2, 3)))  # global average pool; its backward, unlike CUDA's adaptive pool, is deterministic


@register_model(gradcam_layer="layer4", paper="He et al., CVPR 2016")
def resnet18(num_classes: int, width: int = 64) -> nn.Module:
    """ResNet-18 for 32x32 inputs (layer4 is 4x4; choose layer3 for 8x8 Grad-CAM maps)."""
    require_positive_ints(width=width)
    return ResNet([2, 2, 2, 2], num_classes, width)
