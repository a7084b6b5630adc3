"""How tensor operations (function and method calls in the graph) carry channels.

Ops that keep channels apart (activations, pooling, dropout, flatten, slicing) pass their
input's classes through and map the constants; residual additions merge their operands'
classes; concatenation places its inputs' classes side by side; channel padding (the option-A
shortcut) gives the padded channels classes of their own. A permute moves the channel axis; a
multiply by a per-channel parameter (layer scale) or by a per-channel gate of the same channels
(squeeze-excitation) keeps the classes; a call that is the identity in eval mode (stochastic
depth) passes them through; channel shuffles and ``chunk`` are ``shuffle``'s rules; reading a
size (``x.shape``, ``x.size()``) and arithmetic on sizes touch no channel. Anything else is
``unsupported``: the channels it touches stay.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from . import norms, shuffle
from .channels import ChannelInfo
from .nodes import get_attr, nodes_in, shape_of, where

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["function_call", "method_call", "unary", "pool", "flatten", "is_eval_identity"]

_UNARY_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardtanh, F.mish,
    F.hardsigmoid, torch.relu, torch.sigmoid, torch.tanh, F.dropout, F.dropout2d,
}  # fmt: skip
_DROPOUT = (F.dropout, F.dropout2d)  # the identity in eval mode
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.iadd, torch.add, torch.sub,
           torch.mul, operator.truediv}
_BINARY_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}
_AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, *_AVG_POOL_FUNCTIONS,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool2d}


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    """Argument ``name`` of a call, given by keyword or at position ``i``."""
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def function_call(an: Analysis, node: fx.Node) -> ChannelInfo | None:
    fn, args, kwargs = node.target, node.args, node.kwargs
    x, info = an.input_of(node)
    if _on_scalars(node) or (fn is getattr and args[1:2] in (("shape",), ("ndim",))):
        return None  # sizes and arithmetic on them (x.shape[1] // groups): no channels
    if fn in _UNARY_FUNCTIONS:
        kw = {k: v for k, v in kwargs.items() if k not in ("inplace", "training")}
        return unary(info, lambda t: t if fn in _DROPOUT else fn(t, *args[1:], **kw))
    if fn in _BINARY:
        if kwargs:  # torch.add(x, y, alpha=...) and the like
            an.unsupported(node, f"{fn.__name__} with keyword arguments")
            return None
        fn = operator.add if fn is operator.iadd else fn
        return _binary(an, node, args[0], args[1], fn)
    if fn in _POOL_FUNCTIONS:
        return pool(an, node, info, _arg(node, 3, "padding", 0),
                    _arg(node, 5, "count_include_pad", True), fn in _AVG_POOL_FUNCTIONS)
    if fn is torch.flatten:
        return flatten(an, node, x, info, _arg(node, 1, "start_dim", 0),
                       _arg(node, 2, "end_dim", -1))
    if fn is torch.cat:
        return _cat(an, node, args[0], _arg(node, 1, "dim", 0))
    if fn is F.pad:
        return _pad(an, node, x, info)
    if fn is operator.getitem:
        return _getitem(an, node, info, args[1])
    if fn is F.layer_norm:
        return norms.layer_norm_call(an, node)
    if fn is torch.permute:
        return _permute(an, node, info, _arg(node, 1, "dims", None))
    if fn is torch.chunk and info is not None and shuffle.chunk(
            an, node, info, _arg(node, 1, "chunks", None), _arg(node, 2, "dim", 0)):
        return None  # the pieces have their classes
    if fn is torch.reshape and info is not None and shuffle.channel_shuffle(an, node, x, info):
        return None  # the grid of a channel shuffle: its end has the classes
    if info is not None and is_eval_identity(node, lambda t: fn(t, *args[1:], **kwargs)):
        return ChannelInfo(info.dim, info.slots, info.const)
    an.unsupported(node, f"{getattr(fn, '__name__', fn)}")
    return None


def method_call(an: Analysis, node: fx.Node) -> ChannelInfo | None:
    m = node.target
    x, info = an.input_of(node)
    if m in ("size", "dim"):
        return None
    if m in _UNARY_METHODS:
        return unary(info, lambda t: getattr(t, m)())
    if m in _BINARY_METHODS:
        return _binary(an, node, node.args[0], node.args[1], _BINARY_METHODS[m])
    if m == "flatten":
        return flatten(an, node, x, info, _arg(node, 1, "start_dim", 0),
                       _arg(node, 2, "end_dim", -1))
    if m in ("view", "reshape") and info is not None:
        shape, rest = shape_of(node), node.args[1:]
        if len(rest) == 2 and rest[1] == -1 and len(shape) == 2 and shape_of(x)[0] == shape[0]:
            return flatten(an, node, x, info, 1, -1)
        if shuffle.channel_shuffle(an, node, x, info):
            return None  # the grid of a channel shuffle: its end has the classes
    if m == "chunk" and info is not None and shuffle.chunk(
            an, node, info, _arg(node, 1, "chunks", None), _arg(node, 2, "dim", 0)):
        return None  # the pieces have their classes
    if m == "permute":
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        return _permute(an, node, info, node.kwargs.get("dims", dims))
    if m == "mean" and info is not None:
        dims = _arg(node, 1, "dim", None)
        dims = (dims,) if isinstance(dims, int) else dims
        nd = len(shape_of(x))
        if dims is not None and all(d % nd > info.dim for d in dims):
            # only axes after the channel axis are reduced: its index stays (with or without
            # keepdim)
            return ChannelInfo(info.dim, info.slots, info.const)
    an.unsupported(node, f"method .{m}()")
    return None


def _on_scalars(node: fx.Node) -> bool:
    """Whether ``node`` neither reads nor gives a tensor (Python arithmetic on sizes)."""
    return "tensor_meta" not in node.meta and not any(
        "tensor_meta" in n.meta for n in nodes_in((node.args, node.kwargs)))


def unary(info: ChannelInfo | None, fn: Callable[[Tensor], Tensor]) -> ChannelInfo | None:
    """An elementwise op: classes pass through, each constant becomes ``fn(constant)``."""
    if info is None:
        return None
    with torch.no_grad():
        const = fn(info.const.clone().float()).double()
    return ChannelInfo(info.dim, info.slots, const)


def pool(an: Analysis, node: fx.Node, info: ChannelInfo | None, padding: Any,
         include_pad: bool, avg: bool) -> ChannelInfo | None:
    """Pooling over the spatial axes: classes pass through; averaging in zero padding keeps
    only a zero constant (at the borders the padding is not the constant)."""
    if info is None:
        return None
    if info.dim != 1:
        an.unsupported(node, "a pooling op over the channel axis")
        return None
    pads = padding if isinstance(padding, tuple | list) else (padding,)
    const = info.const
    if avg and include_pad and any(p > 0 for p in pads):
        const = torch.where(const == 0, const, math.nan)
    return ChannelInfo(1, info.slots, const)


def flatten(an: Analysis, node: fx.Node, x: Any, info: ChannelInfo | None, start: int,
            end: int) -> ChannelInfo | None:
    """Flattening axes ``start..end``: a channel that leads them becomes its run of features."""
    if info is None:
        return None
    shape = shape_of(x)
    nd = len(shape)
    start, end = start % nd, end % nd
    if info.dim < start or info.dim > end:
        new_dim = info.dim if info.dim < start else info.dim - (end - start)
        return ChannelInfo(new_dim, info.slots, info.const)
    if info.dim == start:
        rep = math.prod(shape[start + 1:end + 1])
        return ChannelInfo(start, [s for s in info.slots for _ in range(rep)],
                           info.const.repeat_interleave(rep))
    an.unsupported(node, "a flatten that splits the channel axis")
    return None


def is_eval_identity(node: fx.Node, call: Callable[[Tensor], Tensor]) -> bool:
    """Whether ``call`` (the op of ``node``, on its tracked input alone) gives back its input
    unchanged on two random inputs of the traced shape: the identity in eval mode
    (stochastic depth, drop path)."""
    shape = shape_of(node)
    if shape is None or shape != shape_of(node.args[0] if node.args else None):
        return False
    if any(True for _ in nodes_in((node.args[1:], node.kwargs))):
        return False  # it reads another tensor of the graph
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for scale in (1.0, 1e4):
                t = torch.randn(shape, generator=gen) * scale
                out = call(t.clone())
                if not (isinstance(out, Tensor) and out.shape == t.shape and torch.equal(out, t)):
                    return False
    except Exception:  # an op that cannot run on a bare tensor is not the identity
        return False
    return True


def _permute(an: Analysis, node: fx.Node, info: ChannelInfo | None,
             dims: Any) -> ChannelInfo | None:
    """A permute: the channel axis moves to where ``dims`` puts it."""
    if info is None:
        return None
    nd = len(shape_of(node))
    if not (isinstance(dims, tuple | list) and all(isinstance(d, int) for d in dims)):
        an.unsupported(node, "a permute with dimensions computed in the graph")
        return None
    dims = [d % nd for d in dims]
    return ChannelInfo(dims.index(info.dim), info.slots, info.const)


def _channel_gate(a: Any, b: Any, ia: ChannelInfo, ib: ChannelInfo,
                  out_shape: tuple[int, ...]) -> bool:
    """Whether ``a`` and ``b`` share the channel axis and one of them is broadcast over the
    other's other axes (a squeeze-excitation gate, an (N, C, 1, 1) bias)."""
    sa, sb = shape_of(a), shape_of(b)
    if ia.dim != ib.dim or len(ia.slots) != len(ib.slots) or out_shape not in (sa, sb):
        return False
    small = sb if sa == out_shape else sa
    return (small is not None and len(small) == len(out_shape)
            and all(n in (1, m) for n, m in zip(small, out_shape, strict=True)))


