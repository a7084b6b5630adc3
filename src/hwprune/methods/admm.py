"""ADMM micro-structured weight unification and pruning (Lin, Jiang, Wang, Xu, Wang, Liu, Li,
2021).

Inside a micro-block all weights share **one magnitude** (signs kept): storage is one value
plus sign bits, and the block's dot product is one multiplication after additions and
subtractions. Pruning is the special case where the shared magnitude is zero. Per layer the
constraint set ``S`` is: a fraction ``unify`` of the blocks unified, a fraction ``zero`` of
them zero, the rest free. Either fraction may be 0, so ``unify=0`` is plain ADMM pruning at
any structure of the structures table (blocks, filters, channels, kernels, elements).

The two phases:

1. **ADMM** (scaled form). Every optimizer step trains ``f(W) + rho/2 ||W - Z + U||^2``
   (``penalty()`` returns the second term, summed over the layers); every ``admm_interval``
   steps ``step()`` does ``Z = project(W + U)``, ``U = U + W - Z`` and grows ``rho`` by
   ``rho_growth`` up to ``rho_max``. ``U`` is the scaled dual (the multiplier over ``rho``),
   so it is rescaled by ``rho_old / rho_new`` whenever ``rho`` changes. ``Z`` starts as
   ``project(W)`` and ``U`` at zero. ``history`` records each round's primal residual
   ``||W - Z||`` (all layers together) right after the ``Z`` update.
2. **Retraining** (``hard_project()``, or automatically at step ``retrain_at``): ``W`` is
   projected onto ``S`` for good (``W`` itself, not ``W + U``) and the pattern is fixed: zero
   blocks stay zero, and each unified block computes with ``sign * m`` where the signs are
   frozen and ``m`` is **one** trainable magnitude per block (a tied weight, in the
   parametrization, returned by ``param_groups``). Its gradient is the sum over the block's
   members of ``dE/dw * sign``. Free blocks train as usual.

``finalize()`` (which calls ``hard_project()`` first if it has not run) bakes in weights that
satisfy the constraint exactly: zero blocks are +0.0 and every weight of a unified block has
bit-for-bit the same magnitude, so ``hp.save`` and the report store such a tensor in the
``unified`` encoding (one magnitude + a sign bit per weight of a unified block).

The projection is exact; see ``hwprune.methods.unify`` for how blocks are assigned when both
fractions are non-zero.

Blocks (``block=``), over the im2col matrix ``W.reshape(K, C*R*S)`` whose columns run (c, r, s):
``(1, b)`` (b consecutive inputs of one filter; the default ``(1, 4)``), ``(b, 1)``, ``(b, b)``,
``(1, R*S)`` (a whole kernel, e.g. ``(1, 9)`` for 3x3 convs) and ``(1, c*R*S)`` (a 3D block of c
channels x the kernel); or any structure of ``hwprune.structures`` except k-of-n
(``"filter"``, ``"channel"``, ``"kernel"``, ``"element"``, ``"block:4x4"``, ...). Where a
block shape does not divide the matrix, the blocks at the ragged edge are smaller (padding in
the group view, not weights): a unified edge block shares one magnitude over its real weights.
A block larger than a layer's matrix is an error naming the layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, StructureError
from ..hardware import FREE, UNIFIED, ZERO, multiplications_saved
from ..structures import Block, KofN, Structure, parse_structure
from ..targets import Spec
from .base import PrunedLayer, Pruner
from .registry import register_method
from .unify import block_counts, project_groups, signs_of

__all__ = ["ADMM", "UnifiedBlocks"]

_PHASES = ("admm", "retrain")


class UnifiedBlocks(nn.Module):
    """The effective weight of a layer under ADMM: ``w`` during the ADMM phase; in the
    retraining phase zero blocks are 0, unified blocks ``signs * magnitude`` (one trainable
    magnitude per block), free blocks ``w``. Carries the ADMM state ``z``, ``u`` as buffers."""

    def __init__(self, structure: Structure, shape: tuple[int, ...], w: Tensor,
                 n_unify: int, n_zero: int):
        super().__init__()
        self.structure, self.shape = structure, tuple(shape)
        self.n_unify, self.n_zero = n_unify, n_zero
        groups = structure.num_groups(shape)
        valid = structure.to_groups(torch.ones(shape, device=w.device)) > 0
        self.register_buffer("valid", valid, persistent=False)  # real weights, not padding
        self.register_buffer("z", torch.zeros_like(w))
        self.register_buffer("u", torch.zeros_like(w))
        # the assignment of the latest Z (ADMM) or the fixed pattern (retraining), per block
        self.register_buffer("states", torch.full((groups,), FREE, dtype=torch.uint8,
                                                  device=w.device))
        # per weight: all FREE during ADMM, so the forward is the identity there
        self.register_buffer("pattern", torch.full(shape, FREE, dtype=torch.uint8,
                                                   device=w.device))
        self.register_buffer("signs", torch.ones_like(w))
        self.magnitude = nn.Parameter(torch.zeros(groups, dtype=w.dtype, device=w.device))
        self.fixed = False  # the pattern is fixed (retraining); set by the pruner

    def project(self, w: Tensor, fixed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(projection of w, block states, block magnitudes)``; ``fixed`` keeps ``states``."""
        out, states, mags = project_groups(self.structure.to_groups(w), self.valid,
                                           self.n_unify, self.n_zero,
                                           self.states if fixed else None)
        return self.structure.from_groups(out, self.shape), states, mags

    def output_gate(self) -> Tensor:
        """Per output unit (axis 0): whether any of its weights is outside the zero blocks
        (all True during ADMM; with ``"filter"``, False for a pruned filter afterwards)."""
        return (self.pattern != ZERO).reshape(self.shape[0], -1).any(1)

    def forward(self, w: Tensor) -> Tensor:
        # the magnitudes take part in both phases (DDP sees no unused parameter); during ADMM
        # the pattern is all FREE and the weight is w, without a pass over it
        if not self.fixed:
            return _Unchanged.apply(w, self.magnitude)
        tied = self.signs * self.structure.expand(self.magnitude, self.shape)
        out = torch.where(self.pattern == UNIFIED, tied, w)
        return out.masked_fill(self.pattern == ZERO, 0.0)


