"""Channel shuffles and chunks: ops that reorder or split the channel axis.

A channel shuffle (ShuffleNet) is written with reshapes: the channel axis of ``C`` is viewed as
a grid ``(a, b)``, the two grid axes are swapped and the result is viewed back as ``C``
channels, so output ``j * a + i`` is input ``i * b + j``. ``x.chunk(n, dim)`` along the channel
axis views it as ``(n, C / n)`` and hands out the rows.

Both stay valid after shrink only if the grid stays a grid: every row must lose the same
columns (a shuffle of ``C'`` channels, or ``chunk`` of them, cuts the axis at ``C' / a``). So
the positions of one column are merged into one class, and the sizes the reshapes use must be
computed in the graph (``x.size()``, ``-1``), not fixed in the code. The nodes inside a shuffle
(the grid view, the swap, ``contiguous``) have no channel axis of their own; the rule checks that
nothing else reads them, then gives the final view its permuted classes.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .channels import ChannelInfo
from .nodes import shape_of

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["RESHAPES", "channel_shuffle", "chunk"]

#: the reshaping calls: (op, target)
RESHAPES = {("call_method", "view"), ("call_method", "reshape"),
            ("call_function", torch.reshape)}
_COPIES = {("call_method", "contiguous"), ("call_method", "clone")}


def _sizes(node: fx.Node) -> tuple | None:
    """The sizes a reshape asks for, as written (ints, -1, or graph nodes)."""
    rest = node.args[1:] if node.args else ()
    if len(rest) == 1 and isinstance(rest[0], tuple | list):
        rest = tuple(rest[0])
    return tuple(rest) if rest else (tuple(node.kwargs.get("shape", ())) or None)


def _computed(size: Any) -> bool:
    """A size that follows the tensor when shrink narrows it: computed in the graph, or -1."""
    return isinstance(size, fx.Node) or size == -1


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _swaps(node: fx.Node, d: int) -> bool:
    """Whether ``node`` swaps axes ``d`` and ``d + 1`` of its input and nothing else."""
    nd = len(shape_of(node) or ())
    if node.target in ("transpose", torch.transpose) and len(node.args) == 3:
        return sorted(a % nd for a in node.args[1:] if isinstance(a, int)) == [d, d + 1]
    if node.target in ("permute", torch.permute):
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        want = list(range(nd))
        want[d], want[d + 1] = d + 1, d
        return isinstance(dims, tuple | list) and [x % nd for x in dims
                                                   if isinstance(x, int)] == want
    return False


def _union_columns(an: Analysis, slots: list[int], rows: int) -> None:
    """Merge the classes of each column of ``slots`` viewed as ``rows`` rows."""
    cols = len(slots) // rows
    for j in range(cols):
        for i in range(1, rows):
            an.classes.union(slots[j], slots[i * cols + j])


def channel_shuffle(an: Analysis, node: fx.Node, x: Any, info: ChannelInfo) -> bool:
    """``node`` reshapes ``x``: if it starts a channel shuffle (grid view, swap, copies,
    view back), the final view is given its classes and True returned; else False."""
    d, shape_in, shape = info.dim, shape_of(x), shape_of(node)
    if shape_in is None or shape is None or len(shape) != len(shape_in) + 1:
        return False
    a, b = shape[d], shape[d + 1]
    sizes = _sizes(node)
    if (shape[:d] != shape_in[:d] or shape[d + 2:] != shape_in[d + 1:] or a < 2 or b < 2
            or sizes is None or len(sizes) != len(shape) or not _computed(sizes[d + 1])):
        return False
    swap = _only_user(node)
    if swap is None or swap.op not in ("call_function", "call_method") or not _swaps(swap, d):
        return False
    inside, last = [node, swap], _only_user(swap)
    while last is not None and (last.op, last.target) in _COPIES:
        inside.append(last)
        last = _only_user(last)
    if last is None or (last.op, last.target) not in RESHAPES or shape_of(last) != shape_in:
        return False
    back = _sizes(last)
    if back is None or len(back) != len(shape_in) or not _computed(back[d]):
        return False
    _union_columns(an, info.slots, a)
    order = [i * b + j for j in range(b) for i in range(a)]  # output j*a+i <- input i*b+j
    for n in inside[1:]:
        an.resolved[n] = None  # the grid: no channel axis, read by nothing else
    an.resolved[last] = ChannelInfo(d, [info.slots[p] for p in order], info.const[order])
    return True


def chunk(an: Analysis, node: fx.Node, info: ChannelInfo, chunks: Any, dim: Any) -> bool:
    """``node`` is ``x.chunk(chunks, dim)``: along the channel axis into equal pieces that are
    only indexed, the pieces get their classes (True); else False."""
    shape = shape_of(node.args[0])
    if not (isinstance(chunks, int) and isinstance(dim, int) and shape is not None):
        return False
    n = len(info.slots)
    if dim % len(shape) != info.dim or chunks < 2 or n % chunks:
        return False
    pieces = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem
               and isinstance(u.args[1], int) for u in pieces):
        return False
    _union_columns(an, info.slots, chunks)
    size = n // chunks
    for u in pieces:
        lo = (u.args[1] % chunks) * size
        an.resolved[u] = ChannelInfo(info.dim, info.slots[lo:lo + size],
                                     info.const[lo:lo + size])
    return True
