"""Shrink: a physically smaller model with the same function.

``shrink(model, example_inputs)`` removes the channels, filters and whole layers that are
entirely zero, following how tensors really flow: the model is traced with ``torch.fx`` and
every tensor's channel axis is labelled, position by position, with a *channel class*. Ops that
keep channels apart (BatchNorm, activations, pooling, dropout, depthwise convs, flatten) pass the
labels through; residual additions merge the labels of their operands (a channel of a residual
stream is one class across every producer and consumer); concatenation places its inputs'
labels side by side; a channel-padding op (the option-A shortcut of CIFAR ResNets) copies input
channels into output channels of their own class. Conv, Linear, Embedding and LSTM layers start
new classes.

A class is removed when every place that reads it agrees: the reading layer's weights for it are
all zero, or the channel carries a known constant (a zero filter followed by BatchNorm's shift,
say) that can be folded exactly into the reader's bias. Folding into a convolution with zero
padding is exact only for a constant of zero (at the borders the padding is not the constant),
so such channels stay. A channel that reaches the model's output, an op hwprune does not model,
or a module called more than once stays too, and the result says which and why. A residual
branch whose output is entirely constant (its last conv all zero, or its BatchNorm's scale zero)
is replaced by adding that constant; a DenseNet layer whose output channels all go is dropped
from its concatenation.

The rewritten model is in eval mode (constants are folded with BatchNorm's running statistics,
so the function preserved is the inference function). Where only layers were narrowed it is an
instance of the input model's own class with the narrowed layers in place; where the graph had
to change (padding, a branch or a concatenated layer gone, a folded constant) it is a
``torch.fx.GraphModule``, whose calls cost some overhead at batch 1. Its
outputs are compared with the input model's on ``example_inputs`` before it is returned; a
difference beyond tolerance raises ``ShrinkError`` instead of returning a wrong model. The input
model is never modified.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import HwpruneError
from ..targets import CONV_TYPES, LINEAR_TYPES, RNN_TYPES

__all__ = ["ChannelMap", "ShrinkError", "ShrinkResult", "shrink"]


class ShrinkError(HwpruneError):
    """The model cannot be traced, or the shrunk model would not compute the same function."""


class ChannelMap(nn.Module):
    """``out[:, dst[i]] = x[:, src[i]]``, every other output channel zero (along ``dim``).

    Takes the place of a channel-padding op (option-A shortcut) when the channels it copies and
    the channels it pads were not removed in one contiguous run.
    """

    def __init__(self, src: Sequence[int], dst: Sequence[int], out_channels: int, dim: int = 1):
        super().__init__()
        self.register_buffer("src", torch.tensor(list(src), dtype=torch.long))
        self.register_buffer("dst", torch.tensor(list(dst), dtype=torch.long))
        self.out_channels = out_channels
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        shape = list(x.shape)
        shape[self.dim] = self.out_channels
        out = x.new_zeros(shape)
        return out.index_copy(self.dim, self.dst, x.index_select(self.dim, self.src))

    def extra_repr(self) -> str:
        return f"copies {len(self.src)} of {self.out_channels} channels"


@dataclass
class KeptChannels:
    """Channels that are zero somewhere (or carry a constant) but stay, and why."""

    where: str
    channels: list[int]
    reason: str


@dataclass
class ShrinkResult:
    """What ``shrink(..., return_result=True)`` gives back.

    ``layers``: per rewritten module, its channel counts ``(in, out)`` before and after.
    ``kept``: channel groups that were candidates for removal (zero weights or a constant value
    somewhere) but stay, with the reason. ``folded``: layers whose bias took a removed channel's
    constant. ``branches``: additions whose operand was entirely constant and was replaced by
    that constant (a residual branch that is gone). ``max_abs_diff``: the verification on
    ``example_inputs``.
    """

    model: nn.Module
    params_before: int
    params_after: int
    layers: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=dict)
    kept: list[KeptChannels] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0

    def summary(self) -> str:
        lines = [f"params {self.params_before:,} -> {self.params_after:,}; "
                 f"max |diff| on the example inputs {self.max_abs_diff:.2e}"]
        for name, (before, after) in self.layers.items():
            if before != after:
                lines.append(f"  {name}: in/out {before[0]}/{before[1]} -> {after[0]}/{after[1]}")
        lines += [f"  branch {b}: replaced by its constant" for b in self.branches]
        lines += [f"  folded a removed constant channel into {f}'s bias" for f in self.folded]
        lines += [f"  kept {k.where} channels {k.channels}: {k.reason}" for k in self.kept]
        return "\n".join(lines)


# -- op tables ------------------------------------------------------------------------------

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_UNARY_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardtanh, F.mish,
    F.hardsigmoid, torch.relu, torch.sigmoid, torch.tanh, F.dropout, F.dropout2d,
}  # fmt: skip
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.iadd, torch.add, torch.sub,
           torch.mul, operator.truediv}
_BINARY_METHODS = {"add", "sub", "mul"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                   F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, F.adaptive_max_pool2d}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# -- channel classes ------------------------------------------------------------------------

@dataclass
class _Info:
    """A tensor's channel axis: ``dim``, a class per position, a constant per position (NaN:
    varies with the input)."""

    dim: int
    slots: list[int]
    const: Tensor  # float64, one value per position


class _Classes:
    """Union-find over channel classes, with the reasons that pin a class in place."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: dict[int, str] = {}
        self.candidate: set[int] = set()  # zero weights or a constant somewhere: worth listing
        self.deps: dict[int, list[tuple[int, str]]] = defaultdict(list)

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a

    def pin(self, s: int, reason: str) -> None:
        self.pinned.setdefault(s, reason)  # raw ids; resolved to roots in solve()

    def solve(self) -> tuple[set[int], dict[int, str]]:
        """Roots removed, and the first reason of each pinned root (a greatest fixpoint)."""
        reasons: dict[int, str] = {}
        for s, why in self.pinned.items():
            reasons.setdefault(self.find(s), why)
        deps: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for s, targets in self.deps.items():
            deps[self.find(s)] += [(self.find(t), why) for t, why in targets]
        changed = True
        while changed:
            changed = False
            for s, targets in deps.items():
                if s in reasons:
                    continue
                for t, why in targets:
                    if t in reasons:
                        reasons[s] = why
                        changed = True
                        break
        roots = {self.find(s) for s in range(len(self.parent))}
        return roots - set(reasons), reasons