class _Unchanged(torch.autograd.Function):
    """``w`` itself, with ``unused`` (the tied magnitudes) in the graph at a zero gradient:
    what ``w + 0.0 * unused.sum()`` gives the gradients, without its two passes over ``w``."""

    @staticmethod
    def forward(ctx, w: Tensor, unused: Tensor) -> Tensor:
        ctx.unused_shape = unused.shape
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, g.new_zeros(ctx.unused_shape)


class _SquaredDistance(torch.autograd.Function):
    """``||w - z + u||^2`` with the gradient ``2 (w - z + u) g`` into ``w`` (the same bits as
    autograd of the formula), from one saved difference: autograd of ``(w - z + u) ** 2``
    takes a pass for the square, its sum, and two for the power's backward."""

    @staticmethod
    def forward(ctx, w: Tensor, z: Tensor, u: Tensor) -> Tensor:
        d = (w - z).add_(u)
        ctx.save_for_backward(d)
        flat = d.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, g: Tensor):
        (d,) = ctx.saved_tensors
        return d * (2 * g), None, None


#: rho's growth per ADMM round where the length of the ADMM phase is not known
DEFAULT_RHO_GROWTH = 1.3

# two ADMM rounds, then the retraining phase with the pattern fixed
_FAST = {"unify": 0.25, "zero": 0.25, "rho": 0.05, "admm_interval": 2, "retrain_at": 5}


@register_method(
    configs={"block:1x4": {"block": (1, 4), **_FAST},
             **{s: {"block": s, **_FAST} for s in ("element", "filter", "channel", "kernel",
                                                  "column", "block:2x2")},
             # one block per layer: a quarter of it rounds to none, so the whole layer goes
             "layer": {"block": "layer", **_FAST, "unify": 0.0, "zero": 1.0}},
    structure_arg="block",
    bad_settings=({"unify": 1.5}, {"rho": 0.0}, {"admm_interval": 0}),
    recipe="admm-digits", doc="admm.md", steps_arg="admm_steps")
