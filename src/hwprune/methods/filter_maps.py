"""What a pruned filter takes with it, so that its feature map is zero wherever it is used.

Filter ``k`` of a conv or linear layer writes the layer's output map ``k``. Zeroing only the
filter does not remove the map: the layer's bias, and a BatchNorm after it, still add their
shift, so the "pruned" map is a constant that shrink cannot remove where the next conv pads.
So for a structure whose groups are whole filters (``"filter"``, ``"k:n@filter"``, DPP's
filter rows) the filter's gate (``output_gate()`` of its parametrization, through
``hwprune.parametrize.TiedScale``) also gates:

* entry ``k`` of the layer's own bias;
* entries ``k`` of the scale and shift of every BatchNorm that **directly follows** the
  layer: a BatchNorm module (a type shrink handles as BatchNorm) every call of which takes
  an output of the layer as its input, found in the graph torch.fx traces.

A pruned map is then exactly zero after the BatchNorm, in training (the batch statistics of
a zero map are zero) and in eval, and ``finalize()`` + ``hp.shrink`` remove the filter, its
BatchNorm entries and the readers' input channels. Nothing else is gated: an op between the
layer and the BatchNorm (a ReLU, a residual add) makes it not "directly" follow, and norms
that mix channels (GroupNorm, LayerNorm) are never gated. A BatchNorm that directly follows
a pruned layer but cannot be gated (it also normalises other tensors, it has no affine
parameters, or the model cannot be traced) is named in an ``UngatedNormWarning``: its
pruned maps carry its shift. ``structure="map"`` gates everything coupled to a map (adds,
concatenations) instead.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..deploy.shrink.layers import BatchNormHandler
from ..deploy.shrink.registry import handler_for, registered_types
from ..errors import ConfigError, StructureError
from ..parametrize import TiedScale
from ..structures import Filter, KofN, Structure

__all__ = ["UngatedNormWarning", "prunes_filters", "writes_filters", "filter_followers",
           "filter_ties", "checked_ties", "attach_ties", "bake_ties"]

_FILTER_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class UngatedNormWarning(UserWarning):
    """BatchNorm layers after pruned filters that are not gated with them, and why."""

    def __init__(self, method: str, reasons: dict[str, str]):
        self.method, self.reasons = method, dict(reasons)
        listed = "; ".join(f"{n}: {why}" for n, why in reasons.items())
        super().__init__(f"{method}: the feature maps of pruned filters keep the shift of "
                         f"{len(reasons)} BatchNorm layer(s) not gated with them ({listed}); "
                         "shrink cannot remove such a map where the next conv pads")


def prunes_filters(structure: Structure) -> bool:
    """Whether ``structure``'s groups are whole filters (output units)."""
    base = structure.base if isinstance(structure, KofN) else structure
    return isinstance(base, Filter)


def writes_filters(structure: Structure, module: nn.Module, param: str) -> bool:
    """Whether pruning ``module.param`` with ``structure`` prunes output maps: whole filters
    of the weight of a conv or linear layer (its axis 0 is the output)."""
    return (prunes_filters(structure) and param == "weight"
            and isinstance(module, _FILTER_LAYERS))


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(handler_for(type(module)), BatchNormHandler)


def filter_followers(model: nn.Module, layers: set[str]
                     ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``({layer module name: the BatchNorm modules that directly follow it}, {BatchNorm
    name: why it is not gated})`` for the module names ``layers``. The model is traced only
    when it has a BatchNorm; it is not modified."""
    modules = dict(model.named_modules())
    if not any(_is_batchnorm(m) for m in modules.values()):
        return {}, {}

    class Tracer(fx.Tracer):  # the layer types shrink was taught are single calls
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, registered_types()) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        return {}, {"every BatchNorm": f"torch.fx cannot trace {type(model).__name__} to find "
                                        f"the BatchNorm after each filter ({e})"}
    sources: dict[str, set[str | None]] = defaultdict(set)  # BatchNorm -> what its calls read
    for node in graph.nodes:
        if node.op == "call_module" and _is_batchnorm(modules[node.target]):
            x = node.args[0] if node.args else None
            read = x.target if isinstance(x, fx.Node) and x.op == "call_module" else None
            sources[node.target].add(read)
    followers: dict[str, list[str]] = defaultdict(list)
    why: dict[str, str] = {}
    for bn, read in sources.items():
        pruned = sorted(r for r in read if r in layers)
        if not pruned:
            continue
        norm = modules[bn]
        if len(read) > 1:
            why[bn] = (f"it also normalises other tensors than {pruned[0]}'s output (each of "
                       "its calls must read the pruned layer)")
        elif getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
            why[bn] = "it has no affine scale and shift to gate (affine=False)"
        else:
            followers[pruned[0]].append(bn)
    return dict(followers), why


def filter_ties(model: nn.Module, layers: Mapping[str, Any], method: str
                ) -> dict[str, list[tuple[nn.Module, str]]]:
    """``{layer name: [(module, tensor name)]}``: for each of ``layers`` (``PrunedLayer``s)
    that prunes whole filters of a conv or linear weight, its bias and the scale and shift
    of the BatchNorm layers that directly follow it (tensors that are targets themselves
    are left to their own gates). Warns (``UngatedNormWarning``) for a BatchNorm that
    directly follows one but cannot be gated."""
    writers = {layer.target.module_name: name for name, layer in layers.items()
               if writes_filters(layer.structure, layer.module, layer.param)}
    if not writers:
        return {}
    followers, why = filter_followers(model, set(writers))
    if why:
        warnings.warn(UngatedNormWarning(method, why), stacklevel=4)
    modules = dict(model.named_modules())
    targets = {(id(layer.module), layer.param) for layer in layers.values()}
    out = {}
    for module_name, name in writers.items():
        tied = [(layers[name].module, "bias")] + [
            (modules[bn], p) for bn in followers.get(module_name, ()) for p in ("weight", "bias")]
        out[name] = [(m, p) for m, p in tied
                     if getattr(m, p, None) is not None and (id(m), p) not in targets]
    return out


def checked_ties(ties: Mapping[str, list[tuple[nn.Module, str]]]
                 ) -> dict[str, list[tuple[nn.Module, str]]]:
    """``ties`` without empty entries; ``StructureError`` if a tied tensor is parametrized
    already (nothing is touched)."""
    for name, tied in ties.items():
        for module, param in tied:
            if parametrize.is_parametrized(module, param):
                raise StructureError(
                    f"{name}: the {param} of {type(module).__name__}, gated with its filters, "
                    "is already parametrized (another pruner?); finalize it first")
    return {name: tied for name, tied in ties.items() if tied}


def attach_ties(ties: Mapping[str, list[tuple[nn.Module, str]]], layers: Mapping[str, Any],
                method: str) -> None:
    """Parametrize every tied tensor with a ``TiedScale`` reading its layer's gate."""
    for name, tied in ties.items():
        gate = layers[name].parametrization
        if not callable(getattr(gate, "output_gate", None)):
            raise ConfigError(f"{name}: {method}'s {type(gate).__name__} has no output_gate(), "
                              "which gating the bias and BatchNorm after a pruned filter reads "
                              "(hwprune.parametrize.TiedScale)")
        for module, param in tied:
            parametrize.register_parametrization(module, param, TiedScale(gate))


def bake_ties(ties: Mapping[str, list[tuple[nn.Module, str]]]) -> None:
    """Replace every tied tensor by its gated value (plain parameters again)."""
    with torch.no_grad():
        for tied in ties.values():
            for module, param in tied:
                parametrize.remove_parametrizations(module, param, leave_parametrized=True)
