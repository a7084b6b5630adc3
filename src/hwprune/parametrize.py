"""The small modules that compute a layer's effective weight during pruning.

Each is registered on a weight with ``torch.nn.utils.parametrize``, so the layer's own forward
sees the effective weight and the model's ``state_dict()`` carries the pruning state (masks are
persistent buffers). ``Pruner.finalize()`` bakes the effective weight in and removes them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Mask"]


class Mask(nn.Module):
    """``w`` with the weights outside ``mask`` set to zero (gradient zero there too)."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, w: Tensor) -> Tensor:
        # masked_fill, not w * mask: an inf/nan in a pruned weight must not leak through.
        return w.masked_fill(~self.mask, 0.0)