class ADMM(Pruner):
    """Micro-structured weight unification and pruning with ADMM.

    Args:
        model: the model to prune (modified in place).
        block: ``(bh, bw)`` tiles of the im2col matrix (default ``(1, 4)``), or a structure
            (name, ``"block:BHxBW"`` or a ``hwprune.structures`` object; not k-of-n).
        unify: fraction of each layer's blocks to unify, in [0, 1] (default 0.5).
        zero: fraction of each layer's blocks to zero, in [0, 1] (default 0); ``unify + zero``
            at most 1 and not both 0. Counts are ``round(fraction * blocks)`` per layer.
        rho: initial penalty weight, > 0 (default 1e-3).
        rho_growth: factor applied to rho after each ADMM round, >= 1 (default: the factor
            that brings rho to ``rho_max`` at the last round of ``admm_steps``; without
            ``admm_steps``, ``DEFAULT_RHO_GROWTH``).
        rho_max: cap of rho, >= rho (default 1.0).
        admm_interval: optimizer steps per ADMM round (Z and U update), >= 1 (default 100).
        admm_steps: the length of the ADMM phase in optimizer steps, >= 1 (default None:
            not known); ``hwprune run`` passes its pruning phase's.
        retrain_at: step at which ``step()`` calls ``hard_project()`` itself (default None:
            call it yourself).
        targets: which weights; see ``hwprune.targets``.
        strict: refuse (``StructureError``) a default target that cannot carry the
            structure instead of leaving it dense with a ``SkippedLayersWarning``.
    """

    #: the recipe's ADMM phase -> retraining with the pattern (``hard_project`` is
    #: ``fix_pattern`` under ADMM's own name)
    PHASE_HOOKS = ("fix_pattern", "hard_project")

    def __init__(self, model: nn.Module, block: tuple[int, int] | str | Structure = (1, 4),
                 unify: float = 0.5, zero: float = 0.0, rho: float = 1e-3,
                 rho_growth: float | None = None, rho_max: float = 1.0,
                 admm_interval: int = 100, retrain_at: int | None = None,
                 targets: Spec = None, strict: bool = False, admm_steps: int | None = None):
        self.unify, self.zero = unify, zero
        self.rho, self.rho_growth, self.rho_max = rho, rho_growth, rho_max
        self.admm_interval, self.retrain_at = admm_interval, retrain_at
        self.admm_steps = admm_steps
        self.phase = "admm"
        self.rounds = 0
        self.history: list[dict[str, Any]] = []
        super().__init__(model, _parse_block(block), targets, strict)

    # -- construction ---------------------------------------------------------------------
    def _check_config(self) -> None:
        for field in ("unify", "zero"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"{field} must be a fraction of blocks in [0, 1]; got {v!r}")
        if self.unify + self.zero > 1.0 + 1e-9:
            raise ConfigError(f"unify + zero must be at most 1 (the rest of the blocks is free); "
                              f"got unify={self.unify} + zero={self.zero} = "
                              f"{self.unify + self.zero:g}")
        if self.unify == 0 and self.zero == 0:
            raise ConfigError("unify=0 and zero=0 constrain nothing; set unify= (weight "
                              "unification), zero= (ADMM pruning), or both")
        for field, low in (("rho", 0.0), ("rho_max", 0.0)):
            v = getattr(self, field)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or v <= low):
                raise ConfigError(f"{field} must be a finite number > 0; got {v!r}")
        if self.rho_max < self.rho:
            raise ConfigError(f"rho_max ({self.rho_max}) must be >= rho ({self.rho})")
        i = self.admm_interval
        if isinstance(i, bool) or not isinstance(i, int) or i < 1:
            raise ConfigError(f"admm_interval must be an int >= 1 (steps per ADMM round); "
                              f"got {i!r}")
        n = self.admm_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"admm_steps must be None or an int >= 1 (optimizer steps of the "
                              f"ADMM phase); got {n!r}")
        if self.rho_growth is None:
            self.rho_growth = self._fitted_growth()
        g = self.rho_growth
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 1.0 <= g < math.inf:
            raise ConfigError(f"rho_growth must be a finite number >= 1; got {g!r}")
        r = self.retrain_at
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ConfigError(f"retrain_at must be None or a step >= 1; got {r!r}")
        self.rho = float(self.rho)

    def _fitted_growth(self) -> float:
        """The growth that brings rho to ``rho_max`` at the last round of ``admm_steps``
        (without them, ``DEFAULT_RHO_GROWTH``): the leaderboard's best schedule, which keeps
        the task in the loss longest before the penalty's pull dominates (docs/admm.md)."""
        if self.admm_steps is None:
            return DEFAULT_RHO_GROWTH
        rounds = self.admm_steps // self.admm_interval
        return (self.rho_max / self.rho) ** (1 / rounds) if rounds else 1.0

    def _make_parametrization(self, layer: PrunedLayer) -> nn.Module:
        w = getattr(layer.module, layer.param).detach()
        n_unify, n_zero = block_counts(layer.structure.num_groups(layer.shape), self.unify,
                                       self.zero)
        p = UnifiedBlocks(layer.structure, layer.shape, w, n_unify, n_zero)
        with torch.no_grad():
            z, states, _ = p.project(w)
            p.z.copy_(z)
            p.states.copy_(states)
        return p

    # -- the lifecycle hooks --------------------------------------------------------------
    def _method_param_groups(self, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        # the tied magnitudes are weights: the same settings as the model's weights
        return [{**defaults, "params": [l.parametrization.magnitude
                                        for l in self.layers.values()]}]

    def _penalty(self) -> Tensor | None:
        if self.phase != "admm":
            return None
        total = sum(_SquaredDistance.apply(l.original(), l.parametrization.z,
                                           l.parametrization.u) for l in self.layers.values())
        return 0.5 * self.rho * total

    def _on_step(self) -> None:
        if self.phase != "admm":
            return
        if self.retrain_at is not None and self.steps >= self.retrain_at:
            self.hard_project()
        elif self.steps % self.admm_interval == 0:
            self._admm_round()

    def _admm_round(self) -> None:
        residual, norm = 0.0, 0.0
        for layer in self.layers.values():
            p, w = layer.parametrization, layer.original().detach()
            z, states, _ = p.project(w + p.u)
            p.z.copy_(z)
            p.states.copy_(states)
            p.u.add_(w - z)
            residual += float(((w - z) ** 2).sum())
            norm += float((w ** 2).sum())
        self.rounds += 1
        new_rho = min(self.rho * self.rho_growth, self.rho_max)
        for layer in self.layers.values():
            layer.parametrization.u.mul_(self.rho / new_rho)  # the scaled dual follows rho
        self.history.append({"round": self.rounds, "step": self.steps, "rho": self.rho,
                             "residual": math.sqrt(residual),
                             "relative_residual": math.sqrt(residual / norm) if norm else 0.0})
        self.rho = new_rho
        self.sync()  # Z, U and the block states from rank-local weights: rank 0's everywhere

    def _mask(self, layer: PrunedLayer) -> Tensor:
        return layer.parametrization.pattern != ZERO

    def _final_weight(self, layer: PrunedLayer) -> Tensor:
        # + 0.0 turns a -0.0 (a unified block whose magnitude trained to 0) into +0.0
        return layer.effective_weight() + 0.0

    def _layer_extras(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, layer in self.layers.items():
            states = layer.parametrization.states
            sizes = layer.parametrization.valid.sum(1)
            unified, zero = states == UNIFIED, states == ZERO
            out[name] = {
                "block": str(layer.structure),
                "phase": self.phase,
                "unified": float(unified.float().mean()),
                "zero": float(zero.float().mean()),
                "free": float((states == FREE).float().mean()),
                **multiplications_saved(sizes, states, math.prod(layer.shape)),
            }
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"phase": self.phase, "rho": self.rho, "rounds": self.rounds,
                "history": [dict(h) for h in self.history]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("phase") not in _PHASES:
            raise ConfigError(f"ADMM state has phase {state.get('phase')!r}; allowed: {_PHASES}")
        self.phase, self.rho = state["phase"], float(state["rho"])
        self.rounds = int(state["rounds"])
        self.history = [dict(h) for h in state.get("history", [])]
        for layer in self.layers.values():
            layer.parametrization.fixed = self.phase == "retrain"
        self.pattern_fixed = self.phase == "retrain"  # also from states older than the flag

    # -- ADMM itself ----------------------------------------------------------------------
    def hard_project(self) -> None:
        """End the ADMM phase (``fix_pattern()`` under ADMM's name): project every ``W`` onto
        its constraint set for good and fix the pattern (zero blocks stay zero; each unified
        block trains one shared magnitude with frozen signs). Calling it twice is an error."""
        self.fix_pattern()

    def _on_fix_pattern(self) -> None:
        for layer in self.layers.values():
            p, w = layer.parametrization, layer.original()
            projected, states, mags = p.project(w.detach())
            p.states.copy_(states)
            p.pattern.copy_(layer.structure.expand(states.float(), layer.shape).to(torch.uint8))
            p.signs.copy_(signs_of(w))
            p.magnitude.copy_(mags)
            w.copy_(projected)  # the underlying weight agrees with the effective one
            p.fixed = True
        self.phase = "retrain"
        self.sync(weights=True)  # the projection rewrote the weights themselves

    def residual(self) -> float:
        """The primal residual ``||W - Z||`` now, all layers together."""
        with torch.no_grad():
            return math.sqrt(sum(float(((l.original() - l.parametrization.z) ** 2).sum())
                                 for l in self.layers.values()))

    def finalize(self) -> nn.Module:
        """``hard_project()`` if it has not run, then bake the weights in (see ``Pruner``)."""
        self._check_live("finalize")
        if self.phase == "admm":
            self.hard_project()
        return super().finalize()


def _parse_block(block: tuple[int, int] | str | Structure) -> Structure:
    if isinstance(block, (tuple, list)):
        if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                      for b in block):
            raise StructureError(f"block must be (bh, bw) with two positive ints; got {block!r}")
        return Block(int(block[0]), int(block[1]))
    s = parse_structure(block)
    if isinstance(s, KofN):
        raise StructureError(f"ADMM's constraint is fractions of blocks; a k-of-n structure "
                             f"({s}) has no such fraction. Use a block (bh, bw) or one of "
                             "element, filter, channel, kernel, column, layer, 'block:BHxBW'")
    return s
