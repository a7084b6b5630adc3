"""Choosing which groups survive from one score per group (shared by the methods)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from ..structures import Channel, FeatureMap, Filter, Structure

__all__ = ["keep_all_but_lowest", "kept_count", "check_round_to"]

_TOLERANCE = 1e-9


def check_round_to(round_to: object, structure: Structure) -> None:
    """``round_to`` is a positive int, and above 1 only for whole filters, channels or maps
    (the counts it rounds)."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be a positive int (1: no rounding); got {round_to!r}")
    if round_to > 1 and not isinstance(structure, (Filter, Channel, FeatureMap)):
        raise ConfigError(f"round_to rounds counts of whole filters, channels or maps; "
                          f"structure {structure} has none (use 'filter', 'channel' or 'map', "
                          "or round_to=1)")


def kept_count(n: int, sparsity: float, min_keep: int, round_to: int = 1) -> int:
    """How many of ``n`` groups stay: ``floor((1 - sparsity) * n)``, so at least ``sparsity``
    goes (the convention Torch-Pruning's ratios follow too), but at least ``min_keep``; with
    ``round_to`` > 1 and ``n`` above it, the largest multiple of it not above that count, but
    never less than one multiple: a count the hardware's vector width divides."""
    # The tolerance keeps a product that floats just below an integer (0.7 * 10) on it.
    keep = max(math.floor((1.0 - sparsity) * n + _TOLERANCE), min(min_keep, n))
    if round_to > 1 and n > round_to:
        keep = max(round_to, keep - keep % round_to)
    return keep


def keep_all_but_lowest(scores: Tensor, sparsity: float, min_keep: int,
                        round_to: int = 1) -> Tensor:
    """Bool keep-vector: all but the lowest scores, ``kept_count(n, sparsity, min_keep,
    round_to)`` kept. Ties keep the lower index (a stable sort), so the choice is
    deterministic: callers that want another tie-break permute the scores first."""
    n = scores.numel()
    remove = n - kept_count(n, sparsity, min_keep, round_to)
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if remove > 0:
        order = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
        keep[order[n - remove:].to(scores.device)] = False
    return keep