def _binary(an: Analysis, node: fx.Node, a: Any, b: Any, fn: Any) -> ChannelInfo | None:
    ia, ib = an.info_of(a), an.info_of(b)
    out_shape = shape_of(node)
    if ia is not None and ib is not None:
        if not _channel_gate(a, b, ia, ib, out_shape):
            an.unsupported(node, "a broadcasting elementwise op")
            return None
        for s, t in zip(ia.slots, ib.slots, strict=True):
            # a residual stream or a channel gate: its channels go together or stay
            an.classes.union(s, t)
        return ChannelInfo(ia.dim, ia.slots, _combine(fn, ia.const, ib.const))
    info, other, swap = (ia, b, False) if ia is not None else (ib, a, True)
    if info is None:
        return None
    vec = other if isinstance(other, int | float) else _per_channel(an, other, info, out_shape)
    if vec is None:
        an.unsupported(node, "an elementwise op with a tensor hwprune cannot follow")
        return None
    const = _combine(fn, vec, info.const) if swap else _combine(fn, info.const, vec)
    return ChannelInfo(info.dim, info.slots, const)


def _combine(fn: Any, a: Tensor | float, b: Tensor | float) -> Tensor:
    """The constants of ``fn(a, b)``; a product with a zero is zero whatever the other is."""
    out = fn(a, b)
    if fn in (operator.mul, torch.mul):
        out = torch.where((torch.as_tensor(a) == 0) | (torch.as_tensor(b) == 0), 0.0, out)
    return out


