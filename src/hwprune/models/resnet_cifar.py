"""CIFAR ResNets of He et al. (2016), laid out like akamaster/pytorch_resnet_cifar10.

Module names match that repository (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv,bn}{1,2}``,
``shortcut``, ``linear``) so its public checkpoints load with ``strict=True``. Two departures,
neither visible in the state dict: the option-A shortcut is a named module (``PadShortcut``)
instead of a lambda, and pooling is ``adaptive_avg_pool2d``, so ``torch.fx.symbolic_trace`` works.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.errors import HwpruneError

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "load_pretrained",
    "resnet110",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet_cifar",
]

_SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad ``pad`` channels on each side.

    It has no parameters; it is a module (not a lambda) so tracing and graph analysis can see it.
    """

    def __init__(self, pad: int, stride: int = 2) -> None:
        super().__init__()
        self.pad = pad
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (identity, option A or option B)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                # akamaster pads planes//4 on each side; that fills the channel gap only when
                # the width doubles, which is the only shape change this family makes.
                if in_planes + 2 * (planes // 4) != planes:
                    raise HwpruneError(
                        f"option-A shortcut needs planes == 2 * in_planes, "
                        f"got {in_planes} -> {planes}; use shortcut='B'"
                    )
                self.shortcut = PadShortcut(planes // 4, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """conv-BN-ReLU stem, three stages of BasicBlocks (16/32/64 wide), global pool, linear."""

    def __init__(
        self, num_blocks: tuple[int, int, int], num_classes: int = 10, shortcut: str = "A"
    ) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1, shortcut)
        self.layer2 = self._make_layer(32, num_blocks[1], 2, shortcut)
        self.layer3 = self._make_layer(64, num_blocks[2], 2, shortcut)
        self.linear = nn.Linear(64, num_classes)
        self.apply(kaiming_init)

    def _make_layer(self, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def kaiming_init(m: nn.Module) -> None:
    # As akamaster: kaiming-normal conv and linear weights, PyTorch defaults for the rest.
    if isinstance(m, nn.Conv2d | nn.Linear):
        nn.init.kaiming_normal_(m.weight)


def resnet_cifar(depth: int, num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """A CIFAR ResNet of ``depth`` = 6n+2 layers (20, 32, 44, 56, 110, ...)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise HwpruneError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
            f"got {depth!r}"
        )
    if shortcut not in _SHORTCUTS:
        raise HwpruneError(f"shortcut must be one of {_SHORTCUTS}, got {shortcut!r}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes, shortcut=shortcut)


def resnet20(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (0.27 M parameters with option A)."""
    return resnet_cifar(20, num_classes, shortcut)


def resnet32(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (0.46 M parameters with option A)."""
    return resnet_cifar(32, num_classes, shortcut)


def resnet44(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-44 (0.66 M parameters with option A)."""
    return resnet_cifar(44, num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (0.85 M parameters with option A)."""
    return resnet_cifar(56, num_classes, shortcut)


def resnet110(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-110 (1.7 M parameters with option A)."""
    return resnet_cifar(110, num_classes, shortcut)


_BLOCK_KEY = re.compile(r"^layer([123])\.(\d+)\.")


def _infer_depth(state: Mapping[str, torch.Tensor], path: str) -> int:
    """Depth 6n+2 from the number of blocks per stage (all three stages must agree)."""
    blocks: dict[str, set[int]] = {"1": set(), "2": set(), "3": set()}
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[m.group(1)].add(int(m.group(2)))
    counts = {stage: len(ids) for stage, ids in blocks.items()}
    n = counts["1"]
    if n == 0 or set(counts.values()) != {n}:
        raise HwpruneError(
            f"{path}: expected a CIFAR ResNet state dict with the same number of blocks in "
            f"layer1..layer3, found {counts}"
        )
    return 6 * n + 2


def load_pretrained(path: str | os.PathLike[str], depth: int | None = None) -> CifarResNet:
    """Load an akamaster-style CIFAR ResNet checkpoint into a model in eval mode.

    Accepts ``{'state_dict': ...}`` or a raw state dict; strips DataParallel's ``module.``
    prefix; infers depth, class count and shortcut option from the keys when not given.
    """
    path_s = os.fspath(path)
    try:
        obj = torch.load(path_s, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here (OSError, UnpicklingError, ...)
        raise HwpruneError(f"cannot read {path_s} as a PyTorch checkpoint: {e}") from e
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise HwpruneError(
            f"{path_s}: expected a state dict (or {{'state_dict': ...}}) of name -> tensor, "
            f"got {type(obj).__name__}"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "linear.weight" not in state:
        raise HwpruneError(f"{path_s}: no 'linear.weight' key; not a CIFAR ResNet checkpoint")
    if depth is None:
        depth = _infer_depth(state, path_s)
    shortcut = "B" if any(k.endswith("shortcut.0.weight") for k in state) else "A"
    model = resnet_cifar(depth, num_classes=state["linear.weight"].shape[0], shortcut=shortcut)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HwpruneError(f"{path_s} does not fit a ResNet-{depth} ({shortcut}): {e}") from e
    return model.eval()
