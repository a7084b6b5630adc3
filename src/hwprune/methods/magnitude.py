"""Magnitude pruning: the baseline every method is compared against.

Groups (of any structure) are ranked by the L1 or L2 norm of their weights and the smallest are
removed, one-shot or gradually (``hwprune.schedules``: Zhu & Gupta's cubic, or linear).

Choices, documented because users compare against them:

* ``sparsity`` is the fraction of *groups* removed (for element structure: of weights). For a
  k-of-n structure it is implied by k and n; passing a different value is an error.
* Layer scope keeps ``floor((1 - sparsity) * groups)`` groups in every layer. Global scope ranks
  all layers' groups together by their norm per weight (L1 / group size, L2 / sqrt(group
  size)), so groups of different sizes compete fairly.
* Every layer keeps at least one group (a layer with nothing left would cut the network),
  except with ``structure="layer"``, where removing the whole layer is the point. In global
  scope each layer's best group is reserved before ranking, so the total is still exact.
* Scores come from the *effective* (already masked) weights, so during a gradual schedule a
  pruned group scores 0 and stays pruned; masks only grow.
* Ties keep the lower group index (a stable sort), so masks are deterministic, which keeps
  distributed ranks identical.
* k-of-n patterns are pruned one-shot (the pattern is exact at every step; there is nothing to
  ramp); a ``schedule`` other than ``OneShot`` is refused for them.
* A structure of whole filters (``"filter"``, ``"k:n@filter"``) masks the layer's bias and
  the BatchNorm directly after it with the filters (``hwprune.methods.filter_maps``), so a
  removed filter's map is exactly zero and ``hp.shrink`` removes it.
* ``structure="map"`` prunes coupled feature maps (``hwprune.deploy.feature_maps``, traced on
  ``example_inputs``): a map's score is the norm over all its members (the filters, biases
  and BatchNorm entries that write it, the input channels that read it), and a removed map
  has every member zeroed, so ``finalize()`` then ``hp.shrink`` remove it whole. "Layer"
  scope removes ``sparsity`` of the maps of each family (the maps that share their weights:
  one layer's outputs, or one residual stream's channels); every family keeps one map.
* ``round_to=m`` (layer scope; whole filters, channels or maps) keeps a multiple of ``m``
  groups in every layer or family that has more than ``m``: the largest multiple not above
  the count ``sparsity`` asks for (at least one multiple), as Torch-Pruning's ``round_to``.
  Vector units and their kernels (onnxruntime's blocked conv layout, SIMD widths) run channel
  counts they divide at full speed and others slower, so the shrunk model is faster at a
  slightly higher sparsity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..deploy.shrink.maps import FeatureMaps
from ..errors import ConfigError
from ..parametrize import Mask
from ..schedules import Cubic, OneShot, Schedule
from ..structures import KofN, Layer, Structure
from ..targets import Spec
from .base import PrunedLayer, Pruner
from .maps import MapTargets, map_scores
from .registry import register_method
from .selection import check_round_to, keep_all_but_lowest

__all__ = ["Magnitude"]

_SCOPES = ("layer", "global")
_NORMS = ("l1", "l2")


def _gradual(structure: str) -> dict:
    return {"structure": structure, "sparsity": 0.5, "schedule": Cubic(0, 6, every=2)}


@register_method(
    configs={**{s: _gradual(s) for s in ("element", "filter", "channel", "kernel", "column",
                                         "layer", "block:2x2", "map")},
             "2:4": {"structure": "2:4"}},
    bad_settings=({"sparsity": 1.0}, {"scope": "everywhere"}, {"norm": "l3"}, {"round_to": 0}),
    recipe="magnitude-digits", doc="magnitude.md")
class Magnitude(MapTargets, Pruner):
    """Prune the groups of smallest norm.

    Args:
        model: the model to prune (modified in place).
        structure: see ``hwprune.structures.parse_structure``.
        sparsity: fraction of groups to remove, in [0, 1); implied for k-of-n.
        schedule: ``None`` prunes once, now; or a ``hwprune.schedules.Schedule`` (``OneShot``
            at a later step, ``Cubic``, ``Linear``), counted in ``step()`` or ``epoch_end()``.
        scope: ``"layer"`` (same sparsity in every layer) or ``"global"``.
        norm: ``"l1"`` or ``"l2"`` norm of each group.
        targets: which weights; see ``hwprune.targets``. With ``"map"``: None prunes every
            map the graph allows; otherwise only maps whose conv/linear weights are all
            selected.
        example_inputs: a tensor or tuple of the model's inputs; needed by ``"map"`` (to
            trace the model), ignored otherwise.
        strict: refuse (``StructureError``) a default target that cannot carry the
            structure instead of leaving it dense with a ``SkippedLayersWarning``.
        round_to: keep a multiple of this many filters, channels or maps in every layer or
            family larger than it (layer scope); 1: no rounding.
    """

    def __init__(self, model: nn.Module, structure: str | Structure = "element",
                 sparsity: float | None = None, schedule: Schedule | None = None,
                 scope: str = "layer", norm: str = "l1", targets: Spec = None,
                 example_inputs: Any = None, strict: bool = False, round_to: int = 1):
        self.final_sparsity = sparsity
        self.round_to = round_to
        self.schedule = schedule if schedule is not None else OneShot()
        self.scope = scope
        self.norm = norm
        self.example_inputs = example_inputs
        self.maps: FeatureMaps | None = None
        super().__init__(model, structure, targets, strict)

    def _check_config(self) -> None:
        if self.scope not in _SCOPES:
            raise ConfigError(f"scope must be one of {_SCOPES}; got {self.scope!r}")
        if self.norm not in _NORMS:
            raise ConfigError(f"norm must be one of {_NORMS}; got {self.norm!r}")
        self._check_round_to()
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(
                "schedule must be None (one-shot now) or a hwprune.schedules.Schedule "
                f"(OneShot, Linear, Cubic); got {self.schedule!r}"
            )
        if isinstance(self.structure, KofN):
            implied = self.structure.sparsity
            if self.final_sparsity is not None and not math.isclose(self.final_sparsity, implied):
                raise ConfigError(
                    f"structure {self.structure} implies sparsity {implied:g}; got sparsity="
                    f"{self.final_sparsity} (leave it out)"
                )
            if self.scope != "layer":
                raise ConfigError(f"scope='global' has no meaning for {self.structure}: "
                                  "k is kept in every run; use scope='layer'")
            if not isinstance(self.schedule, OneShot):
                raise ConfigError(f"{self.structure} is pruned one-shot; use schedule=None "
                                  "or OneShot(at=...)")
            self.final_sparsity = implied
            return
        s = self.final_sparsity
        if s is None:
            raise ConfigError("sparsity is required (the fraction of groups to remove, in [0, 1))")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ConfigError(f"sparsity must be a number in [0, 1); got {s!r}")
        if self.schedule.initial > s:
            raise ConfigError(f"schedule initial sparsity {self.schedule.initial} exceeds "
                              f"sparsity {s}")

    def _check_round_to(self) -> None:
        check_round_to(self.round_to, self.structure)
        if self.round_to > 1 and self.scope != "layer":
            raise ConfigError("round_to applies to scope='layer' (each layer's or family's "
                              "count is rounded); got scope='global'")

    def _make_parametrization(self, layer: PrunedLayer) -> nn.Module:
        w = getattr(layer.module, layer.param)
        return Mask(torch.ones(layer.shape, dtype=torch.bool, device=w.device))

    def _on_attach(self) -> None:
        with torch.no_grad():
            self._maybe_update(0, "step")
            self._maybe_update(0, "epoch")

    def _on_step(self) -> None:
        self._maybe_update(self.steps, "step")

    def _on_epoch_end(self) -> None:
        self._maybe_update(self.epochs, "epoch")

    def _maybe_update(self, t: int, unit: str) -> None:
        if self.schedule.unit == unit and self.schedule.due(t):
            self.prune_to(self.schedule.sparsity(t, self.final_sparsity))

    @property
    def current_target(self) -> float:
        """The sparsity the schedule asks for at the current position."""
        t = self.steps if self.schedule.unit == "step" else self.epochs
        return self.schedule.sparsity(t, self.final_sparsity)

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Recompute every mask so that ``sparsity`` of the groups are removed."""
        if self.maps is not None:
            self._prune_maps(sparsity)
            return
        scores = {n: l.structure.scores(l.effective_weight(), self.norm)
                  for n, l in self.layers.items()}
        if isinstance(self.structure, KofN):
            keeps = {n: self.structure.keep_top(s) for n, s in scores.items()}
        elif self.scope == "layer":
            keeps = {n: keep_all_but_lowest(s, sparsity, self._min_keep(), self.round_to)
                     for n, s in scores.items()}
        else:
            keeps = self._global_keep(scores, sparsity)
        for name, layer in self.layers.items():
            mask = layer.structure.expand(keeps[name].to(torch.float32), layer.shape) > 0.5
            layer.parametrization.mask.copy_(mask)
        self.sync()  # scores are rank-local numbers: every rank takes rank 0's masks

    def _min_keep(self) -> int:
        return 0 if isinstance(self.structure, Layer) else 1

    def _global_keep(self, scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
        sizes = {n: self.layers[n].structure.group_sizes(self.layers[n].shape).to(s)
                 for n, s in scores.items()}
        return _global_keep(scores, sizes, sparsity, self.norm, self._min_keep())

    def _prune_maps(self, sparsity: float) -> None:
        scores, sizes = map_scores(self.maps, self.layers, self.norm,
                                   {n: l.effective_weight() for n, l in self.layers.items()})
        families = {f: torch.tensor(ids) for f, ids in self.maps.families().items()}
        if self.scope == "layer":
            keeps = {f: keep_all_but_lowest(scores[ids], sparsity, 1, self.round_to)
                     for f, ids in families.items()}
        else:
            keeps = _global_keep({f: scores[ids] for f, ids in families.items()},
                                 {f: sizes[ids] for f, ids in families.items()},
                                 sparsity, self.norm, 1)
        keep = torch.ones(len(self.maps.groups), dtype=torch.bool)
        for f, ids in families.items():
            keep[ids] = keeps[f]
        for name, layer in self.layers.items():
            mask = self.maps.mask(name, layer.shape, keep)
            layer.parametrization.mask.copy_(mask.to(layer.parametrization.mask.device))
        self.sync()


def _global_keep(scores: dict[Any, Tensor], sizes: dict[Any, Tensor], sparsity: float,
                 norm: str, min_keep: int) -> dict[Any, Tensor]:
    """Keep-vectors per key, ranking every key's groups together by their norm per weight
    (L1 / size, L2 / sqrt(size)); with ``min_keep`` each key's best group is reserved first,
    so no key is emptied and the global count is still exact."""
    per_weight = {}
    for key, s in scores.items():
        s = s / (sizes[key] if norm == "l1" else sizes[key].sqrt())
        if min_keep:
            s = s.clone()
            s[int(s.argmax())] = torch.inf
        per_weight[key] = s
    flat = torch.cat(list(per_weight.values()))
    keep_flat = keep_all_but_lowest(flat, sparsity, min_keep * len(scores))
    keeps, i = {}, 0
    for key, s in per_weight.items():
        keeps[key] = keep_flat[i:i + s.numel()]
        i += s.numel()
    return keeps
