"""Small models for fast experiments: digits CNN, LeNet-5 and an MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hwprune.errors import HwpruneError

__all__ = ["MLP", "LeNet5", "SmallCNN"]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """CNN for 1x8x8 digits; conv2/conv3 and fc1 are prunable middle layers.

    conv(1->w)-BN-ReLU, conv(w->2w)-BN-ReLU, maxpool 2, conv(2w->2w)-BN-ReLU,
    flatten, linear(2w*4*4 -> 64)-ReLU, linear(64 -> num_classes).
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if width < 1 or num_classes < 1:
            raise HwpruneError(
                f"SmallCNN needs width >= 1 and num_classes >= 1, got {width}, {num_classes}"
            )
        self.conv1 = _conv_bn_relu(1, width)
        self.conv2 = _conv_bn_relu(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = _conv_bn_relu(2 * width, 2 * width)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * 4 * 4, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.pool(self.conv2(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28: conv6(5x5, pad 2)-pool-conv16(5x5)-pool-fc120-fc84-fc10, ReLU.

    The padding of 2 gives the classic 16x5x5 feature map (the original took 32x32 inputs).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc3(self.relu(self.fc2(x)))


class MLP(nn.Module):
    """Flatten, then Linear-ReLU per hidden width, then a Linear classifier (``net``)."""

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (300, 100), num_classes: int = 10
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        if any(w < 1 for w in widths) or num_classes < 1:
            raise HwpruneError(
                f"MLP sizes must be >= 1, got in_features={in_features}, hidden={tuple(hidden)}, "
                f"num_classes={num_classes}"
            )
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
