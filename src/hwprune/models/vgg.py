"""VGG-16 for CIFAR: thirteen 3x3 convs (with BatchNorm) in five pooled stages, then a classifier.

The common CIFAR variant (kuangliu/pytorch-cifar, network slimming): 32x32 inputs reach 1x1 after
the five max-pools, so the classifier sees 512 features. The default classifier is a single
``Linear(512, num_classes)`` (14.7 M parameters); ``classifier="mlp"`` gives the
``Linear(512, 512)-BN-ReLU-Linear(512, num_classes)`` head of Li et al. (2017, "Pruning Filters
for Efficient ConvNets", 15.0 M parameters). The stage layout is kept in ``cfg`` so the width can
be scaled with ``width_mult`` (e.g. 0.125 for fast tests).

Module names: ``features.{i}`` (conv, BN, ReLU, max-pool in order) and ``classifier``
(a Linear, or a Sequential for ``"mlp"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.errors import HwpruneError

__all__ = ["VGG", "VGG16_CFG", "vgg16_cifar"]

# Conv widths in order; "M" is a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

_CLASSIFIERS = ("linear", "mlp")


class VGG(nn.Module):
    """Plain conv stack built from ``cfg``; global average pool; linear (or MLP) classifier.

    The global pool is a no-op for 32x32 inputs (the map is already 1x1) and lets larger inputs
    through without changing the classifier.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        batch_norm: bool = True,
        classifier: str = "linear",
        hidden: int = 512,
    ) -> None:
        super().__init__()
        bad = [
            v for v in cfg if v != "M" and (isinstance(v, bool) or not isinstance(v, int) or v < 1)
        ]
        if bad or not any(v != "M" for v in cfg):
            raise HwpruneError(
                f"VGG cfg must hold conv widths (ints >= 1, at least one) and 'M' (max-pool), "
                f"got {list(cfg)!r}"
            )
        if classifier not in _CLASSIFIERS:
            raise HwpruneError(f"classifier must be one of {_CLASSIFIERS}, got {classifier!r}")
        self.cfg = list(cfg)
        layers: list[nn.Module] = []
        channels = 3
        for v in self.cfg:
            if not isinstance(v, int):  # "M"
                layers.append(nn.MaxPool2d(2))
                continue
            # A conv followed by BN needs no bias (BN's shift replaces it).
            layers.append(nn.Conv2d(channels, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU())
            channels = v
        self.features = nn.Sequential(*layers)
        self.classifier: nn.Module
        if classifier == "linear":
            self.classifier = nn.Linear(channels, num_classes)
        else:
            head: list[nn.Module] = [nn.Linear(channels, hidden)]
            if batch_norm:
                head.append(nn.BatchNorm1d(hidden))
            head += [nn.ReLU(), nn.Linear(hidden, num_classes)]
            self.classifier = nn.Sequential(*head)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


def _init(m: nn.Module) -> None:
    # He init (fan_out) for convs as torchvision's VGG; zero biases; BN keeps weight 1, bias 0.
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


def vgg16_cifar(
    num_classes: int = 10,
    batch_norm: bool = True,
    width_mult: float = 1.0,
    classifier: str = "linear",
) -> VGG:
    """VGG-16 for 3x32x32 inputs; every conv width (and the MLP's hidden width) times
    ``width_mult``, rounded, at least 1.

    14,724,042 parameters at the defaults (10 classes, BN, bias-free convs, linear head);
    14,987,722 with ``classifier="mlp"``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise HwpruneError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not isinstance(batch_norm, bool):
        raise HwpruneError(f"batch_norm must be True or False, got {batch_norm!r}")
    if (
        isinstance(width_mult, bool)
        or not isinstance(width_mult, int | float)
        or not 0 < width_mult < float("inf")
    ):
        raise HwpruneError(f"width_mult must be a finite number > 0, got {width_mult!r}")

    def scale(c: int) -> int:
        return max(1, round(c * width_mult))

    cfg = [scale(v) if isinstance(v, int) else v for v in VGG16_CFG]
    return VGG(cfg, num_classes, batch_norm, classifier, hidden=scale(512))
