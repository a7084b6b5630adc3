"""Coupled feature maps: every weight that writes or reads one channel of the network.

``feature_maps(model, example_inputs)`` runs shrink's channel analysis over the traced graph
in its structural mode (what the graph allows, whatever the weights hold). A channel class is
one feature map: residual additions merge their operands' classes, concatenation places its
inputs' classes side by side, depthwise convs tie each output to its input, other grouped
convs make one map of the same channel in every group, flatten turns a channel into its run
of features. Each map becomes a ``MapGroup`` listing its members: the
producers' filters and biases and the BatchNorm and channel LayerNorm entries that write it
(``writes=True``; a LayerNorm over the channels keeps the removed maps' share of its
statistics, ``norms``), the
consumers' input channels that read it. Zeroing every member zeroes the map everywhere it is
used, so ``shrink`` removes it whole.

A map that cannot be removed is an ``ExcludedMap`` with the analysis' reason: it reaches the
model's output (the logits), is used by an op or a layer shrink does not model, or by a
module called more than once. The network's inputs are not maps (no
layer writes them).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ...errors import StructureError
from ..tracing import trace
from ..verify import example_args
from .analysis import Analysis
from .channels import ChannelInfo
from .layers import BatchNormHandler, ConvHandler, EmbeddingHandler, LinearHandler, RNNHandler
from .nodes import shape_of, where
from .norms import LayerNormHandler, is_layer_norm_call, layer_norm_args, normalises_channels
from .registry import handler_for

__all__ = ["MapMember", "MapGroup", "ExcludedMap", "FeatureMaps", "feature_maps"]


@dataclass(frozen=True)
class MapMember:
    """Entry ``index`` along ``axis`` of parameter ``param``: a filter (axis 0 of a conv or
    linear weight), an entry of a bias or norm, or an input channel (axis 1)."""

    param: str
    axis: int
    index: int
    writes: bool  # True: it computes the map; False: it reads it


@dataclass
class MapGroup:
    """One feature map and its members. ``where``: the first tensor it appears in and its
    position there. ``family``: the parameters its members lie in; the maps of one family
    are alternatives to each other (a layer's outputs, a residual stream's channels)."""

    id: int
    where: tuple[str, int]
    members: list[MapMember]

    @property
    def family(self) -> tuple[str, ...]:
        return tuple(sorted({m.param for m in self.members}))

    @property
    def writers(self) -> list[MapMember]:
        return [m for m in self.members if m.writes]


@dataclass(frozen=True)
class ExcludedMap:
    """A feature map that cannot be removed: where it first appears, and why."""

    where: tuple[str, int]
    reason: str


@dataclass
class FeatureMaps:
    """The removable maps of a model (``groups``) and the others (``excluded``)."""

    groups: list[MapGroup]
    excluded: list[ExcludedMap] = field(default_factory=list)
    _index: dict | None = field(default=None, init=False, repr=False, compare=False)

    def params(self) -> list[str]:
        """Every parameter some group has a member in, in first-seen order."""
        return list(dict.fromkeys(m.param for g in self.groups for m in g.members))

    def families(self) -> dict[tuple[str, ...], list[int]]:
        """{family: the positions in ``groups`` of its maps}."""
        out: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, g in enumerate(self.groups):
            out[g.family].append(i)
        return dict(out)

    def index(self, param: str, shape: tuple[int, ...]) -> dict[int, Tensor]:
        """{axis: long tensor, per entry along the axis the position in ``groups`` of the map
        it belongs to (-1: none)} for ``param`` of ``shape``."""
        if self._index is None:  # one pass over all members, kept: masks ask every step
            self._index = defaultdict(lambda: defaultdict(dict))
            for i, g in enumerate(self.groups):
                for m in g.members:
                    self._index[m.param][m.axis][m.index] = i
        out: dict[int, Tensor] = {}
        for axis, at in self._index.get(param, {}).items():
            idx = torch.full((shape[axis],), -1, dtype=torch.long)
            idx[list(at)] = torch.tensor(list(at.values()), dtype=torch.long)
            out[axis] = idx
        return out

    def mask(self, param: str, shape: tuple[int, ...], keep: Tensor) -> Tensor:
        """Bool tensor of ``shape``: False on the entries of ``param`` that belong to a map
        whose ``keep`` (one bool per group) is False."""
        mask = torch.ones(shape, dtype=torch.bool)
        for axis, idx in self.index(param, shape).items():
            alive = torch.where(idx >= 0, keep[idx.clamp(min=0)], True)
            view = [1] * len(shape)
            view[axis] = shape[axis]
            mask &= alive.reshape(view)
        return mask


def feature_maps(model: nn.Module, example_inputs: Any, *,
                 leaf_modules: tuple[type, ...] = ()) -> FeatureMaps:
    """The coupled feature maps of ``model`` (not modified), traced on ``example_inputs``.

    Raises:
        StructureError: the model cannot be traced with torch.fx, or ``example_inputs`` is
            not a tensor or a tuple of tensors.
    """
    args = example_args(example_inputs, StructureError)
    work = copy.deepcopy(model).eval()  # shape propagation must not touch running statistics
    gm = trace(work, StructureError, leaf_modules=leaf_modules,
               hint="the 'map' structure needs a model torch.fx can trace")
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    an = Analysis(gm, structural=True)
    members = _members(gm, an)
    reasons: dict[int, str] = {}
    for s, why in an.classes.pinned.items():
        reasons.setdefault(an.classes.find(s), why)
    groups, excluded, seen = [], [], set()
    for node, info in an.info.items():
        for p, s in enumerate(info.slots if info is not None else ()):
            root = an.classes.find(s)
            if root in seen:
                continue
            seen.add(root)
            at = (where(node), p)
            found = sorted(set(members.get(root, ())),
                           key=lambda m: (m.param, m.axis, m.index))
            why = reasons.get(root) or _lacks(found)
            if why is not None:
                excluded.append(ExcludedMap(at, why))
            else:
                groups.append(MapGroup(len(groups), at, found))
    return FeatureMaps(groups, excluded)


def _normalised_only(info: ChannelInfo | None, node: fx.Node, normalized_ndim: int) -> bool:
    """Whether a layer norm's weight and bias run along the channel axis (it normalises over
    that axis only); other norms' parameters are not a map's."""
    shape = shape_of(node)
    return (info is not None and shape is not None
            and normalises_channels(info, shape, normalized_ndim))


def _lacks(members: list[MapMember]) -> str | None:
    if not any(m.writes for m in members):
        return "no layer whose weights can be zeroed writes it"
    return None


def _members(gm: fx.GraphModule, an: Analysis) -> dict[int, list[MapMember]]:
    """{class root: its members}, from every module call; a map touched by a module with
    parameters the map structure does not know is pinned in ``an`` with the reason."""
    modules = dict(gm.named_modules())
    out: dict[int, list[MapMember]] = defaultdict(list)

    def add(info: ChannelInfo | None, param: str, axis: int, writes: bool,
            per_group: int | None = None) -> None:
        for p, s in enumerate(info.slots if info is not None else ()):
            index = p if per_group is None else p % per_group
            out[an.classes.find(s)].append(MapMember(param, axis, index, writes))

    for node in gm.graph.nodes:
        if is_layer_norm_call(node):
            ndim, *_, attrs = layer_norm_args(gm, node)
            if _normalised_only(an.info_of(node.args[0]), node, ndim):
                for a in attrs:  # the analysis pinned computed ones
                    add(an.info_of(node), a.target, 0, True)
            continue
        if node.op != "call_module":
            continue
        layer = modules[node.target]
        names = {n for n, p in layer.named_parameters(recurse=False) if p is not None}
        if not names:
            continue
        x = node.args[0] if node.args else None
        inp, outp = an.info_of(x), an.info_of(node)
        handler = handler_for(type(layer))

        def full(n: str, node: fx.Node = node) -> str:
            return f"{node.target}.{n}"

        if isinstance(handler, (ConvHandler, LinearHandler)):
            per_in = None  # a grouped conv's weight holds the input channels of one group
            if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.groups > 1:
                if layer.groups == layer.in_channels:
                    if inp is None:
                        continue  # the analysis pinned it
                    inp = None  # depthwise: its input and output are the same maps
                else:
                    per_in = layer.in_channels // layer.groups
            add(outp, full("weight"), 0, True)
            if "bias" in names:
                add(outp, full("bias"), 0, True)
            add(inp, full("weight"), 1, False, per_in)
        elif isinstance(handler, LayerNormHandler) and _normalised_only(inp, node,
                                                                       len(layer.normalized_shape)):
            for n in ("weight", "bias"):
                if n in names:
                    add(outp, full(n), 0, True)
        elif isinstance(handler, BatchNormHandler):
            for n in ("weight", "bias"):
                if n in names:
                    add(outp, full(n), 0, True)
        elif isinstance(handler, EmbeddingHandler):
            add(outp, full("weight"), 1, True)
        elif isinstance(handler, RNNHandler):
            for n in ("weight_ih_l0", "weight_ih_l0_reverse"):
                if n in names:
                    add(inp, full(n), 1, False)
        else:
            why = (f"touched by {node.target} ({type(layer).__name__}), whose parameters the "
                   "map structure does not know")
            for info in (inp, outp):
                for s in info.slots if info is not None else ():
                    an.classes.pin(s, why)
    return out
