"""The small modules that compute a layer's effective weight during pruning.

Each is registered on a weight with ``torch.nn.utils.parametrize``, so the layer's own forward
sees the effective weight and the model's ``state_dict()`` carries the pruning state (masks are
persistent buffers). ``Pruner.finalize()`` bakes the effective weight in and removes them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .structures import Structure

__all__ = ["Mask", "GroupScale", "TiedScale"]


class Mask(nn.Module):
    """``w`` with the weights outside ``mask`` set to zero (gradient zero there too)."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, w: Tensor) -> Tensor:
        # masked_fill, not w * mask: an inf/nan in a pruned weight must not leak through.
        return w.masked_fill(~self.mask, 0.0)


class GroupScale(nn.Module):
    """``Q = alpha ⊙ W`` with one learnable ``alpha`` per group of ``structure`` (PSP).

    Groups whose ``keep`` flag is off are zero in the forward pass. The flag enters through a
    straight-through estimator: the forward value is ``alpha * keep``, the gradient with
    respect to ``alpha`` is that of ``alpha`` itself, i.e. dE/dalpha_i = sum over group i of
    dE/dq * w, also for a group that is off. That lets a pruned group come back when its
    gradient outweighs the decay (the paper's "dynamic" pruning); the pruner decides.
    """

    def __init__(self, structure: Structure, shape: tuple[int, ...], like: Tensor):
        super().__init__()
        self.structure = structure
        self.shape = tuple(shape)
        groups = structure.num_groups(shape)
        self.alpha = nn.Parameter(torch.ones(groups, dtype=like.dtype, device=like.device))
        self.register_buffer("keep", torch.ones(groups, dtype=torch.bool, device=like.device))

    def effective_alpha(self) -> Tensor:
        gated = self.alpha * self.keep
        return self.alpha + (gated - self.alpha).detach()

    def forward(self, w: Tensor) -> Tensor:
        return w * self.structure.expand(self.effective_alpha(), self.shape)


class TiedScale(nn.Module):
    """A second tensor (a bias) scaled by another ``GroupScale``'s single alpha, so that a
    gated module's whole output is ``alpha * f(x)`` (PSP's layer structure)."""

    def __init__(self, gate: GroupScale):
        super().__init__()
        # not a submodule: the gate's alpha must be owned (and optimized, saved) once
        object.__setattr__(self, "gate", gate)

    def forward(self, b: Tensor) -> Tensor:
        return b * self.gate.effective_alpha()
