"""ResNet-18 for CIFAR (the common kuangliu/pytorch-cifar layout; DPP's CIFAR-10 experiment).

A 3x3 stem without max-pooling (32x32 inputs), four stages of two ``BasicBlock``s, 64/128/256/512
wide, option-B (1x1 conv + BN) shortcuts where the shape changes, global average pool, linear.
11.2 M parameters for 10 classes. It reuses the CIFAR ResNets' ``BasicBlock``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.models.resnet_cifar import BasicBlock, kaiming_init

__all__ = ["ResNet18Cifar", "resnet18_cifar"]

_WIDTHS = (64, 128, 256, 512)


class ResNet18Cifar(nn.Module):
    """conv3x3(64)-BN-ReLU, four stages of two BasicBlocks, global pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise HwpruneError(f"ResNet-18 needs num_classes >= 1, got {num_classes!r}")
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, stages = 64, []
        for i, width in enumerate(_WIDTHS):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, width, stride, shortcut="B"),
                                        BasicBlock(width, width, 1, shortcut="B")))
            in_planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(_WIDTHS[-1], num_classes)
        self.apply(kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18_cifar(num_classes: int = 10) -> ResNet18Cifar:
    """ResNet-18 for 32x32 inputs (11.2 M parameters with 10 classes)."""
    return ResNet18Cifar(num_classes)
