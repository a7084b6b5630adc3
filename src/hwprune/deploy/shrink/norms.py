"""LayerNorm in shrink's analysis: the rule for a norm that mixes channels.

A LayerNorm normalises over its last ``len(normalized_shape)`` axes. Where the channel axis
is the one normalised axis (``nn.LayerNorm(C)`` on channels-last data, or ``F.layer_norm`` as
torchvision's ``LayerNorm2d`` calls it), each output depends on every channel through the mean
and the variance: removing a channel changes them (``sum / n`` is not ``sum / (n - 1)``), even
a channel that is exactly zero. So a channel can leave the norm's input only where its value
is a known constant, and the narrowed norm (``NarrowedLayerNorm``) keeps dividing by the
original width with the removed constants' share of the sums added back: the kept outputs are
those of the original norm. The norm's output channel is ``(x - mean) / std * weight +
bias``; with its weight zero it is the constant ``bias``, otherwise it varies, so a consumer
that reads it keeps it. Input and output channel share one class: they go together.

A channel whose input varies stays, with that reason. A norm over more axes than the channel
axis keeps every channel (the channel's entries are spread over the other axes). Where the
channel axis is not normalised (a LayerNorm over the time axis of ``(N, C, T)``), each channel
is normalised on its own and its class passes through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .channels import ChannelInfo, unknown
from .handlers import LayerCall, LayerHandler, Narrowing, Rebuilt
from .nodes import get_attr, shape_of, where

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["LayerNormHandler", "NarrowedLayerNorm", "layer_norm_call", "layer_norm_args",
           "narrowed_layer_norm", "normalises_channels", "loses_channels",
           "rewrite_layer_norm_call", "is_layer_norm_call"]


class NarrowedLayerNorm(nn.Module):
    """A LayerNorm over the last axis of the original width ``width`` that is given only the
    kept channels: the removed ones held the constants ``removed``, which still count in the
    mean and the variance, so every kept output equals the original norm's.

    The constants are put back behind the kept channels and the whole row normalised by one
    ``F.layer_norm`` (the order of a norm's channels does not matter): the original norm's
    own arithmetic, one fused kernel in PyTorch and one LayerNormalization node in ONNX. The
    removed channels' outputs are cut off again (and made contiguous); their weight and bias
    are not stored. Written with padding and slicing by stored sizes, so torch.fx traces it
    (``fold_batchnorm``).
    """

    def __init__(self, width: int, removed: Tensor, weight: Tensor | None, bias: Tensor | None,
                 eps: float):
        super().__init__()
        self.width, self.eps = width, eps
        self.kept, self.gone = width - removed.numel(), removed.numel()
        self.register_buffer("removed", removed.detach().clone())
        self.constants = bool((removed != 0).any())  # zeros: the padding alone puts them back
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        row = F.pad(x, (0, self.gone))
        if self.constants:
            row = row + F.pad(self.removed.to(x.dtype), (self.kept, 0))
        weight = None if self.weight is None else F.pad(self.weight, (0, self.gone), value=1.0)
        bias = None if self.bias is None else F.pad(self.bias, (0, self.gone))
        # contiguous: the consumer (a Linear, or a permute and a conv) then reads the layout
        # the original norm gave it, not a strided slice it would copy or handle more slowly
        out = F.layer_norm(row, (self.width,), weight, bias, self.eps)[..., :self.kept]
        return out.contiguous()

    def extra_repr(self) -> str:
        return f"width={self.width}, removed={self.removed.numel()}, eps={self.eps}"


def normalises_channels(info: ChannelInfo, shape: tuple[int, ...], normalized_ndim: int) -> bool:
    """Whether the channel axis is the one axis a norm over the last ``normalized_ndim`` axes
    normalises."""
    return normalized_ndim == 1 and info.dim % len(shape) == len(shape) - 1


def loses_channels(info: ChannelInfo | None, keep: list[int] | None,
                   shape: tuple[int, ...] | None, normalized_ndim: int) -> bool:
    """Whether a norm over the channels (``normalises_channels``) keeps fewer than all of
    them: only then is it narrowed (a norm over other axes passes channels through as it is)."""
    return (info is not None and keep is not None and shape is not None
            and len(keep) < len(info.slots) and normalises_channels(info, shape, normalized_ndim))


def layer_norm_info(an: Analysis, node: fx.Node, x: fx.Node, info: ChannelInfo | None,
                    normalized_ndim: int, weight: Tensor | None,
                    bias: Tensor | None) -> ChannelInfo | None:
    """The channels of a layer norm's output (module docstring)."""
    shape = shape_of(node)
    if info is None or shape is None:
        return None
    nd = len(shape)
    if info.dim % nd < nd - normalized_ndim:
        return ChannelInfo(info.dim, info.slots, unknown(len(info.slots)))
    name = where(node)
    if not normalises_channels(info, shape, normalized_ndim):
        reason = (f"{name} (LayerNorm) normalises over the channel axis and others: a "
                  "channel's entries are spread over the normalised axes")
        an.pin_all(x, reason)
        out = an.fresh(info.dim, len(info.slots))
        for s in out.slots:
            an.classes.pin(s, reason)
        return out
    for p, s in enumerate(info.slots):
        if an.structural or not bool(info.const[p].isnan()):
            an.classes.candidate.add(s)
        else:
            an.classes.pin(s, f"{name} (LayerNorm) normalises over the channel axis: a "
                              "channel whose input varies counts in the mean and variance "
                              "of the others")
    n = len(info.slots)
    w = torch.ones(n, dtype=torch.float64) if weight is None else weight.detach().double()
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().double()
    return ChannelInfo(info.dim, info.slots, torch.where(w == 0, b, unknown(n)))


def narrowed_layer_norm(keep: list[int], info: ChannelInfo, weight: Tensor | None,
                        bias: Tensor | None, eps: float) -> NarrowedLayerNorm:
    """The norm of the ``keep`` positions of ``info``'s channels (the others' constants kept
    in the sums)."""
    n = len(info.slots)
    idx = torch.tensor(keep, dtype=torch.long)
    gone = torch.tensor(sorted(set(range(n)) - set(keep)), dtype=torch.long)
    dtype = weight.dtype if weight is not None else torch.get_default_dtype()
    return NarrowedLayerNorm(n, info.const[gone].to(dtype),
                             None if weight is None else weight.detach()[idx],
                             None if bias is None else bias.detach()[idx], eps)


def layer_norm_args(gm: nn.Module, node: fx.Node) -> tuple[int, Tensor | None, Tensor | None,
                                                            float, list[fx.Node]]:
    """``F.layer_norm``'s normalised axis count, weight, bias and eps as a traced call gives
    them (the weight and bias read from the graph's attributes), and the attribute nodes."""
    def arg(i: int, name: str, default):
        return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)

    shape = arg(1, "normalized_shape", ())
    attrs = [arg(2, "weight", None), arg(3, "bias", None)]
    tensors = [get_attr(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a
               for a in attrs]
    ndim = len(shape) if isinstance(shape, tuple | list) else 1
    return (ndim, tensors[0], tensors[1], float(arg(4, "eps", 1e-5)),
            [a for a in attrs if isinstance(a, fx.Node)])


def layer_norm_call(an: Analysis, node: fx.Node) -> ChannelInfo | None:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` in the graph: the norm's rule
    where its weight and bias are the model's attributes; otherwise its channels stay."""
    x, info = an.input_of(node)
    ndim, weight, bias, _, attrs = layer_norm_args(an.gm, node)
    if any(a.op != "get_attr" for a in attrs):
        an.unsupported(node, "layer_norm with a computed weight or bias")
        return None
    return layer_norm_info(an, node, x, info, ndim, weight, bias)


def rewrite_layer_norm_call(gm: fx.GraphModule, node: fx.Node, info: ChannelInfo | None,
                            keep: list[int] | None) -> str | None:
    """Replace a traced ``F.layer_norm`` whose channels lost some by a ``NarrowedLayerNorm``
    module (its old weight and bias become dead attributes); the name of the module that
    held them (the call's own name where none did), or None where nothing changes."""
    ndim, weight, bias, eps, attrs = layer_norm_args(gm, node)
    if not loses_channels(info, keep, shape_of(node.args[0]), ndim):
        return None
    owner = attrs[0].target.rpartition(".")[0] if attrs else ""
    name = f"_shrink_layer_norm_{node.name}"
    gm.add_submodule(name, narrowed_layer_norm(keep, info, weight, bias, eps))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return owner or node.name


class LayerNormHandler(LayerHandler):
    """nn.LayerNorm (module docstring)."""

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        layer = call.layer
        return layer_norm_info(an, call.node, call.x, call.info, len(layer.normalized_shape),
                               layer.weight, layer.bias)

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        info, keep = plan.input, plan.keep_in
        if not loses_channels(info, keep, plan.in_shape, len(plan.layer.normalized_shape)):
            return None
        layer, n = plan.layer, len(info.slots)
        new = narrowed_layer_norm(keep, info, layer.weight, layer.bias, layer.eps)
        return Rebuilt(new, (n, n), (len(keep), len(keep)))


def is_layer_norm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.layer_norm
