"""The small modules that compute a layer's effective weight during pruning.

Each is registered on a weight with ``torch.nn.utils.parametrize``, so the layer's own forward
sees the effective weight and the model's ``state_dict()`` carries the pruning state (masks are
persistent buffers). ``Pruner.finalize()`` bakes the effective weight in and removes them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .structures import Structure

__all__ = ["Mask", "GroupScale", "TiedScale", "MapScale", "MapGate", "fake_quantize",
           "keep_only"]

#: the integer type of each float type's size: a float is zeroed by and-ing its bits
_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                  torch.float16: torch.int16, torch.bfloat16: torch.int16}


class _KeepBits(torch.autograd.Function):
    """``w`` and-ed bitwise with ``bits`` (all ones: keep, zero: +0.0); the gradient alike."""

    @staticmethod
    def forward(ctx, w: Tensor, bits: Tensor) -> Tensor:
        ctx.save_for_backward(bits)
        return w.view(bits.dtype).bitwise_and(bits).view(w.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        (bits,) = ctx.saved_tensors
        return _KeepBits.apply(g, bits), None


def keep_only(w: Tensor, keep: Tensor) -> Tensor:
    """``w`` with the entries outside ``keep`` (bool, ``w``'s shape) exactly +0.0, gradient
    zero there too: ``w.masked_fill(~keep, 0.0)``, bit for bit. A float weight is and-ed with
    an integer mask of its size instead: masked_fill branches on every entry and costs many
    times a multiply on a random mask, while ``w * keep`` would let an inf/nan in a pruned
    weight leak through."""
    itype = _SAME_SIZE_INT.get(w.dtype)
    if itype is None:  # other dtypes (complex, integer) have no same-size bit trick here
        return w.masked_fill(~keep, 0.0)
    bits = keep.view(torch.uint8).to(itype).neg_()  # 1 -> all bits set
    return _KeepBits.apply(w, bits)


class Mask(nn.Module):
    """``w`` with the weights outside ``mask`` set to zero (gradient zero there too)."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, w: Tensor) -> Tensor:
        # zeroed, not w * mask: an inf/nan in a pruned weight must not leak through.
        return keep_only(w, self.mask)

    def output_gate(self) -> Tensor:
        """Per output unit (axis 0): whether any of its weights is kept (bool)."""
        return self.mask.reshape(self.mask.shape[0], -1).any(1)


def straight_through_gate(alpha: Tensor, keep: Tensor) -> Tensor:
    """``alpha * keep`` in the forward pass, the gradient of ``alpha`` itself backward."""
    return alpha + (alpha * keep - alpha).detach()


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
        return straight_through_gate(self.alpha, self.keep)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.structure.expand(self.effective_alpha(), self.shape)

    def output_gate(self) -> Tensor:
        """The alphas (one per filter for ``"filter"``; one for ``"layer"``)."""
        return self.effective_alpha()


class TiedScale(nn.Module):
    """A tensor whose entries follow another parametrization's gate of its output units
    (``gate.output_gate()``: a bool keep per unit, or a scale per unit or for all), so that
    a pruned filter takes its bias and the BatchNorm entries after it along (its feature map
    is then zero), and a gated layer's whole output is ``alpha * f(x)`` (PSP's layer
    structure). A bool gate zeroes with ``masked_fill`` (an inf/nan does not leak)."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        # not a submodule: the gate's state must be owned (and optimized, saved) once
        object.__setattr__(self, "gate", gate)

    def forward(self, b: Tensor) -> Tensor:
        g = self.gate.output_gate()
        return b.masked_fill(~g, 0.0) if g.dtype == torch.bool else b * g


class MapScale(nn.Module):
    """PSP's alphas of ``structure="map"``: one per feature map, shared by every weight the
    map has a member in (each weight's ``MapGate`` reads them); ``keep`` as in ``GroupScale``.
    (DPP's sampled map masks are another source with ``effective_alpha()``.)"""

    def __init__(self, maps: int, like: Tensor):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(maps, dtype=like.dtype, device=like.device))
        self.register_buffer("keep", torch.ones(maps, dtype=torch.bool, device=like.device))

    def effective_alpha(self) -> Tensor:
        return straight_through_gate(self.alpha, self.keep)


class MapGate(nn.Module):
    """A weight whose entries along each axis of ``index`` ({axis: long tensor, per entry the
    map it belongs to, -1: none}) are multiplied by their map's value in ``scale`` (a module
    whose ``effective_alpha()`` gives one value per map: PSP's ``MapScale``, DPP's sampled
    masks). The gate of the first weight owns ``scale`` (it is saved and optimized once);
    the others hold it without registering it."""

    def __init__(self, scale: nn.Module, index: dict[int, Tensor], owner: bool):
        super().__init__()
        if owner:
            self.scale = scale
        else:
            object.__setattr__(self, "scale", scale)
        self.axes = tuple(index)
        device = next(scale.parameters()).device
        for axis, idx in index.items():
            self.register_buffer(f"index{axis}", idx.to(device), persistent=False)

    def factor(self, shape: torch.Size) -> Tensor:
        """The product of the alphas over ``shape`` (1 where an entry is in no map)."""
        alpha = self.scale.effective_alpha()
        out = torch.ones((), dtype=alpha.dtype, device=alpha.device)
        for axis in self.axes:
            idx = getattr(self, f"index{axis}")
            a = torch.where(idx >= 0, alpha[idx.clamp(min=0)], torch.ones_like(alpha[:1]))
            view = [1] * len(shape)
            view[axis] = shape[axis]
            out = out * a.reshape(view)
        return out

    def forward(self, w: Tensor) -> Tensor:
        return w * self.factor(w.shape)


def fake_quantize(w: Tensor, bits: int) -> Tensor:
    """Per-tensor symmetric uniform quantization with a straight-through gradient: the value
    takes at most ``2**bits - 1`` levels ``i * scale``; the gradient passes as if unquantized."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax() / qmax
    if scale == 0:
        return w
    q = torch.round(w / scale).clamp(-qmax, qmax) * scale
    return w + (q - w).detach()

