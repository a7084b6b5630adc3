"""DenseNet and DenseNet-BC for CIFAR (Huang et al., 2017, "Densely Connected ConvNets").

Each ``DenseLayer`` returns only its ``growth_rate`` new channels and its ``DenseBlock`` does the
``torch.cat([x, new], 1)``, so a graph tool sees every concatenation as an explicit node (and can
follow which input channels of a later conv come from which earlier layer). Pooling is functional
``adaptive_avg_pool2d`` and dropout is a module, so ``torch.fx.symbolic_trace`` works and the traced
graph still honours ``train()``/``eval()``.

Module names: ``conv1`` (stem), ``block{1,2,3}.layers.{i}.{bn,conv}{1,2}``,
``trans{1,2}.{bn,conv,pool}``, ``bn`` (final), ``linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.errors import HwpruneError

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "DenseTransition",
    "densenet40",
    "densenet_bc",
    "densenet_bc100",
    "densenet_cifar",
]


def _dropout(p: float) -> nn.Module:
    # Identity when off, so the default model has no dropout nodes in its graph.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-conv3x3(k); with ``bottleneck``, BN-ReLU-conv1x1(4k) first.

    Returns only the ``growth_rate`` new feature maps; the block concatenates them.
    """

    def __init__(
        self, in_channels: int, growth_rate: int, bottleneck: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.bn1 = nn.BatchNorm2d(in_channels)
        if bottleneck:
            inner = 4 * growth_rate
            self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
            self.drop1 = _dropout(dropout)
            self.bn2 = nn.BatchNorm2d(inner)
            self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)
            self.drop2 = _dropout(dropout)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)
            self.drop1 = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop1(self.conv1(F.relu(self.bn1(x))))
        if self.bottleneck:
            out = self.drop2(self.conv2(F.relu(self.bn2(out))))
        return out


class DenseBlock(nn.Module):
    """``num_layers`` DenseLayers; each sees the concatenation of the input and all before it."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, dropout)
            for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class DenseTransition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2 between blocks; the conv shrinks channels by ``compression``."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.drop = _dropout(dropout)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.drop(self.conv(F.relu(self.bn(x)))))


class DenseNet(nn.Module):
    """conv3x3 stem, three DenseBlocks joined by DenseTransitions, BN-ReLU, global pool, linear."""

    def __init__(
        self,
        layers_per_block: int,
        growth_rate: int = 12,
        bottleneck: bool = False,
        compression: float = 1.0,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # The paper's stem: 16 channels for DenseNet, twice the growth rate for DenseNet-BC.
        channels = 2 * growth_rate if bottleneck else 16
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.block1 = DenseBlock(layers_per_block, channels, growth_rate, bottleneck, dropout)
        channels = self.block1.out_channels
        out = math.floor(compression * channels)
        self.trans1 = DenseTransition(channels, out, dropout)
        self.block2 = DenseBlock(layers_per_block, out, growth_rate, bottleneck, dropout)
        channels = self.block2.out_channels
        out = math.floor(compression * channels)
        self.trans2 = DenseTransition(channels, out, dropout)
        self.block3 = DenseBlock(layers_per_block, out, growth_rate, bottleneck, dropout)
        channels = self.block3.out_channels
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.trans1(self.block1(out))
        out = self.trans2(self.block2(out))
        out = F.relu(self.bn(self.block3(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _init(m: nn.Module) -> None:
    # As the reference (Lua/Torch) code: He init with fan_out for convs, zero linear bias;
    # BatchNorm keeps PyTorch's defaults (weight 1, bias 0).
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


def densenet_cifar(
    depth: int = 40,
    growth_rate: int = 12,
    bottleneck: bool = False,
    compression: float = 1.0,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> DenseNet:
    """A CIFAR DenseNet of ``depth`` layers: 3n+4 (n layers per block), or 6n+4 with bottleneck.

    ``depth`` counts the stem, the two transitions, the classifier and every conv in the dense
    layers (a bottleneck layer has two), as in the paper.
    """
    if not isinstance(bottleneck, bool):
        raise HwpruneError(f"bottleneck must be True or False, got {bottleneck!r}")
    step = 6 if bottleneck else 3
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < step + 4
        or (depth - 4) % step
    ):
        examples = "10, 16, 22, 40, 100, 190, ..." if bottleneck else "7, 10, 13, 40, 100, ..."
        raise HwpruneError(
            f"DenseNet{'-BC' if bottleneck else ''} depth must be {step}n+4 with n >= 1 "
            f"({examples}), got {depth!r}"
        )
    for name, value in (("growth_rate", growth_rate), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HwpruneError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(compression, bool) or not isinstance(compression, int | float):
        raise HwpruneError(f"compression must be a number in (0, 1], got {compression!r}")
    if not 0 < compression <= 1:
        raise HwpruneError(f"compression must be in (0, 1], got {compression!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise HwpruneError(f"dropout must be a number in [0, 1), got {dropout!r}")
    n = (depth - 4) // step
    # The smallest transition input is the first block's output; it must keep >= 1 channel.
    stem = 2 * growth_rate if bottleneck else 16
    if math.floor(compression * (stem + n * growth_rate)) < 1:
        raise HwpruneError(
            f"compression={compression!r} leaves a transition with no output channels; "
            f"use a larger compression"
        )
    return DenseNet(n, growth_rate, bottleneck, float(compression), num_classes, float(dropout))


def densenet_bc(
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> DenseNet:
    """DenseNet-BC: bottleneck layers and compression 0.5 (depth 6n+4: 100, 190, 250, ...)."""
    return densenet_cifar(depth, growth_rate, True, compression, num_classes, dropout)


def densenet40(num_classes: int = 10, dropout: float = 0.0) -> DenseNet:
    """DenseNet L=40, k=12 (1,019,722 parameters with 10 classes; paper: 1.0 M)."""
    return densenet_cifar(40, 12, False, 1.0, num_classes, dropout)


def densenet_bc100(num_classes: int = 10, dropout: float = 0.0) -> DenseNet:
    """DenseNet-BC L=100, k=12 (769,162 parameters with 10 classes; paper: 0.8 M)."""
    return densenet_bc(100, 12, 0.5, num_classes, dropout)