def _nan(n: int) -> Tensor:
    return torch.full((n,), math.nan, dtype=torch.float64)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _padded(conv: nn.Module) -> bool:
    """Whether zero padding makes a constant input non-constant at the output's borders."""
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return False  # reflect/replicate/circular padding of a constant is that constant
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in pad)


class _Analysis:
    """Channel classes, constants and the conditions for removal, over one traced graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.cls = _Classes()
        self.info: dict[fx.Node, _Info | None] = {}
        calls = defaultdict(int)
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] += 1
        self.shared = {t for t, c in calls.items() if c > 1
                       and any(True for _ in self.modules[t].parameters())}
        for node in gm.graph.nodes:
            self.info[node] = self._visit(node)

    # -- helpers --------------------------------------------------------------------------
    def pin_all(self, value: Any, reason: str, candidate: bool = False) -> None:
        for n in _nodes_in(value):
            info = self.info.get(n)
            if info is not None:
                for s in info.slots:
                    self.cls.pin(s, reason)
                    if candidate:
                        self.cls.candidate.add(s)

    def fresh(self, dim: int, n: int, const: Tensor | None = None) -> _Info:
        return _Info(dim, self.cls.new(n), _nan(n) if const is None else const)

    def read(self, node: fx.Node, x: Any, weight_cols: Callable[[list[int]], Tensor],
             fold_ok: Callable[[float], str | None]) -> None:
        """A weighted layer reads ``x``: a class it reads with nonzero weights stays unless its
        constant can be folded (``fold_ok(value)`` is None) into the layer's bias."""
        info = self.info.get(x) if isinstance(x, fx.Node) else None
        if info is None:
            return
        for p, s in enumerate(info.slots):
            if not bool(weight_cols([p]).any()):
                self.cls.candidate.add(s)
                continue
            v = float(info.const[p])
            if math.isnan(v):
                self.cls.pin(s, f"{_where(node)} reads it with nonzero weights")
                continue
            self.cls.candidate.add(s)
            why = fold_ok(v)
            if why is not None:
                self.cls.pin(s, why)

    # -- the transfer functions ------------------------------------------------------------
    def _visit(self, node: fx.Node) -> _Info | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.pin_all(node.args, "reaches the model's output")
            return None
        if node.op == "call_module":
            mod = self.modules[node.target]
            if node.target in self.shared:
                self.pin_all(node.args, f"module {node.target} is called more than once")
                out = self._module(node, mod)
                if out is not None:
                    for s in out.slots:
                        self.cls.pin(s, f"module {node.target} is called more than once")
                return out
            return self._module(node, mod)
        if node.op == "call_function":
            return self._function(node, node.target, node.args, node.kwargs)
        if node.op == "call_method":
            return self._method(node)
        self.pin_all((node.args, node.kwargs), f"unsupported op {node.op} {node.target}")
        return None

    def _x(self, node: fx.Node) -> tuple[Any, _Info | None]:
        x = node.args[0] if node.args else None
        return x, (self.info.get(x) if isinstance(x, fx.Node) else None)

    def _unsupported(self, node: fx.Node, what: str) -> None:
        # listed in the result even where nothing is zero: the user should know what was
        # not analysed
        self.pin_all((node.args, node.kwargs), f"used by {what} ({_where(node)}), which shrink "
                     "does not model", candidate=True)

    def _module(self, node: fx.Node, mod: nn.Module) -> _Info | None:
        x, info = self._x(node)
        shape = _shape(node)
        if isinstance(mod, CONV_TYPES):
            return self._conv(node, mod, x, info)
        if isinstance(mod, LINEAR_TYPES):
            if info is not None and info.dim != len(_shape(x)) - 1:
                self._unsupported(node, "a Linear over a non-channel axis")
                info = None
            else:
                w = mod.weight.detach()
                self.read(node, x, lambda p: w[:, p], lambda v: None)
            const = self._affine_const(mod.weight.detach(), mod.bias, x, info, padded=False)
            return self.fresh(len(shape) - 1, mod.out_features, const)
        if isinstance(mod, nn.Embedding):
            return self.fresh(len(shape) - 1, mod.embedding_dim)
        if isinstance(mod, RNN_TYPES):
            self._rnn(node, mod, x, info)
            return None
        if isinstance(mod, _BN_TYPES):
            if info is None or info.dim != 1:
                self._unsupported(node, "a BatchNorm over a non-channel axis")
                return None
            return _Info(1, info.slots, _bn_const(mod, info.const))
        if isinstance(mod, _UNARY_MODULES):
            return self._unary(info, lambda t: mod(t))
        if isinstance(mod, _POOL_MODULES):
            return self._pool(node, info, getattr(mod, "padding", 0),
                              getattr(mod, "count_include_pad", True), isinstance(
                                  mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)))
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, x, info, mod.start_dim, mod.end_dim)
        self._unsupported(node, f"module {node.target} ({type(mod).__name__})")
        return None

    def _conv(self, node: fx.Node, conv: nn.Module, x: Any, info: _Info | None) -> _Info:
        w = conv.weight.detach()
        padded = _padded(conv)
        cin, cout, g = conv.in_channels, conv.out_channels, conv.groups
        if info is not None and info.dim != 1:
            self._unsupported(node, "a conv whose input channels are not on axis 1")
            info = None
        if g == 1:
            why = (f"its constant enters {_where(node)}, a zero-padded conv: folding it into "
                   "the bias would be wrong at the borders")
            self.read(node, x, lambda p: w[:, p],
                      lambda v: None if (v == 0 or not padded) else why)
            const = self._affine_const(w, conv.bias, x, info, padded)
            return self.fresh(1, cout, const)
        if g == cin and info is not None:
            # depthwise (channel multiplier m): output k reads input k // m only, so input and
            # outputs are one class, removed together
            m = cout // cin
            slots = [info.slots[k // m] for k in range(cout)]
            const = _nan(cout)
            b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(cout)
            for k in range(cout):
                v = float(info.const[k // m])
                if not w[k].any():
                    const[k] = b[k]
                elif not math.isnan(v) and (v == 0 or not padded):
                    const[k] = b[k] + v * w[k].double().sum()
            for s, c in zip(slots, const.tolist(), strict=True):
                if not math.isnan(c):
                    self.cls.candidate.add(s)
            return _Info(1, slots, const)
        reason = f"{_where(node)} is a grouped conv (groups={g}): its channels are kept"
        self.pin_all(x, reason)
        out = self.fresh(1, cout)
        for s in out.slots:
            self.cls.pin(s, reason)
        return out

    def _affine_const(self, w: Tensor, bias: Tensor | None, x: Any, info: _Info | None,
                      padded: bool) -> Tensor:
        """Per output: the constant a conv/linear outputs, or NaN."""
        k, c = w.shape[0], w.shape[1]
        b = bias.detach().double() if bias is not None else torch.zeros(k, dtype=torch.float64)
        flat = w.detach().double().reshape(k, c, -1).sum(-1)  # (K, C)
        nz = w.reshape(k, c, -1).ne(0).any(-1)
        cin = info.const if info is not None and len(info.const) == c else _nan(c)
        out = _nan(k)
        for j in range(k):
            used = cin[nz[j]]
            if used.numel() == 0:
                out[j] = b[j]
            elif not used.isnan().any() and (not padded or bool((used == 0).all())):
                out[j] = b[j] + (flat[j, nz[j]] * used).sum()
        return out

    def _rnn(self, node: fx.Node, rnn: nn.RNNBase, x: Any, info: _Info | None) -> None:
        names = [n for n in ("weight_ih_l0", "weight_ih_l0_reverse") if hasattr(rnn, n)]
        ws = [getattr(rnn, n).detach() for n in names]
        if info is not None and info.dim != len(_shape(x)) - 1:
            self._unsupported(node, "an RNN over a non-feature axis")
            return
        no_bias = (f"{_where(node)} has no bias to fold a constant into" if not rnn.bias else None)
        self.read(node, x, lambda p: torch.cat([w[:, p] for w in ws]), lambda v: no_bias)

    def _unary(self, info: _Info | None, fn: Callable[[Tensor], Tensor]) -> _Info | None:
        if info is None:
            return None
        with torch.no_grad():
            const = fn(info.const.clone().float()).double()
        return _Info(info.dim, info.slots, const)

    def _pool(self, node: fx.Node, info: _Info | None, padding: Any, include_pad: bool,
              avg: bool) -> _Info | None:
        if info is None:
            return None
        if info.dim != 1:
            self._unsupported(node, "a pooling op over the channel axis")
            return None
        pads = padding if isinstance(padding, tuple | list) else (padding,)
        const = info.const
        if avg and include_pad and any(p > 0 for p in pads):
            const = torch.where(const == 0, const, _nan(len(const)))
        return _Info(1, info.slots, const)

    def _flatten(self, node: fx.Node, x: Any, info: _Info | None, start: int,
                 end: int) -> _Info | None:
        if info is None:
            return None
        shape = _shape(x)
        nd = len(shape)
        start, end = start % nd, end % nd
        if info.dim < start or info.dim > end:
            new_dim = info.dim if info.dim < start else info.dim - (end - start)
            return _Info(new_dim, info.slots, info.const)
        if info.dim == start:
            rep = math.prod(shape[start + 1:end + 1])
            return _Info(start, [s for s in info.slots for _ in range(rep)],
                         info.const.repeat_interleave(rep))
        self._unsupported(node, "a flatten that splits the channel axis")
        return None

    def _function(self, node: fx.Node, fn: Any, args: tuple, kwargs: dict) -> _Info | None:
        x, info = self._x(node)
        if fn in _UNARY_FUNCTIONS:
            kw = {k: v for k, v in kwargs.items() if k != "inplace"}
            kw.pop("training", None)
            return self._unary(info, lambda t: fn(t, *args[1:], **kw) if fn not in (
                F.dropout, F.dropout2d) else t)
        if fn in _BINARY:
            if kwargs:  # torch.add(x, y, alpha=...) and the like
                self._unsupported(node, f"{fn.__name__} with keyword arguments")
                return None
            fn = operator.add if fn is operator.iadd else fn
            return self._binary(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"),
                                fn)
        if fn in _POOL_FUNCTIONS:
            pad = kwargs.get("padding", args[3] if len(args) > 3 else 0)
            include = kwargs.get("count_include_pad", args[5] if len(args) > 5 else True)
            return self._pool(node, info, pad, include,
                              fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d))
        if fn is torch.flatten:
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self._flatten(node, x, info, start, end)
        if fn is torch.cat:
            return self._cat(node, args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0))
        if fn is F.pad:
            return self._pad(node, x, info)
        if fn is operator.getitem:
            return self._getitem(node, x, info, args[1])
        self._unsupported(node, f"{getattr(fn, '__name__', fn)}")
        return None

    def _method(self, node: fx.Node) -> _Info | None:
        m = node.target
        x, info = self._x(node)
        if m in ("size", "dim"):
            return None
        if m in _UNARY_METHODS:
            return self._unary(info, lambda t: getattr(t, m)())
        if m in _BINARY_METHODS:
            fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[m]
            return self._binary(node, node.args[0], node.args[1], fn)
        if m == "flatten":
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return self._flatten(node, x, info, start, end)
        if m in ("view", "reshape") and info is not None:
            shape = _shape(node)
            rest = node.args[1:]
            if (len(rest) == 2 and rest[1] == -1 and len(shape) == 2
                    and _shape(x)[0] == shape[0]):
                return self._flatten(node, x, info, 1, -1)
        if m == "mean" and info is not None:
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            dims = (dims,) if isinstance(dims, int) else dims
            nd = len(_shape(x))
            if dims is not None and all(d % nd > info.dim for d in dims):
                # only axes after the channel axis are reduced: its index stays (any keepdim)
                del keep
                return _Info(info.dim, info.slots, info.const)
        self._unsupported(node, f"method .{m}()")
        return None

    def _binary(self, node: fx.Node, a: Any, b: Any, fn: Any) -> _Info | None:
        ia = self.info.get(a) if isinstance(a, fx.Node) else None
        ib = self.info.get(b) if isinstance(b, fx.Node) else None
        out_shape = _shape(node)
        if ia is not None and ib is not None:
            if (ia.dim != ib.dim or len(ia.slots) != len(ib.slots)
                    or _shape(a) != out_shape or _shape(b) != out_shape):
                self._unsupported(node, "a broadcasting elementwise op")
                return None
            for s, t in zip(ia.slots, ib.slots, strict=True):
                self.cls.union(s, t)
            return _Info(ia.dim, ia.slots, fn(ia.const, ib.const))
        info, other, swap = (ia, b, False) if ia is not None else (ib, a, True)
        if info is None:
            return None
        if isinstance(other, int | float):
            const = fn(other, info.const) if swap else fn(info.const, other)
            return _Info(info.dim, info.slots, const)
        vec = self._buffer(other, info, out_shape)
        if vec is not None:
            const = fn(vec, info.const) if swap else fn(info.const, vec)
            return _Info(info.dim, info.slots, const)
        self._unsupported(node, "an elementwise op with a tensor hwprune cannot follow")
        return None

    def _buffer(self, node: Any, info: _Info, out_shape: tuple[int, ...]) -> Tensor | None:
        """A get_attr tensor that is one value per channel, as float64 (else None)."""
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return None
        # per-channel tensors are followed only for shrink's own buffers (one use each, so
        # slicing them cannot disturb another op); others must broadcast over the channels
        own = node.target.startswith("_shrink_const_")
        t = _attr(self.gm, node.target).detach()
        nd = len(out_shape)
        if t.ndim > nd:
            return None
        shape = (1,) * (nd - t.ndim) + tuple(t.shape)
        if any(n != 1 for i, n in enumerate(shape) if i != info.dim):
            return None
        if shape[info.dim] != 1 and not (own and shape[info.dim] == len(info.slots)):
            return None
        return t.reshape(-1).double().expand(len(info.slots)).clone()

    def _cat(self, node: fx.Node, xs: Sequence[Any], dim: int) -> _Info | None:
        infos = [self.info.get(x) if isinstance(x, fx.Node) else None for x in xs]
        nd = len(_shape(node))
        if any(i is None for i in infos) or any(i.dim != dim % nd for i in infos):
            self._unsupported(node, "a concatenation off the channel axis or of untracked "
                              "tensors")
            return None
        return _Info(dim % nd, [s for i in infos for s in i.slots],
                     torch.cat([i.const for i in infos]))

    def _pad(self, node: fx.Node, x: Any, info: _Info | None) -> _Info | None:
        if info is None:
            return None
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        nd = len(_shape(x))
        j = nd - 1 - info.dim
        left, right = (pad[2 * j], pad[2 * j + 1]) if len(pad) > 2 * j + 1 else (0, 0)
        if left == right == 0:
            return _Info(info.dim, info.slots, info.const)
        if mode != "constant" or value not in (None, 0, 0.0) or left < 0 or right < 0:
            self._unsupported(node, "a channel pad that is not zero padding")
            return None
        out = self.fresh(info.dim, left + len(info.slots) + right)
        out.const[:left] = 0
        out.const[left + len(info.slots):] = 0
        out.const[left:left + len(info.slots)] = info.const
        for p, s in enumerate(info.slots):
            # the copy of a channel that is zero is the zero the new op writes anyway
            if float(info.const[p]) != 0:
                self.cls.deps[s].append(
                    (out.slots[left + p], f"copied by {_where(node)} into a channel that stays"))
        return out

    def _getitem(self, node: fx.Node, x: Any, info: _Info | None, idx: Any) -> _Info | None:
        if info is None:
            return None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) <= info.dim:
            if all(isinstance(i, slice) for i in idx):
                return _Info(info.dim, info.slots, info.const)
        elif (all(isinstance(i, slice) for i in idx[:info.dim + 1])
              and idx[info.dim] == slice(None)):
            return _Info(info.dim, info.slots, info.const)
        self._unsupported(node, "indexing across the channel axis")
        return None


def _bn_const(bn: nn.Module, const: Tensor) -> Tensor:
    w = bn.weight.detach().double() if bn.weight is not None else torch.ones(len(const))
    b = bn.bias.detach().double() if bn.bias is not None else torch.zeros(len(const))
    if bn.running_mean is None:  # batch statistics even in eval: only a zero scale is constant
        return torch.where(w == 0, b, _nan(len(const)))
    scale = w / torch.sqrt(bn.running_var.double() + bn.eps)
    out = (const - bn.running_mean.double()) * scale + b
    return torch.where(w == 0, b, out)


def _where(node: fx.Node) -> str:
    """A node as the user knows it: the module's name, else the traced op's name."""
    return str(node.target) if node.op == "call_module" else node.name


def _nodes_in(value: Any) -> Iterable[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_module(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _trace(model: nn.Module, leaf_modules: tuple[type, ...]) -> fx.GraphModule:
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_modules) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise ShrinkError(
            f"torch.fx cannot trace {type(model).__name__}: {e}. shrink needs a traceable "
            "forward; pass the modules it cannot trace as leaf_modules=(Type, ...) (their "
            "channels are then kept)"
        ) from e
    return fx.GraphModule(model, graph, type(model).__name__)


def _example_args(example_inputs: Any, error: type[Exception]) -> tuple:
    """``example_inputs`` as positional arguments; anything but a tensor or a tuple of
    tensors raises ``error``."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(a, Tensor) for a in args):
        raise error("example_inputs must be a tensor or a tuple of tensors, got "
                    f"{[type(a).__name__ for a in args]}")
    return args


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in _outputs(o)]
    return []


def _fold_constant_operands(gm: fx.GraphModule, an: _Analysis) -> list[str]:
    """Replace an addition's operand that is entirely constant by that constant (a buffer),
    so the subgraph computing it (a zeroed residual branch) becomes dead code."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, torch.add,
                                                               operator.iadd):
            continue
        a, b = node.args[0], node.args[1]
        for const_side, other in ((b, a), (a, b)):
            ci, oi = an.info.get(const_side), an.info.get(other)
            if (ci is None or oi is None or ci.const.isnan().any()
                    or _shape(const_side) != _shape(node) or _shape(other) != _shape(node)):
                continue
            name = f"_shrink_const_{len(done)}"
            shape = [1] * len(_shape(node))
            shape[ci.dim] = len(ci.slots)
            dtype = node.meta["tensor_meta"].dtype
            gm.register_buffer(name, ci.const.to(dtype).reshape(shape).clone())
            with gm.graph.inserting_before(node):
                if bool((ci.const == 0).all()):
                    node.replace_all_uses_with(other)
                else:
                    attr = gm.graph.get_attr(name)
                    new = gm.graph.call_function(operator.add, (other, attr))
                    new.meta = dict(node.meta)
                    node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            done.append(_where(const_side))
            break
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shrink(model: nn.Module, example_inputs: Any, *, atol: float = 1e-4, rtol: float = 1e-4,
           leaf_modules: tuple[type, ...] = (), return_result: bool = False
           ) -> nn.Module | ShrinkResult:
    """A physically smaller copy of ``model`` without its entirely-zero channels and layers.

    Args:
        model: a model whose pruned structures are zero (``pruner.finalize()``); not modified.
        example_inputs: a tensor or a tuple of positional inputs; used to trace shapes and to
            verify the result.
        atol, rtol: the verification tolerance (default 1e-4 each) on every output, eval mode.
        leaf_modules: module types not to trace into (custom ops); channels they touch stay.
        return_result: give a ``ShrinkResult`` (model, what stayed and why) instead of the model.

    Returns:
        the model in eval mode (or a ``ShrinkResult``): an instance of the input model's own
        class when shrinking only narrowed layers, else a ``torch.fx.GraphModule`` (a graph
        rewritten: padding changed, a branch or a concatenated layer gone, a constant folded).

    Raises:
        ShrinkError: the model cannot be traced, or the verification fails.
    """
    if not isinstance(model, nn.Module):
        raise ShrinkError(f"shrink needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ShrinkError("shrink the bare model (ddp.module), not its DistributedDataParallel "
                          "wrapper; the result has new parameters: wrap it in a new "
                          "DistributedDataParallel to train it further")
    args = _example_args(example_inputs, ShrinkError)
    work = copy.deepcopy(model).eval()  # the user's model keeps its weights and its mode
    with torch.no_grad():
        reference = _outputs(work(*args))
    gm = _trace(work, tuple(leaf_modules))
    traced_code = gm.code
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
        branches = _fold_constant_operands(gm, _Analysis(gm))
        ShapeProp(gm).propagate(*args)
        an = _Analysis(gm)
        removed, reasons = _solve_nonempty(gm, an)
        result = ShrinkResult(gm, _params(model), 0, branches=branches)
        _rewrite(gm, an, removed, result)
        _describe_kept(gm, an, reasons, result)
        gm.eval()
        got = _outputs(gm(*args))
    if len(got) != len(reference) or any(g.shape != r.shape for g, r in zip(got, reference,
                                                                            strict=False)):
        raise ShrinkError("the shrunk model's outputs have other shapes than the input model's "
                          "(a bug in shrink; the input model is unchanged)")
    diff = max((float((g - r).abs().max()) for g, r in zip(got, reference, strict=True)
                if g.numel()), default=0.0)
    bad = [not torch.allclose(g, r, atol=atol, rtol=rtol) for g, r in zip(got, reference,
                                                                         strict=True)]
    if any(bad):
        raise ShrinkError(f"the shrunk model differs from the input model by up to {diff:.3g} "
                          f"(atol={atol}, rtol={rtol}) on example_inputs; refusing to return "
                          "it (a bug in shrink; the input model is unchanged)")
    if gm.code == traced_code:  # only layers narrowed: the model's own class can run it
        plain = _in_own_class(work, gm, args, got)
        if plain is not None:
            result.model = plain
    result.params_after = _params(result.model)
    result.max_abs_diff = diff
    return result if return_result else result.model


def _in_own_class(work: nn.Module, gm: fx.GraphModule, args: tuple,
                  got: list[Tensor]) -> nn.Module | None:
    """``work`` (a copy of the input model) with the modules and attributes of ``gm``'s graph
    put in place, when the graph is the traced one unchanged: the user's class, its forward
    and methods, and no fx call overhead (5-7 % of a batch-1 forward of the digits CNN,
    bench/results/fx_overhead.md).
    None if it does not compute exactly what ``gm`` computes."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            _set_module(work, node.target, gm.get_submodule(node.target))
        elif node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            value = getattr(gm.get_submodule(owner) if owner else gm, name)
            setattr(work.get_submodule(owner) if owner else work, name, value)
    with torch.no_grad():
        mine = _outputs(work.eval()(*args))
    same = len(mine) == len(got) and all(torch.equal(a, b) for a, b in zip(mine, got,
                                                                          strict=True))
    return work if same else None


# -- choosing what goes, and the rewrite ---------------------------------------------------

def _keep(an: _Analysis, node: Any, removed: set[int]) -> list[int] | None:
    info = an.info.get(node) if isinstance(node, fx.Node) else None
    if info is None:
        return None
    return [p for p, s in enumerate(info.slots) if an.cls.find(s) not in removed]


def _droppable(gm: fx.GraphModule, an: _Analysis, removed: set[int]) -> set[fx.Node]:
    """Nodes left with no channel whose every user is a concatenation or droppable itself."""
    drop: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        keep = _keep(an, node, removed)
        if keep is None or keep or not node.users:
            continue
        if all(u in drop or (u.op == "call_function" and u.target is torch.cat)
               for u in node.users):
            drop.add(node)
    return drop


def _solve_nonempty(gm: fx.GraphModule, an: _Analysis) -> tuple[set[int], dict[int, str]]:
    """Solve; where a tensor that must stay would have no channel left, keep its first one."""
    while True:
        removed, reasons = an.cls.solve()
        drop = _droppable(gm, an, removed)
        empty = [n for n in gm.graph.nodes if n not in drop and n.users
                 and _keep(an, n, removed) == []]
        if not empty:
            return removed, reasons
        for n in empty:
            an.cls.pin(an.info[n].slots[0], f"kept so that {_where(n)} keeps one channel")


def _rewrite(gm: fx.GraphModule, an: _Analysis, removed: set[int], result: ShrinkResult) -> None:
    modules = dict(gm.named_modules())
    drop = _droppable(gm, an, removed)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.cat:
            xs = [x for x in node.args[0] if x not in drop]
            node.args = (xs, *node.args[1:])
    for node in list(gm.graph.nodes):
        if node in drop:
            continue
        x = node.args[0] if node.args else None
        kin, kout = _keep(an, x, removed), _keep(an, node, removed)
        if node.op == "call_module":
            mod = modules[node.target]
            new = _new_module(an, node, mod, x, kin, kout, removed, result)
            if new is not None:
                _set_module(gm, node.target, new)
        elif node.op == "call_function" and node.target is F.pad:
            _rewrite_pad(gm, an, node, x, kin, kout)
        elif node.op in ("call_function", "call_method"):
            for a in node.args[1:]:
                if isinstance(a, fx.Node) and a.op == "get_attr" and kout is not None:
                    t = _attr(gm, a.target)
                    info = an.info[node]
                    dim = info.dim - (len(_shape(node)) - t.ndim)
                    if 0 <= dim < t.ndim and t.shape[dim] == len(info.slots) > 1:
                        _set_module_attr(gm, a.target, t.index_select(dim, torch.tensor(kout)))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _set_module_attr(gm: nn.Module, target: str, t: Tensor) -> None:
    parent, _, name = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if name in owner._buffers:
        owner._buffers[name] = t.clone()
    else:
        setattr(owner, name, nn.Parameter(t.clone(), requires_grad=False))


def _fold(an: _Analysis, x: Any, kin: list[int] | None, cols: Callable[[int], Tensor],
          k: int) -> Tensor | None:
    """Sum over removed input positions with a nonzero constant: value * weight column."""
    info = an.info.get(x) if isinstance(x, fx.Node) else None
    if info is None or kin is None:
        return None
    keep = set(kin)
    total = torch.zeros(k, dtype=torch.float64)
    hit = False
    for p in range(len(info.slots)):
        v = float(info.const[p])
        col = cols(p).double()
        if p in keep or math.isnan(v) or v == 0 or not col.any():
            continue
        total += v * col
        hit = True
    return total if hit else None


def _new_module(an: _Analysis, node: fx.Node, mod: nn.Module, x: Any, kin: list[int] | None,
                kout: list[int] | None, removed: set[int], result: ShrinkResult
                ) -> nn.Module | None:
    name = node.target
    if isinstance(mod, CONV_TYPES):
        w = mod.weight.detach()
        depthwise = mod.groups > 1 and kin is not None and mod.groups == mod.in_channels
        kin = kin if (kin is not None and mod.groups == 1) or depthwise else None
        kin_l = kin if kin is not None else list(range(mod.in_channels))
        kout_l = kout if kout is not None else list(range(mod.out_channels))
        if len(kin_l) == mod.in_channels and len(kout_l) == mod.out_channels:
            return None
        fold = None if depthwise else _fold(an, x, kin, lambda p: w[:, p].reshape(
            w.shape[0], -1).sum(1), w.shape[0])
        groups = len(kin_l) if depthwise else 1
        new = type(mod)(len(kin_l), len(kout_l), mod.kernel_size, stride=mod.stride,
                        padding=mod.padding, dilation=mod.dilation, groups=groups,
                        bias=mod.bias is not None or fold is not None,
                        padding_mode=mod.padding_mode, dtype=w.dtype, device=w.device)
        nw = w[kout_l] if depthwise else w[kout_l][:, kin_l]
        new.weight.data.copy_(nw)
        _set_bias(new, mod.bias, fold, kout_l, result, name)
        result.layers[name] = ((mod.in_channels, mod.out_channels), (len(kin_l), len(kout_l)))
        return new
    if isinstance(mod, LINEAR_TYPES):
        w = mod.weight.detach()
        kin_l = kin if kin is not None else list(range(mod.in_features))
        kout_l = kout if kout is not None else list(range(mod.out_features))
        if len(kin_l) == mod.in_features and len(kout_l) == mod.out_features:
            return None
        fold = _fold(an, x, kin, lambda p: w[:, p], w.shape[0])
        new = nn.Linear(len(kin_l), len(kout_l), bias=mod.bias is not None or fold is not None,
                        dtype=w.dtype, device=w.device)
        new.weight.data.copy_(w[kout_l][:, kin_l])
        _set_bias(new, mod.bias, fold, kout_l, result, name)
        result.layers[name] = ((mod.in_features, mod.out_features), (len(kin_l), len(kout_l)))
        return new
    if isinstance(mod, _BN_TYPES):
        if kout is None or len(kout) == mod.num_features:
            return None
        new = copy.deepcopy(mod)
        new.num_features = len(kout)
        idx = torch.tensor(kout)
        for pname in ("weight", "bias"):
            p = getattr(mod, pname)
            if p is not None:
                setattr(new, pname, nn.Parameter(p.detach()[idx].clone()))
        for bname in ("running_mean", "running_var"):
            b = getattr(mod, bname)
            if b is not None:
                setattr(new, bname, b[idx].clone())
        result.layers[name] = ((mod.num_features,) * 2, (len(kout),) * 2)
        return new
    if isinstance(mod, nn.Embedding):
        if kout is None or len(kout) == mod.embedding_dim:
            return None
        new = copy.deepcopy(mod)
        new.embedding_dim = len(kout)
        new.weight = nn.Parameter(mod.weight.detach()[:, kout].clone())
        result.layers[name] = ((mod.num_embeddings, mod.embedding_dim),
                               (mod.num_embeddings, len(kout)))
        return new
    if isinstance(mod, RNN_TYPES):
        if kin is None or len(kin) == mod.input_size:
            return None
        new = copy.deepcopy(mod)
        new.input_size = len(kin)
        for suffix in ("", "_reverse"):
            if not hasattr(mod, "weight_ih_l0" + suffix):
                continue
            w = getattr(mod, "weight_ih_l0" + suffix).detach()
            fold = _fold(an, x, kin, lambda p, w=w: w[:, p], w.shape[0])
            setattr(new, "weight_ih_l0" + suffix, nn.Parameter(w[:, kin].clone()))
            if fold is not None:
                b = getattr(mod, "bias_ih_l0" + suffix).detach()
                setattr(new, "bias_ih_l0" + suffix, nn.Parameter(b + fold.to(b.dtype)))
                result.folded.append(name)
        new._init_flat_weights()
        result.layers[name] = ((mod.input_size, mod.hidden_size), (len(kin), mod.hidden_size))
        return new
    return None


def _set_bias(new: nn.Module, bias: Tensor | None, fold: Tensor | None, kout: list[int],
              result: ShrinkResult, name: str) -> None:
    if new.bias is None:
        return
    b = bias.detach()[kout].double() if bias is not None else torch.zeros(len(kout),
                                                                          dtype=torch.float64)
    if fold is not None:
        b = b + fold[kout]
        result.folded.append(name)
    new.bias.data.copy_(b.to(new.bias.dtype))


def _rewrite_pad(gm: fx.GraphModule, an: _Analysis, node: fx.Node, x: Any,
                 kin: list[int] | None, kout: list[int] | None) -> None:
    info_in, info_out = an.info.get(x), an.info.get(node)
    if info_in is None or info_out is None or (
            len(kin) == len(info_in.slots) and len(kout) == len(info_out.slots)):
        return
    pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    j = len(_shape(x)) - 1 - info_in.dim
    left = pad[2 * j]
    pos_in = {p: i for i, p in enumerate(kin)}  # original input position -> new index
    src, dst = [], []
    for i, q in enumerate(kout):
        p = q - left
        if p in pos_in:
            src.append(pos_in[p])
            dst.append(i)
    contiguous = dst == list(range(dst[0], dst[0] + len(dst))) if dst else False
    if contiguous and src == list(range(len(kin))):
        pad[2 * j], pad[2 * j + 1] = dst[0], len(kout) - dst[-1] - 1
        node.args = (node.args[0], tuple(pad), *node.args[2:])
        return
    pad[2 * j] = pad[2 * j + 1] = 0
    node.args = (node.args[0], tuple(pad), *node.args[2:])
    name = f"_shrink_channel_map_{node.name}"
    gm.add_submodule(name, ChannelMap(src, dst, len(kout), info_in.dim))
    with gm.graph.inserting_after(node):
        mapped = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(mapped, delete_user_cb=lambda u: u is not mapped)


def _describe_kept(gm: fx.GraphModule, an: _Analysis, reasons: dict[int, str],
                   result: ShrinkResult) -> None:
    cand = {an.cls.find(s) for s in an.cls.candidate}
    seen: set[int] = set()
    for node, info in an.info.items():
        if info is None:
            continue
        groups: dict[str, list[int]] = defaultdict(list)
        for p, s in enumerate(info.slots):
            r = an.cls.find(s)
            if r in cand and r in reasons and r not in seen:
                groups[reasons[r]].append(p)
                seen.add(r)
        for why, chans in groups.items():
            result.kept.append(KeptChannels(_where(node), chans, why))
