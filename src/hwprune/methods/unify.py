"""The exact Euclidean projection onto ADMM's micro-structured constraint set.

The set ``S(n_unify, n_zero)`` over the blocks (groups) of a weight: exactly ``n_unify`` blocks
*unified* (every real weight has one shared magnitude ``s >= 0``, signs free), exactly
``n_zero`` blocks *zero*, the rest *free*. Projecting ``V`` (``W + U`` in ADMM) onto it:

* a free block costs nothing (it stays ``V``);
* the best unified value of a block is ``s = mean |V|`` over its real weights with signs
  ``sign(V)`` (a zero counts as +): its error is ``eu = sum (|V| - s)^2``;
* zeroing costs ``ez = sum V^2`` (>= ``eu``: zero is the unified value ``s = 0``).

So the projection is the assignment of blocks to the three classes, with the given counts,
that minimises the summed error. With only one of the counts non-zero it is a sort (the
smallest errors win). With both, take ``d = ez - eu`` (what zeroing costs beyond unifying):
swapping a zero block i with a unified block j changes the cost by ``d_j - d_i``, so some
optimum has every zero block before every unified block in the order of increasing ``d``.
For each split point ``t`` of that order, the best choice is then the ``n_zero`` smallest
``ez`` among the first ``t`` blocks and the ``n_unify`` smallest ``eu`` among the rest; two
heap sweeps give these sums for every ``t`` in O(n log n), and the best ``t`` is the exact
projection (ties go to the lower block index, so it is deterministic).
"""

from __future__ import annotations

import heapq
import math

import torch
from torch import Tensor

from ..hardware import FREE, UNIFIED, ZERO
from ..structures import Structure

#: the block states are ``hwprune.hardware``'s (shared with the storage's ``unified`` encoding)
__all__ = ["ZERO", "UNIFIED", "FREE", "block_counts", "block_errors", "assign_blocks",
           "project_groups", "project"]


def block_counts(num_blocks: int, unify: float, zero: float) -> tuple[int, int]:
    """``(n_unify, n_zero)``: each fraction of ``num_blocks`` rounded half up; if rounding
    makes them exceed ``num_blocks``, the unified count gives way."""
    n_zero = min(math.floor(zero * num_blocks + 0.5), num_blocks)
    n_unify = min(math.floor(unify * num_blocks + 0.5), num_blocks - n_zero)
    return n_unify, n_zero


def signs_of(v: Tensor) -> Tensor:
    """+1 / -1 per element, with +1 for a zero (a unified block has no zero member)."""
    return torch.where(v < 0, -1.0, 1.0).to(v.dtype)


def block_errors(groups: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per block of ``groups`` (``(blocks, size)``; ``valid`` marks real weights, the rest is
    padding): the unified magnitude ``s``, the error of unifying ``eu`` and of zeroing ``ez``
    (float64, so the ranking does not depend on the weights' dtype)."""
    g = groups.double().abs() * valid
    count = valid.sum(1).clamp_min(1).double()
    s = g.sum(1) / count
    eu = ((g - s[:, None]) ** 2 * valid).sum(1)
    ez = (g ** 2).sum(1)
    return s, eu, ez


def _smallest(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` smallest values (ties: lower index)."""
    return torch.sort(values, stable=True).indices[:k]


def _running_k_smallest_sums(values: list[float], k: int) -> list[float]:
    """``out[t]`` = sum of the ``k`` smallest of ``values[:t]`` for t = 0..n (inf if t < k)."""
    out = [math.inf] * (len(values) + 1)
    if k == 0:
        return [0.0] * (len(values) + 1)
    heap: list[float] = []  # max-heap (negated) of the k smallest so far
    total = 0.0
    for t, v in enumerate(values, start=1):
        if len(heap) < k:
            heapq.heappush(heap, -v)
            total += v
        elif v < -heap[0]:
            total += v + heapq.heapreplace(heap, -v)  # adds v, removes the largest kept
        if len(heap) == k:
            out[t] = total
    return out


def assign_blocks(eu: Tensor, ez: Tensor, n_unify: int, n_zero: int) -> Tensor:
    """The state (``ZERO``, ``UNIFIED``, ``FREE``) of every block in the minimum-error
    assignment with exactly ``n_unify`` unified and ``n_zero`` zero blocks."""
    n = eu.numel()
    if n_unify + n_zero > n or min(n_unify, n_zero) < 0:
        raise ValueError(f"cannot assign {n_unify} unified and {n_zero} zero of {n} blocks")
    states = torch.full((n,), FREE, dtype=torch.uint8)
    if n_unify == 0 or n_zero == 0:
        if n_zero:
            states[_smallest(ez, n_zero)] = ZERO
        if n_unify:
            states[_smallest(eu, n_unify)] = UNIFIED
        return states
    order = torch.sort(ez - eu, stable=True).indices
    ez_o, eu_o = ez[order].tolist(), eu[order].tolist()
    # zero blocks from the first t of the order, unified blocks from the rest
    zero_cost = _running_k_smallest_sums(ez_o, n_zero)
    unify_cost = _running_k_smallest_sums(eu_o[::-1], n_unify)[::-1]
    best_t = min(range(n_zero, n - n_unify + 1), key=lambda t: (zero_cost[t] + unify_cost[t], t))
    head, tail = order[:best_t], order[best_t:]
    states[head[_smallest(ez[head], n_zero)]] = ZERO
    states[tail[_smallest(eu[tail], n_unify)]] = UNIFIED
    return states


def project_groups(groups: Tensor, valid: Tensor, n_unify: int, n_zero: int,
                   states: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Project a group view onto the constraint set.

    Returns ``(projected groups, states, magnitudes)``: ``magnitudes`` is the shared value of
    each block (meaningful where unified). With ``states`` given, the assignment is kept and
    only the values are projected (the retraining phase's fixed pattern).
    """
    s, eu, ez = block_errors(groups, valid)
    if states is None:
        states = assign_blocks(eu, ez, n_unify, n_zero)
    states = states.to(groups.device)
    mags = s.to(groups.dtype)
    unified = mags[:, None] * signs_of(groups) * valid
    out = torch.where((states == UNIFIED)[:, None], unified, groups)
    out = out.masked_fill((states == ZERO)[:, None], 0.0)
    return out, states, mags


def project(w: Tensor, structure: Structure, unify: float, zero: float) -> Tensor:
    """``w`` projected onto its layer's constraint set (fractions of ``structure``'s blocks)."""
    groups = structure.to_groups(w)
    valid = structure.to_groups(torch.ones_like(w)) > 0
    n_unify, n_zero = block_counts(groups.shape[0], unify, zero)
    out, _, _ = project_groups(groups, valid, n_unify, n_zero)
    return structure.from_groups(out, w.shape)
