"""Structures: how a weight tensor is cut into groups that live or die together.

This is the first of hwprune's three axes (structure, method, deployment). Every structure
answers the same two questions for a weight of shape ``(K, C, *kernel)`` (a Linear weight is
``(K, C)``, an LSTM/GRU weight matrix is a Linear weight per gate row):

* ``to_groups(w)``: the *group view*, a ``(num_groups, group_size)`` matrix, one row per group;
* ``from_groups(g, shape)``: the way back, exact (``from_groups(to_groups(w), w.shape) == w``).

Methods score rows (a norm, a learned scale, a logit) and give back one value per group;
``expand`` broadcasts such per-group values back to the weight's shape. No method reshapes
weights itself.

Group order convention: groups are ordered so that the *run axis* varies fastest (the input
dimension, unless stated otherwise). That makes ``KofN``, the k-of-n constraint, one generic
wrapper: a run is ``n`` consecutive groups, and a line of ``line_length(shape)`` groups along
the run axis must be a multiple of ``n``. For a conv weight (K, C, R, S) and element groups,
a run is ``n`` consecutive input channels at one (k, r, s): the layout of NVIDIA's 2:4
sparse tensor cores.

Block structures tile the im2col matrix ``w.reshape(K, C*R*S)``; tiles at a ragged edge are
zero-padded in the group view (so norms are unaffected) and the padding is dropped on the way
back; ``group_sizes`` counts only real weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import StructureError

__all__ = [
    "Structure",
    "Element",
    "Filter",
    "Channel",
    "Kernel",
    "Column",
    "Layer",
    "Block",
    "KofN",
    "FeatureMap",
    "Head",
    "transposed",
    "parse_structure",
    "STRUCTURE_NAMES",
]

Shape = Sequence[int]


class Structure:
    """A way of cutting a weight tensor into groups. Subclasses define the group view."""

    name: str = "structure"
    #: weights need at least this many dimensions (2: Linear; 3: Conv with a kernel axis)
    min_ndim: int = 2

    # -- the interface -------------------------------------------------------------------
    def to_groups(self, w: Tensor) -> Tensor:
        """The ``(num_groups, group_size)`` view of ``w``."""
        raise NotImplementedError

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        """Inverse of ``to_groups``: a tensor of ``shape`` from its group view."""
        raise NotImplementedError

    def line_length(self, shape: Shape) -> int:
        """How many consecutive groups lie along the run axis (for k-of-n runs)."""
        raise NotImplementedError

    # -- shared helpers ------------------------------------------------------------------
    def validate(self, shape: Shape, layer: str = "weight") -> None:
        """Raise ``StructureError`` naming ``layer`` if a weight of ``shape`` cannot have it."""
        if len(shape) < 2:
            raise StructureError(
                f"{layer}: structure {self} needs a weight with at least 2 dimensions "
                f"(out, in, *kernel); got shape {tuple(shape)}"
            )
        if len(shape) < self.min_ndim:
            raise StructureError(
                f"{layer}: structure {self} needs a conv weight (out, in, *kernel) but the "
                f"weight has shape {tuple(shape)}; for a linear weight use 'element', "
                f"'filter', 'channel', 'layer', 'block:BHxBW' or 'k:n', or restrict targets= "
                f"to conv layers (e.g. targets=torch.nn.Conv2d)"
            )

    def group_shape(self, shape: Shape) -> tuple[int, int]:
        """``(num_groups, group_size)`` of the group view of a weight of ``shape``."""
        cache = self.__dict__.setdefault("_group_shapes", {})  # expand() runs every forward
        key = tuple(shape)
        if key not in cache:
            cache[key] = tuple(self.to_groups(torch.empty(key, device="meta")).shape)
        return cache[key]

    def num_groups(self, shape: Shape) -> int:
        return self.group_shape(shape)[0]

    def group_sizes(self, shape: Shape) -> Tensor:
        """Number of real weights in each group (blocks at a ragged edge have fewer)."""
        return self.to_groups(torch.ones(tuple(shape))).sum(dim=1)

    def expand(self, values: Tensor, shape: Shape) -> Tensor:
        """Broadcast one value per group (a mask, a scale) back to the weight's ``shape``."""
        groups, size = self.group_shape(shape)
        if values.shape != (groups,):
            raise StructureError(
                f"{self}: expected one value per group, shape ({groups},); "
                f"got {tuple(values.shape)}"
            )
        return self.from_groups(values[:, None].expand(groups, size), shape)

    def scores(self, w: Tensor, norm: str = "l1") -> Tensor:
        """One magnitude per group: the L1 or L2 norm of its weights."""
        g = self.to_groups(w)
        if norm == "l1":
            return g.abs().sum(dim=1)
        if norm == "l2":
            return g.pow(2).sum(dim=1).sqrt()
        raise StructureError(f"norm must be 'l1' or 'l2'; got {norm!r}")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Structure({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Structure) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _moved(shape: Shape, axis: int) -> tuple[int, ...]:
    """``shape`` after ``movedim(axis, -1)``."""
    s = list(shape)
    s.append(s.pop(axis))
    return tuple(s)


class Element(Structure):
    """One group per weight. Groups are ordered with ``axis`` (default: input) fastest."""

    name = "element"

    def __init__(self, axis: int = 1):
        self.axis = axis

    def validate(self, shape: Shape, layer: str = "weight") -> None:
        super().validate(shape, layer)
        if not 0 <= self.axis < len(shape):
            raise StructureError(
                f"{layer}: element axis {self.axis} is out of range for shape {tuple(shape)}"
            )

    def to_groups(self, w: Tensor) -> Tensor:
        return w.movedim(self.axis, -1).reshape(-1, 1)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.reshape(_moved(shape, self.axis)).movedim(-1, self.axis)

    def line_length(self, shape: Shape) -> int:
        return shape[self.axis]

    def __str__(self) -> str:
        return "element" if self.axis == 1 else f"element@{self.axis}"


class Filter(Structure):
    """``W[k]``: an output channel (conv filter, or a neuron's row of a linear layer)."""

    name = "filter"

    def to_groups(self, w: Tensor) -> Tensor:
        return w.reshape(w.shape[0], -1)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.reshape(tuple(shape))

    def line_length(self, shape: Shape) -> int:
        return shape[0]


class Channel(Structure):
    """``W[:, c]``: an input channel (a column of a linear layer)."""

    name = "channel"

    def to_groups(self, w: Tensor) -> Tensor:
        return w.movedim(1, 0).reshape(w.shape[1], -1)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.reshape(_moved_front(shape, 1)).movedim(0, 1)

    def line_length(self, shape: Shape) -> int:
        return shape[1]


def _moved_front(shape: Shape, axis: int) -> tuple[int, ...]:
    """``shape`` after ``movedim(axis, 0)``."""
    s = list(shape)
    s.insert(0, s.pop(axis))
    return tuple(s)


class Kernel(Structure):
    """``W[k, c]``: one 2D (or 1D/3D) kernel of a conv. Ordered (k, c), c fastest."""

    name = "kernel"
    min_ndim = 3

    def to_groups(self, w: Tensor) -> Tensor:
        return w.reshape(w.shape[0] * w.shape[1], -1)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.reshape(tuple(shape))

    def line_length(self, shape: Shape) -> int:
        return shape[1]


class Column(Structure):
    """``W[:, c, r, s]``: one column of the im2col matrix, across all filters.

    Ordered (r, s, c) with the input channel fastest, like ``Element``.
    """

    name = "column"
    min_ndim = 3

    def to_groups(self, w: Tensor) -> Tensor:
        return w.movedim(1, -1).reshape(w.shape[0], -1).t()

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.t().reshape(_moved(shape, 1)).movedim(-1, 1)

    def line_length(self, shape: Shape) -> int:
        return shape[1]


class Layer(Structure):
    """The whole weight: the layer (or, with shrink, a whole residual branch) lives or dies.

    The only structure that also fits a 1-D weight (a norm layer's scale, gated by PSP)."""

    name = "layer"

    def validate(self, shape: Shape, layer: str = "weight") -> None:
        if len(shape) < 1:
            raise StructureError(f"{layer}: structure layer needs a weight; got a scalar")

    def to_groups(self, w: Tensor) -> Tensor:
        return w.reshape(1, -1)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.reshape(tuple(shape))

    def line_length(self, shape: Shape) -> int:
        return 1


class Block(Structure):
    """``bh x bw`` tiles of the im2col matrix ``W.reshape(K, C*R*S)``, ordered row-major."""

    name = "block"

    def __init__(self, bh: int, bw: int):
        if not (isinstance(bh, int) and isinstance(bw, int)) or bh < 1 or bw < 1:
            raise StructureError(f"block sizes must be positive integers; got {bh}x{bw}")
        self.bh, self.bw = bh, bw

    def validate(self, shape: Shape, layer: str = "weight") -> None:
        super().validate(shape, layer)
        rows, cols = shape[0], math.prod(shape[1:])
        if self.bh > rows or self.bw > cols:
            raise StructureError(
                f"{layer}: block {self.bh}x{self.bw} is larger than its im2col matrix "
                f"{rows}x{cols}; allowed: bh <= {rows}, bw <= {cols}"
            )

    def _padded(self, shape: Shape) -> tuple[int, int, int, int]:
        rows, cols = shape[0], math.prod(shape[1:])
        return rows, cols, -(-rows // self.bh) * self.bh, -(-cols // self.bw) * self.bw

    def to_groups(self, w: Tensor) -> Tensor:
        rows, cols, prow, pcol = self._padded(w.shape)
        m = w.reshape(rows, cols)
        if (prow, pcol) != (rows, cols):
            m = torch.nn.functional.pad(m, (0, pcol - cols, 0, prow - rows))
        t = m.reshape(prow // self.bh, self.bh, pcol // self.bw, self.bw).permute(0, 2, 1, 3)
        return t.reshape(-1, self.bh * self.bw)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        rows, cols, prow, pcol = self._padded(shape)
        t = g.reshape(prow // self.bh, pcol // self.bw, self.bh, self.bw).permute(0, 2, 1, 3)
        return t.reshape(prow, pcol)[:rows, :cols].reshape(tuple(shape))

    def line_length(self, shape: Shape) -> int:
        return -(-math.prod(shape[1:]) // self.bw)

    def __str__(self) -> str:
        return f"block:{self.bh}x{self.bw}"


class KofN(Structure):
    """Exactly ``k`` kept in every run of ``n`` consecutive groups of ``base`` along its run
    axis. ``KofN(2, 4)`` is NVIDIA's 2:4 (element groups, runs along the input channels).

    ``n`` must divide the number of groups along the run axis; hwprune refuses rather than
    pads, because a padded run is not the pattern hardware executes.
    """

    name = "k:n"

    def __init__(self, k: int, n: int, base: Structure | None = None):
        if not (isinstance(k, int) and isinstance(n, int)) or n < 1 or not 1 <= k <= n:
            raise StructureError(f"k-of-n needs integers with 1 <= k <= n; got k={k}, n={n}")
        if isinstance(base, KofN):
            raise StructureError("the base of a k-of-n structure cannot itself be k-of-n")
        self.k, self.n = k, n
        self.base = base if base is not None else Element()
        self.min_ndim = self.base.min_ndim

    def validate(self, shape: Shape, layer: str = "weight") -> None:
        self.base.validate(shape, layer)
        line = self.base.line_length(shape)
        per_unit = self.base.num_groups(shape) // shape[0]  # groups per output unit
        # runs lie within a line, or are whole lines that tile each output unit (DPP's rows
        # over all C*R*S inputs of a filter)
        spans_lines = self.n % line == 0 and per_unit % self.n == 0
        if line % self.n and not spans_lines:
            divisors = [d for d in range(2, line + 1) if line % d == 0][:8]
            raise StructureError(
                f"{layer}: {self} needs runs of {self.n} {self.base} groups, but the run axis "
                f"has {line} (shape {tuple(shape)}), which {self.n} does not divide; allowed n "
                f"here: {divisors}. hwprune does not pad runs."
            )

    def to_groups(self, w: Tensor) -> Tensor:
        return self.base.to_groups(w)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return self.base.from_groups(g, shape)

    def line_length(self, shape: Shape) -> int:
        return self.base.line_length(shape)

    @property
    def sparsity(self) -> float:
        """Fraction of groups removed, implied by k and n."""
        return 1.0 - self.k / self.n

    def keep_top(self, scores: Tensor) -> Tensor:
        """Bool keep-mask over groups: the ``k`` highest scores of every run of ``n``."""
        runs = scores.reshape(-1, self.n)
        top = runs.topk(self.k, dim=1).indices
        keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(1, top, True)
        return keep.reshape(-1)

    def __str__(self) -> str:
        base = "" if str(self.base) == "element" else f"@{self.base}"
        return f"{self.k}:{self.n}{base}"


class FeatureMap(Structure):
    """A feature map of the network: every weight that writes it (a conv's filter, its bias,
    the BatchNorm entries) and every weight that reads it (the next layers' input channels),
    coupled through residual additions, concatenations and depthwise convs. Which weights
    belong to which map is found from the traced graph (``hwprune.deploy.feature_maps``);
    a method given ``"map"`` needs ``example_inputs`` to trace.

    As a view of one weight it is that weight's entries along ``axis``: 0 for a writer (a
    filter; an entry of a bias or a norm's scale), 1 for a reader (an input channel). ``str``
    is ``"map"`` for axis 0 and ``"map@1"`` for axis 1."""

    name = "map"
    min_ndim = 1

    def __init__(self, axis: int = 0):
        if axis not in (0, 1):
            raise StructureError(f"a feature map's axis is 0 (writers) or 1 (readers); got "
                                 f"{axis!r}")
        self.axis = axis

    def validate(self, shape: Shape, layer: str = "weight") -> None:
        if len(shape) <= self.axis:
            raise StructureError(f"{layer}: structure {self} needs a weight with an axis "
                                 f"{self.axis}; got shape {tuple(shape)}")

    def to_groups(self, w: Tensor) -> Tensor:
        return w.movedim(self.axis, 0).reshape(w.shape[self.axis], -1)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.reshape(_moved_front(shape, self.axis)).movedim(0, self.axis)

    def line_length(self, shape: Shape) -> int:
        return shape[self.axis]

    def __str__(self) -> str:
        return "map" if self.axis == 0 else f"map@{self.axis}"


class Head(Structure):
    """One attention head of a linear weight ``(out, in)``: ``size`` consecutive input columns
    (``axis=1``, ``"head:D"``: the head's slice of the output projection that reads the heads)
    or output rows (``axis=0``, ``"head:D@0"``: its rows of a query/key/value projection).
    Zero a head's output-projection columns (or its value rows) and shrink removes the head
    (``hwprune.deploy.transformer``); ``size`` is the head dimension, ``hidden / heads``."""

    name = "head"

    def __init__(self, size: int, axis: int = 1):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise StructureError(f"a head's size (the head dimension) must be an int >= 1; "
                                 f"got {size!r}")
        if axis not in (0, 1):
            raise StructureError(f"a head's axis is 0 (projection rows) or 1 (output-"
                                 f"projection columns); got {axis!r}")
        self.size, self.axis = size, axis

    def validate(self, shape: Shape, layer: str = "weight") -> None:
        if len(shape) != 2:
            raise StructureError(f"{layer}: structure {self} needs a linear weight (out, in); "
                                 f"got shape {tuple(shape)}")
        if shape[self.axis] % self.size:
            raise StructureError(
                f"{layer}: structure {self} needs axis {self.axis} (size {shape[self.axis]}) "
                f"to be a whole number of heads of {self.size}; allowed head sizes divide "
                f"{shape[self.axis]}")

    def to_groups(self, w: Tensor) -> Tensor:
        m = w.movedim(self.axis, 0)  # (heads * size, other)
        return m.reshape(m.shape[0] // self.size, -1)

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return g.reshape(_moved_front(shape, self.axis)).movedim(0, self.axis)

    def line_length(self, shape: Shape) -> int:
        return shape[self.axis] // self.size

    def __str__(self) -> str:
        return f"head:{self.size}" + ("" if self.axis == 1 else "@0")


class _Transposed:
    """Mixin of ``transposed``: the structure of an ``(out, in)`` weight applied to one
    stored ``(in, out)``."""

    def validate(self, shape: Shape, layer: str = "weight") -> None:
        super().validate(_swapped(shape), layer)

    def to_groups(self, w: Tensor) -> Tensor:
        return super().to_groups(w.transpose(0, 1))

    def from_groups(self, g: Tensor, shape: Shape) -> Tensor:
        return super().from_groups(g, _swapped(shape)).transpose(0, 1)

    def line_length(self, shape: Shape) -> int:
        return super().line_length(_swapped(shape))


def _swapped(shape: Shape) -> tuple[int, ...]:
    s = tuple(shape)
    return (s[1], s[0], *s[2:]) if len(s) >= 2 else s


_TRANSPOSED_CLASSES: dict[type, type] = {}


def transposed(structure: Structure) -> Structure:
    """``structure`` for a weight stored ``(in, out)`` (transformers' ``Conv1D``): groups,
    runs and validation are those of the ``(out, in)`` weight, so ``"2:4"`` still runs along
    the input dimension. The result is an instance of a subclass of ``structure``'s class
    (``isinstance`` checks and attributes such as ``k``/``n`` hold) and prints the same."""
    cls = type(structure)
    if isinstance(structure, _Transposed):
        raise StructureError(f"structure {structure} is already transposed")
    sub = _TRANSPOSED_CLASSES.setdefault(
        cls, type(f"Transposed{cls.__name__}", (_Transposed, cls), {}))
    out = object.__new__(sub)
    out.__dict__.update({k: v for k, v in structure.__dict__.items() if k != "_group_shapes"})
    return out


_SIMPLE = {
    "element": Element,
    "weight": Element,  # DPP's name for element-level k-of-n
    "filter": Filter,
    "channel": Channel,
    "kernel": Kernel,
    "column": Column,
    "layer": Layer,
    "map": FeatureMap,
}
STRUCTURE_NAMES = ("element", "filter", "channel", "kernel", "column", "layer", "map")
_ALLOWED = (
    "a name (" + ", ".join(STRUCTURE_NAMES) + "), 'k:n' (e.g. '2:4', optionally '2:4@kernel'), "
    "'block:BHxBW' (e.g. 'block:4x4'), 'head:D' or 'head:D@0' (attention heads of "
    "dimension D), or an object from hwprune.structures"
)
_KN = re.compile(r"^(\d+):(\d+)(?:@(\w+))?$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")
_HEAD = re.compile(r"^head:(\d+)(@0)?$")


def parse_structure(spec: str | Structure) -> Structure:
    """A ``Structure`` from its name or spec string (``str(s)`` parses back to ``s``)."""
    if isinstance(spec, Structure):
        return spec
    if not isinstance(spec, str):
        raise StructureError(f"structure must be {_ALLOWED}; got {spec!r}")
    s = spec.strip().lower()
    if s in _SIMPLE:
        return _SIMPLE[s]()
    if s.startswith("element@") and s[8:].isdigit():
        return Element(axis=int(s[8:]))
    if s == "map@1":
        return FeatureMap(axis=1)
    if m := _KN.match(s):
        k, n, base = int(m[1]), int(m[2]), m[3]
        if base is not None and (base not in _SIMPLE or base == "map"):
            raise StructureError(f"unknown base {base!r} in {spec!r}; allowed: {_ALLOWED}")
        return KofN(k, n, _SIMPLE[base]() if base else None)
    if m := _BLOCK.match(s):
        return Block(int(m[1]), int(m[2]))
    if m := _HEAD.match(s):
        return Head(int(m[1]), 0 if m[2] else 1)
    raise StructureError(f"unknown structure {spec!r}; allowed: {_ALLOWED}")
