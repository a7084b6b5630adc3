"""What every method that prunes ``structure="map"`` shares: finding the maps' weights.

``MapTargets`` is a mixin for ``Pruner`` subclasses: it traces the model on the method's
``example_inputs`` (``hwprune.deploy.feature_maps``), keeps the maps ``targets=`` allows in
``self.maps`` and makes every weight some map has a member in a target. ``map_scores`` is the
norm of each map over all its members.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..deploy.shrink.maps import ExcludedMap, FeatureMaps, MapGroup, feature_maps
from ..errors import ConfigError, TargetError
from ..structures import FeatureMap, Structure
from ..targets import PRUNABLE_TYPES, Spec, Target, resolve_targets
from .base import PrunedLayer

__all__ = ["MapTargets", "map_scores", "selected_maps"]


class MapTargets:
    """Mixin (before ``Pruner`` in the bases) for methods that prune ``"map"``; the method sets
    ``self.example_inputs`` and ``self.maps = None`` before ``Pruner.__init__``."""

    example_inputs: object
    maps: FeatureMaps | None

    def _prunes_maps(self) -> bool:
        return True

    def _targets(self, model: nn.Module, targets: Spec) -> list[Target]:
        if not isinstance(self.structure, FeatureMap):
            return super()._targets(model, targets)
        if self.example_inputs is None:
            raise ConfigError("structure 'map' needs example_inputs= (a tensor or a tuple of "
                              "the model's inputs): the feature maps are found by tracing")
        self.maps = selected_maps(feature_maps(model, self.example_inputs), model, targets)
        owners = dict(model.named_modules())
        out = []
        for name in self.maps.params():
            module_name, _, param = name.rpartition(".")
            out.append(Target(name, module_name, owners[module_name], param))
        return out

    def _layer_structure(self, shape: tuple[int, ...], name: str) -> Structure:
        if self.maps is None:
            return super()._layer_structure(shape, name)
        # informational (reports): a weight that writes maps is viewed by its filters
        return FeatureMap(min(self.maps.index(name, shape)))


def selected_maps(maps: FeatureMaps, model: nn.Module, targets: Spec) -> FeatureMaps:
    """``maps`` restricted to those whose conv/linear/RNN weights ``targets`` all select."""
    if targets is not None:
        chosen = {t.name for t in resolve_targets(model, targets)}
        weights = {t.name for t in resolve_targets(model, PRUNABLE_TYPES)}
        groups, excluded = [], list(maps.excluded)
        for g in maps.groups:
            left_out = sorted({m.param for m in g.members} & weights - chosen)
            if left_out:
                excluded.append(ExcludedMap(g.where, f"touches {left_out[0]}, which targets= "
                                            "does not select"))
            else:
                groups.append(MapGroup(len(groups), g.where, g.members))
        maps = FeatureMaps(groups, excluded)
    if not maps.groups:
        why = "; ".join(sorted({e.reason for e in maps.excluded})[:4]) or "none found"
        raise TargetError(f"{type(model).__name__} has no feature map that structure 'map' can "
                          f"remove ({why})")
    return maps


def map_scores(maps: FeatureMaps, layers: Mapping[str, PrunedLayer], norm: str,
               weights: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per map (float64, CPU): the L1 or L2 ``norm`` over all its members' entries of
    ``weights`` ({layer name: tensor}), and how many entries they are."""
    n = len(maps.groups)
    total = torch.zeros(n, dtype=torch.float64)
    sizes = torch.zeros(n, dtype=torch.float64)
    for name, layer in layers.items():
        w = weights[name].detach().double().cpu()
        w = w.abs() if norm == "l1" else w.pow(2)
        for axis, idx in maps.index(name, layer.shape).items():
            per = w.movedim(axis, 0).reshape(w.shape[axis], -1)
            on = idx >= 0
            total.index_add_(0, idx[on], per.sum(1)[on])
            sizes.index_add_(0, idx[on], torch.full((int(on.sum()),), float(per.shape[1]),
                                                    dtype=torch.float64))
    return (total if norm == "l1" else total.sqrt()), sizes
