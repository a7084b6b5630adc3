"""Applying the analysis to the graph: what goes, and the rewritten GraphModule.

Before the analysis that decides, ``fold_constant_operands`` replaces an addition's operand
that is entirely constant by that constant (a zeroed residual branch becomes dead code). Then
``solve`` picks the channel classes that go, ``rewrite`` asks each layer's handler for its
narrowed copy, drops concatenated layers left with no channel, narrows per-channel buffers and
rewrites channel padding, and ``describe_kept`` lists what stayed and why.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .analysis import Analysis
from .handlers import Narrowing
from .nodes import get_attr, set_module, set_tensor_attr, shape_of, where
from .norms import is_layer_norm_call, rewrite_layer_norm_call
from .registry import handler_for
from .result import KeptChannels, ShrinkResult

__all__ = ["ChannelMap", "fold_constant_operands", "solve", "rewrite", "describe_kept"]


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


def fold_constant_operands(gm: fx.GraphModule, an: Analysis) -> list[str]:
    """Replace an addition's operand that is entirely constant by that constant (a buffer),
    so the subgraph computing it (a zeroed residual branch) becomes dead code; the names of
    the replaced operands."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, torch.add,
                                                               operator.iadd):
            continue
        a, b = node.args[0], node.args[1]
        for const_side, other in ((b, a), (a, b)):
            ci, oi = an.info_of(const_side), an.info_of(other)
            if (ci is None or oi is None or ci.const.isnan().any()
                    or shape_of(const_side) != shape_of(node) or shape_of(other) != shape_of(node)):
                continue
            name = f"_shrink_const_{len(done)}"
            shape = [1] * len(shape_of(node))
            shape[ci.dim] = len(ci.slots)
            dtype = node.meta["tensor_meta"].dtype
            gm.register_buffer(name, ci.const.to(dtype).reshape(shape).clone())
            with gm.graph.inserting_before(node):
                if bool((ci.const == 0).all()):
                    node.replace_all_uses_with(other)
                else:
                    new = gm.graph.call_function(operator.add, (other, gm.graph.get_attr(name)))
                    new.meta = dict(node.meta)
                    node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            done.append(where(const_side))
            break
    _finish(gm)
    return done


def _droppable(gm: fx.GraphModule, an: Analysis, removed: set[int]) -> set[fx.Node]:
    """Nodes left with no channel whose every user is a concatenation or droppable itself."""
    drop: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        keep = an.kept_positions(node, removed)
        if keep is None or keep or not node.users:
            continue
        if all(u in drop or (u.op == "call_function" and u.target is torch.cat)
               for u in node.users):
            drop.add(node)
    return drop


def solve(gm: fx.GraphModule, an: Analysis) -> tuple[set[int], dict[int, str]]:
    """The classes removed, and the reason of each pinned class; where a tensor that must
    stay would have no channel left, its first one stays."""
    while True:
        removed, reasons = an.classes.solve()
        drop = _droppable(gm, an, removed)
        empty = [n for n in gm.graph.nodes if n not in drop and n.users
                 and an.kept_positions(n, removed) == []]
        if not empty:
            return removed, reasons
        for n in empty:
            an.classes.pin(an.info[n].slots[0], f"kept so that {where(n)} keeps one channel")


def rewrite(gm: fx.GraphModule, an: Analysis, removed: set[int], result: ShrinkResult) -> None:
    """Narrow every layer, buffer and pad of ``gm`` to the channels not ``removed``."""
    modules = dict(gm.named_modules())
    drop = _droppable(gm, an, removed)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.cat:
            node.args = ([x for x in node.args[0] if x not in drop], *node.args[1:])
    for node in list(gm.graph.nodes):
        if node in drop:
            continue
        x = node.args[0] if node.args else None
        kin, kout = an.kept_positions(x, removed), an.kept_positions(node, removed)
        if node.op == "call_module":
            _rebuild_layer(gm, node.target, Narrowing(node.target, modules[node.target], kin,
                                                      kout, an.info_of(x), an.info_of(node),
                                                      shape_of(x)),
                           result)
        elif is_layer_norm_call(node):
            name = rewrite_layer_norm_call(gm, node, an.info_of(x), kin)
            if name is not None:
                n = len(an.info_of(x).slots)
                result.layers[name] = ((n, n), (len(kin), len(kin)))
        elif node.op == "call_function" and node.target is F.pad:
            _rewrite_pad(gm, an, node, x, kin, kout)
        elif node.op in ("call_function", "call_method") and kout is not None:
            _narrow_operands(gm, an, node, kout)
    _finish(gm)


def _rebuild_layer(gm: fx.GraphModule, name: str, plan: Narrowing,
                   result: ShrinkResult) -> None:
    handler = handler_for(type(plan.layer))
    rebuilt = handler.rebuild(plan) if handler is not None else None
    if rebuilt is None:
        return
    set_module(gm, name, rebuilt.module)
    result.layers[name] = (rebuilt.before, rebuilt.after)
    if rebuilt.folded:
        result.folded.append(name)


def _narrow_operands(gm: fx.GraphModule, an: Analysis, node: fx.Node,
                     kout: list[int]) -> None:
    """A per-channel buffer an op combines with its input loses the removed channels."""
    for a in node.args:  # a layer scale may come first: gamma * x
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = get_attr(gm, a.target)
            info = an.info[node]
            dim = info.dim - (len(shape_of(node)) - t.ndim)
            if 0 <= dim < t.ndim and t.shape[dim] == len(info.slots) > 1:
                set_tensor_attr(gm, a.target, t.index_select(dim, torch.tensor(kout)))


def _rewrite_pad(gm: fx.GraphModule, an: Analysis, node: fx.Node, x: fx.Node,
                 kin: list[int] | None, kout: list[int] | None) -> None:
    info_in, info_out = an.info_of(x), an.info_of(node)
    if info_in is None or info_out is None or (
            len(kin) == len(info_in.slots) and len(kout) == len(info_out.slots)):
        return
    pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    j = len(shape_of(x)) - 1 - info_in.dim
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


def describe_kept(an: Analysis, reasons: dict[int, str], result: ShrinkResult) -> None:
    """List in ``result.kept`` the candidate channels (zero or constant somewhere) that stay,
    grouped by tensor and reason, each class once."""
    cand = {an.classes.find(s) for s in an.classes.candidate}
    seen: set[int] = set()
    for node, info in an.info.items():
        if info is None:
            continue
        groups: dict[str, list[int]] = defaultdict(list)
        for p, s in enumerate(info.slots):
            r = an.classes.find(s)
            if r in cand and r in reasons and r not in seen:
                groups[reasons[r]].append(p)
                seen.add(r)
        for why, chans in groups.items():
            result.kept.append(KeptChannels(where(node), chans, why))


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
