"""Choosing which groups survive from one score per group (shared by the methods)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["keep_all_but_lowest"]


def keep_all_but_lowest(scores: Tensor, sparsity: float, min_keep: int) -> Tensor:
    """Bool keep-vector: all but the ``round(sparsity * n)`` lowest scores, keeping at least
    ``min_keep``. Ties keep the lower index (a stable sort), so the choice is deterministic:
    callers that want another tie-break permute the scores first."""
    n = scores.numel()
    remove = min(math.floor(sparsity * n + 0.5), n - min_keep)
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if remove > 0:
        order = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
        keep[order[n - remove:].to(scores.device)] = False
    return keep