def _per_channel(an: Analysis, node: Any, info: ChannelInfo,
                 out_shape: tuple[int, ...]) -> Tensor | None:
    """A get_attr tensor that is one value per channel, as float64 (else None)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    # a tensor with one value per channel is followed where narrowing it disturbs no other
    # op: shrink's own buffers and attributes read once (a layer scale); others must
    # broadcast over the channels
    own = an.read_once(node)
    t = get_attr(an.gm, node.target).detach()
    nd = len(out_shape)
    if t.ndim > nd:
        return None
    shape = (1,) * (nd - t.ndim) + tuple(t.shape)
    if any(n != 1 for i, n in enumerate(shape) if i != info.dim):
        return None
    if shape[info.dim] != 1 and not (own and shape[info.dim] == len(info.slots)):
        return None
    return t.reshape(-1).double().expand(len(info.slots)).clone()


def _cat(an: Analysis, node: fx.Node, xs: Sequence[Any], dim: int) -> ChannelInfo | None:
    infos = [an.info_of(x) for x in xs]
    nd = len(shape_of(node))
    if any(i is None for i in infos) or any(i.dim != dim % nd for i in infos):
        an.unsupported(node, "a concatenation off the channel axis or of untracked tensors")
        return None
    return ChannelInfo(dim % nd, [s for i in infos for s in i.slots],
                       torch.cat([i.const for i in infos]))


def _pad(an: Analysis, node: fx.Node, x: Any, info: ChannelInfo | None) -> ChannelInfo | None:
    if info is None:
        return None
    pad = _arg(node, 1, "pad", None)
    mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
    j = len(shape_of(x)) - 1 - info.dim
    left, right = (pad[2 * j], pad[2 * j + 1]) if len(pad) > 2 * j + 1 else (0, 0)
    if left == right == 0:
        return ChannelInfo(info.dim, info.slots, info.const)
    if mode != "constant" or value not in (None, 0, 0.0) or left < 0 or right < 0:
        an.unsupported(node, "a channel pad that is not zero padding")
        return None
    n = len(info.slots)
    out = an.fresh(info.dim, left + n + right)
    out.const[:left] = 0
    out.const[left + n:] = 0
    out.const[left:left + n] = info.const
    for p, s in enumerate(info.slots):
        # the copy of a channel that is zero is the zero the new op writes anyway
        if float(info.const[p]) != 0:
            an.classes.deps[s].append(
                (out.slots[left + p], f"copied by {where(node)} into a channel that stays"))
    return out


def _getitem(an: Analysis, node: fx.Node, info: ChannelInfo | None,
             idx: Any) -> ChannelInfo | None:
    if info is None:
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) <= info.dim:
        if all(isinstance(i, slice) for i in idx):
            return ChannelInfo(info.dim, info.slots, info.const)
    elif (all(isinstance(i, slice) for i in idx[:info.dim + 1])
          and idx[info.dim] == slice(None)):
        return ChannelInfo(info.dim, info.slots, info.const)
    an.unsupported(node, "indexing across the channel axis")
    return None
