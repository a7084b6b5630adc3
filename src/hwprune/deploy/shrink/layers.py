"""The handlers for torch's own layers: conv, linear, BatchNorm, embedding, RNN input
projections, activations, dropout, pooling and flatten.

Conv and linear layers start new channel classes and take a removed input channel's constant
into their bias where that is exact; a depthwise conv ties each output to its input channel;
other grouped convs remove the same channels from every group. LSTM/GRU/RNN lose input
features (hidden units stay).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, fx, nn

from ...targets import CONV_TYPES, RNN_TYPES
from . import ops
from .channels import ChannelInfo, unknown
from .handlers import (
    ElementwiseHandler,
    LayerCall,
    LayerHandler,
    MixingHandler,
    Narrowing,
    PerChannelHandler,
    Rebuilt,
)
from .norms import LayerNormHandler

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["BUILTIN_HANDLERS", "affine_constants", "fold_constants", "set_bias"]

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, *_AVG_POOLS, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
          nn.AdaptiveMaxPool3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# -- constants and folding, shared by the weighted layers ----------------------------------

def affine_constants(w: Tensor, bias: Tensor | None, in_const: Tensor, padded: bool) -> Tensor:
    """Per output of a conv/linear layer: the constant it outputs, or NaN."""
    k, c = w.shape[0], w.shape[1]
    b = bias.detach().double() if bias is not None else torch.zeros(k, dtype=torch.float64)
    flat = w.detach().double().reshape(k, c, -1).sum(-1)  # (K, C)
    nz = w.reshape(k, c, -1).ne(0).any(-1)
    cin = in_const if len(in_const) == c else unknown(c)
    out = unknown(k)
    for j in range(k):
        used = cin[nz[j]]
        if used.numel() == 0:
            out[j] = b[j]
        elif not used.isnan().any() and (not padded or bool((used == 0).all())):
            # zero padding makes a nonzero constant input vary at the borders
            out[j] = b[j] + (flat[j, nz[j]] * used).sum()
    return out


def fold_constants(info: ChannelInfo | None, keep_in: list[int] | None,
                   column: Callable[[int], Tensor], k: int) -> Tensor | None:
    """Sum over removed input positions with a nonzero constant: value * weight column
    (``column(p)``: ``k`` values); None where there is none."""
    if info is None or keep_in is None:
        return None
    keep = set(keep_in)
    total = torch.zeros(k, dtype=torch.float64)
    hit = False
    for p in range(len(info.slots)):
        v = float(info.const[p])
        col = column(p).double()
        if p in keep or math.isnan(v) or v == 0 or not col.any():
            continue
        total += v * col
        hit = True
    return total if hit else None


def set_bias(new: nn.Module, bias: Tensor | None, fold: Tensor | None,
             keep_out: list[int]) -> bool:
    """``new``'s bias: the kept entries of ``bias`` plus ``fold``; whether a fold went in."""
    if new.bias is None:
        return False
    b = (bias.detach()[keep_out].double() if bias is not None
         else torch.zeros(len(keep_out), dtype=torch.float64))
    if fold is not None:
        b = b + fold[keep_out]
    new.bias.data.copy_(b.to(new.bias.dtype))
    return fold is not None


def _padded(conv: nn.Module) -> bool:
    """Whether zero padding makes a constant input non-constant at the output's borders."""
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return False  # reflect/replicate/circular padding of a constant is that constant
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in pad)


def _all_or(keep: list[int] | None, n: int) -> list[int]:
    return keep if keep is not None else list(range(n))


# -- weighted layers -------------------------------------------------------------------------

class ConvHandler(MixingHandler):
    """Conv1d/2d/3d. A depthwise conv (groups == in_channels) passes its input's classes to
    its outputs. Another grouped conv must keep its groups equal: input channel ``p`` of every
    group is one class (a stripe across the groups), and so is output channel ``q`` of every
    group, so a removal takes the same channel out of each group."""

    def weight(self, layer: nn.Module) -> Tensor:
        return layer.weight

    def output_constants(self, layer: nn.Module, in_const: Tensor) -> Tensor:
        return affine_constants(layer.weight.detach(), layer.bias, in_const, _padded(layer))

    def fold_refusal(self, call: LayerCall, value: float) -> str | None:
        if value == 0:
            return None
        if _grouped(call.layer):
            return (f"its constant enters {call.name}, a grouped conv (groups="
                    f"{call.layer.groups}), whose handler does not fold constants into a bias")
        if not _padded(call.layer):
            return None
        return (f"its constant enters {call.name}, a zero-padded conv: folding it into the "
                "bias would be wrong at the borders")

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        conv, info = call.layer, call.info
        if conv.groups == 1:
            return super().analyse(call, an)
        stopped = an.stopped.get(call.x) if isinstance(call.x, fx.Node) else None
        if info is not None and info.dim != 1:
            self.unsupported_axis(call, an, 1)
            info, stopped = None, an.stopped[call.node]
        if conv.groups == conv.in_channels and info is not None:
            return self._depthwise(conv, info, an)
        if _grouped(conv) and (info is not None or stopped is None):
            return self._grouped(call, an)
        if conv.groups == conv.in_channels and stopped is not None:
            # a depthwise conv would pass its input's classes on: the cause is upstream
            reason = f"{stopped}: the channels {call.name} reads from it are kept"
        else:
            reason = f"{call.name} is a grouped conv (groups={conv.groups}): its channels are kept"
        an.pin_all(call.x, reason)
        # an all-zero filter outputs its bias: listed with the reason it stays
        w, b = conv.weight.detach(), conv.bias
        zero = ~w.reshape(conv.out_channels, -1).ne(0).any(1)
        bias = b.detach().double() if b is not None else torch.zeros(conv.out_channels)
        out = an.fresh(1, conv.out_channels, torch.where(zero, bias, unknown(conv.out_channels)))
        for s in out.slots:
            an.classes.pin(s, reason)
        return out

    def _grouped(self, call: LayerCall, an: Analysis) -> ChannelInfo:
        conv, info, g = call.layer, call.info, call.layer.groups
        w = conv.weight.detach()
        per_in, per_out = conv.in_channels // g, conv.out_channels // g
        if info is not None:
            for p in range(conv.in_channels):  # the stripe: the same channel of every group
                an.classes.union(info.slots[p % per_in], info.slots[p])

            def column(ps: list[int]) -> Tensor:  # input p reaches its own group's outputs
                rows = slice(ps[0] // per_in * per_out, (ps[0] // per_in + 1) * per_out)
                return w[rows, ps[0] % per_in]

            an.read(call.node, call.x, column, lambda v: self.fold_refusal(call, v))
        # an all-zero filter outputs its bias; any other output varies
        zero = ~w.reshape(conv.out_channels, -1).ne(0).any(1)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(
            conv.out_channels, dtype=torch.float64)
        out = an.fresh(1, conv.out_channels, torch.where(zero, bias, unknown(conv.out_channels)))
        for q in range(conv.out_channels):
            an.classes.union(out.slots[q % per_out], out.slots[q])
        return out

    def _depthwise(self, conv: nn.Module, info: ChannelInfo, an: Analysis) -> ChannelInfo:
        # channel multiplier m: output k reads input k // m only, so the input channel and its
        # outputs are one class, removed together
        w, cout, padded = conv.weight.detach(), conv.out_channels, _padded(conv)
        m = cout // conv.in_channels
        slots = [info.slots[k // m] for k in range(cout)]
        const = unknown(cout)
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(cout)
        for k in range(cout):
            v = float(info.const[k // m])
            if not w[k].any():
                const[k] = b[k]
            elif not math.isnan(v) and (v == 0 or not padded):
                const[k] = b[k] + v * w[k].double().sum()
        for s, c in zip(slots, const.tolist(), strict=True):
            if not math.isnan(c):
                an.classes.candidate.add(s)
        return ChannelInfo(1, slots, const)

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        conv, kin = plan.layer, plan.keep_in
        w = conv.weight.detach()
        depthwise = conv.groups > 1 and kin is not None and conv.groups == conv.in_channels
        kin_l, kout_l = _all_or(kin, conv.in_channels), _all_or(plan.keep_out, conv.out_channels)
        if len(kin_l) == conv.in_channels and len(kout_l) == conv.out_channels:
            return None
        if _grouped(conv):
            return _rebuild_grouped(conv, kin_l, kout_l)
        fold = None if depthwise else fold_constants(
            plan.input, kin, lambda p: w[:, p].reshape(w.shape[0], -1).sum(1), w.shape[0])
        new = type(conv)(len(kin_l), len(kout_l), conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation,
                         groups=len(kin_l) if depthwise else 1,
                         bias=conv.bias is not None or fold is not None,
                         padding_mode=conv.padding_mode, dtype=w.dtype, device=w.device)
        new.weight.data.copy_(w[kout_l] if depthwise else w[kout_l][:, kin_l])
        folded = set_bias(new, conv.bias, fold, kout_l)
        return Rebuilt(new, (conv.in_channels, conv.out_channels), (len(kin_l), len(kout_l)),
                       bool(folded))


def _grouped(conv: nn.Module) -> bool:
    """A grouped conv that is not depthwise."""
    return 1 < conv.groups < conv.in_channels


def _rebuild_grouped(conv: nn.Module, kin: list[int], kout: list[int]) -> Rebuilt:
    # the analysis made every removal a stripe: each group keeps the same channels
    g, w = conv.groups, conv.weight.detach()
    local_in = [p for p in kin if p < conv.in_channels // g]
    if len(kin) != g * len(local_in) or len(kout) % g:
        raise AssertionError(f"{conv}: uneven removal across groups")  # a bug, not an input
    new = type(conv)(len(kin), len(kout), conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=g,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w[kout][:, local_in])
    set_bias(new, conv.bias, None, kout)
    return Rebuilt(new, (conv.in_channels, conv.out_channels), (len(kin), len(kout)), False)


class LinearHandler(MixingHandler):
    """nn.Linear, over the last axis; a removed input's constant always folds into the bias."""

    in_dim = out_dim = -1

    def weight(self, layer: nn.Module) -> Tensor:
        return layer.weight

    def output_constants(self, layer: nn.Module, in_const: Tensor) -> Tensor:
        return affine_constants(layer.weight.detach(), layer.bias, in_const, padded=False)

    def fold_refusal(self, call: LayerCall, value: float) -> str | None:
        return None

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        lin = plan.layer
        w = lin.weight.detach()
        kin = _all_or(plan.keep_in, lin.in_features)
        kout = _all_or(plan.keep_out, lin.out_features)
        if len(kin) == lin.in_features and len(kout) == lin.out_features:
            return None
        fold = fold_constants(plan.input, plan.keep_in, lambda p: w[:, p], w.shape[0])
        new = nn.Linear(len(kin), len(kout), bias=lin.bias is not None or fold is not None,
                        dtype=w.dtype, device=w.device)
        new.weight.data.copy_(w[kout][:, kin])
        folded = set_bias(new, lin.bias, fold, kout)
        return Rebuilt(new, (lin.in_features, lin.out_features), (len(kin), len(kout)),
                       bool(folded))


class EmbeddingHandler(LayerHandler):
    """nn.Embedding: its input is indices; its embedding columns are new classes."""

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo:
        return an.fresh(len(call.out_shape()) - 1, call.layer.embedding_dim)

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        emb, kout = plan.layer, plan.keep_out
        if kout is None or len(kout) == emb.embedding_dim:
            return None
        new = copy.deepcopy(emb)
        new.embedding_dim = len(kout)
        new.weight = nn.Parameter(emb.weight.detach()[:, kout].clone())
        return Rebuilt(new, (emb.num_embeddings, emb.embedding_dim),
                       (emb.num_embeddings, len(kout)))


class RNNHandler(LayerHandler):
    """LSTM/GRU/RNN: the first layer's input features can go (and their constants fold into
    its input bias); hidden units stay, so the outputs are not tracked."""

    _INPUT_WEIGHTS = ("weight_ih_l0", "weight_ih_l0_reverse")

    def analyse(self, call: LayerCall, an: Analysis) -> None:
        rnn = call.layer
        ws = [getattr(rnn, n).detach() for n in self._INPUT_WEIGHTS if hasattr(rnn, n)]
        axis = call.in_axis(-1)
        if call.info is not None and call.info.dim != axis:
            self.unsupported_axis(call, an, axis)
            return None
        no_bias = f"{call.name} has no bias to fold a constant into" if not rnn.bias else None
        an.read(call.node, call.x, lambda p: torch.cat([w[:, p] for w in ws]),
                lambda v: no_bias)
        return None

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        rnn, kin = plan.layer, plan.keep_in
        if kin is None or len(kin) == rnn.input_size:
            return None
        new = copy.deepcopy(rnn)
        new.input_size = len(kin)
        folded = False
        for suffix in ("", "_reverse"):
            if not hasattr(rnn, "weight_ih_l0" + suffix):
                continue
            w = getattr(rnn, "weight_ih_l0" + suffix).detach()
            fold = fold_constants(plan.input, kin, lambda p, w=w: w[:, p], w.shape[0])
            setattr(new, "weight_ih_l0" + suffix, nn.Parameter(w[:, kin].clone()))
            if fold is not None:
                b = getattr(rnn, "bias_ih_l0" + suffix).detach()
                setattr(new, "bias_ih_l0" + suffix, nn.Parameter(b + fold.to(b.dtype)))
                folded = True
        new._init_flat_weights()
        return Rebuilt(new, (rnn.input_size, rnn.hidden_size), (len(kin), rnn.hidden_size),
                       folded)


# -- per-channel and elementwise layers ------------------------------------------------------

class BatchNormHandler(PerChannelHandler):
    """BatchNorm1d/2d/3d in eval mode: a per-channel affine map of the running statistics."""

    def constants(self, bn: nn.Module, const: Tensor) -> Tensor:
        n = len(const)
        w = bn.weight.detach().double() if bn.weight is not None else torch.ones(n)
        b = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n)
        if bn.running_mean is None:  # batch statistics even in eval: only a zero scale
            return torch.where(w == 0, b, unknown(n))  # gives a constant
        scale = w / torch.sqrt(bn.running_var.double() + bn.eps)
        return torch.where(w == 0, b, (const - bn.running_mean.double()) * scale + b)

    def narrow(self, bn: nn.Module, keep: Tensor) -> nn.Module:
        new = copy.deepcopy(bn)
        new.num_features = len(keep)
        for name in ("weight", "bias"):
            p = getattr(bn, name)
            if p is not None:
                setattr(new, name, nn.Parameter(p.detach()[keep].clone()))
        for name in ("running_mean", "running_var"):
            b = getattr(bn, name)
            if b is not None:
                setattr(new, name, b[keep].clone())
        return new


class ActivationHandler(ElementwiseHandler):
    """Activations, dropout (the identity in eval mode) and nn.Identity: the module itself
    maps each constant."""

    def constants(self, layer: nn.Module, const: Tensor) -> Tensor:
        with torch.no_grad():
            return layer(const.clone().float()).double()


class PoolHandler(LayerHandler):
    """Max, average and adaptive pooling modules (see ``ops.pool``)."""

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        layer = call.layer
        return ops.pool(an, call.node, call.info, getattr(layer, "padding", 0),
                        getattr(layer, "count_include_pad", True), isinstance(layer, _AVG_POOLS))


class FlattenHandler(LayerHandler):
    """nn.Flatten (see ``ops.flatten``)."""

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        return ops.flatten(an, call.node, call.x, call.info, call.layer.start_dim,
                           call.layer.end_dim)


BUILTIN_HANDLERS: dict[type, LayerHandler] = {
    **{t: ConvHandler() for t in CONV_TYPES},
    nn.Linear: LinearHandler(),
    nn.Embedding: EmbeddingHandler(),
    **{t: RNNHandler() for t in RNN_TYPES},
    **{t: BatchNormHandler() for t in _BATCHNORMS},
    **{t: ActivationHandler() for t in _ACTIVATIONS},
    **{t: PoolHandler() for t in _POOLS},
    nn.Flatten: FlattenHandler(),
    nn.LayerNorm: LayerNormHandler(),
}
