"""Layer handlers: what shrink must know of a layer type to follow and rebuild it.

A handler answers two questions about one layer type. ``analyse``: how does a call of the layer
relate its output channels to its input channels (new channels mixed from the inputs, like a
conv; the same channels, each mapped on its own, like a BatchNorm or an activation), and which
input channels does it really read? ``rebuild``: given the input and output channels that
stay, what is the narrowed copy of the layer?

Three base classes cover the usual kinds of layer with a few small methods each;
``LayerHandler`` itself, with ``analyse`` and ``rebuild`` overridden, gives full control (the
built-in handlers in ``layers`` are written that way). Register an instance with
``register_handler(LayerType, handler)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from .channels import ChannelInfo, unknown
from .nodes import shape_of, where
from .result import ShrinkError

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["LayerHandler", "MixingHandler", "PerChannelHandler", "ElementwiseHandler",
           "LayerCall", "Narrowing", "Rebuilt"]


def required(method: Callable) -> Callable:
    """Marks a method a concrete handler must override (checked by ``register_handler``)."""
    method.__hwprune_required__ = True
    return method


@dataclass
class LayerCall:
    """One call of a layer in the traced graph, as ``analyse`` sees it: the graph ``node``,
    the ``layer``, its first argument ``x`` and that tensor's channels (``info``; None where
    shrink does not track them)."""

    node: fx.Node
    layer: nn.Module
    x: Any
    info: ChannelInfo | None

    @property
    def name(self) -> str:
        return where(self.node)

    def in_axis(self, dim: int) -> int | None:
        """``dim`` of the input as a non-negative axis (None: the input is not a tensor)."""
        shape = shape_of(self.x)
        return dim % len(shape) if shape else None

    def out_shape(self) -> tuple[int, ...] | None:
        return shape_of(self.node)


@dataclass
class Narrowing:
    """What the rewrite asks a handler to build: the positions of the layer's input and
    output channels that stay (``keep_in``, ``keep_out``; None where they are not tracked:
    all stay), and the channels themselves (``input``, ``output``: their counts, and the
    constants of removed inputs that a bias can take), and the input's shape."""

    name: str
    layer: nn.Module
    keep_in: list[int] | None
    keep_out: list[int] | None
    input: ChannelInfo | None
    output: ChannelInfo | None
    in_shape: tuple[int, ...] | None = None  # the input's shape, where the graph records it


@dataclass
class Rebuilt:
    """A narrowed layer, its (in, out) channel counts before and after, and whether its bias
    took the constant of a removed input channel."""

    module: nn.Module
    before: tuple[int, int]
    after: tuple[int, int]
    folded: bool = False


class LayerHandler:
    """How shrink follows channels through one layer type and builds its narrowed copy."""

    @required
    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        """The channels of the call's output (None: not tracked); report how the input's
        channels are read through ``an.read``, ``an.pin_all`` or ``an.unsupported``."""
        raise NotImplementedError

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        """The narrowed copy of ``plan.layer``; None where nothing changes."""
        return None

    def missing(self) -> list[str]:
        """The required methods this handler does not define."""
        return [name for name in dir(type(self))
                if getattr(getattr(type(self), name), "__hwprune_required__", False)]

    def unsupported_axis(self, call: LayerCall, an: Analysis, axis: int | None) -> None:
        an.unsupported(call.node, f"a {type(call.layer).__name__} whose channels are not on "
                       f"axis {axis}")


class MixingHandler(LayerHandler):
    """A layer whose output channels are weighted sums of its input channels, like a conv or
    a linear layer.

    Define ``weight(layer)``: a tensor ``(out_channels, in_channels, ...)`` whose ``[k, c]``
    entries are every weight by which input channel ``c`` reaches output channel ``k``, and
    ``narrow(layer, keep_in, keep_out)``: a new layer that computes the kept output channels
    from the kept input channels (both index tensors, in order). ``in_dim`` and ``out_dim``
    are the channel axes of the input and the output (1: ``(N, C, ...)`` like a conv; -1:
    features last, like ``nn.Linear``).

    An input channel goes when the layer's weights for it are all zero (or it is always zero),
    so the layer must be linear in each input channel: a zero channel adds nothing. An output
    channel goes when nothing downstream reads it. The constants of the output channels are
    taken as unknown unless ``output_constants`` gives them.
    """

    in_dim = 1
    out_dim = 1

    @required
    def weight(self, layer: nn.Module) -> Tensor:
        raise NotImplementedError

    @required
    def narrow(self, layer: nn.Module, keep_in: Tensor, keep_out: Tensor) -> nn.Module:
        raise NotImplementedError

    def output_constants(self, layer: nn.Module, in_const: Tensor) -> Tensor | None:
        """Per output channel, the value it always has given the inputs' constants (NaN: it
        varies), or None: all vary."""
        return None

    def fold_refusal(self, call: LayerCall, value: float) -> str | None:
        """Why an input channel that always carries ``value`` and is read with nonzero weights
        cannot go (None: its contribution can be folded into the narrowed layer)."""
        if value == 0:
            return None
        return (f"its constant enters {call.name} ({type(call.layer).__name__}), whose handler "
                "does not fold constants into a bias")

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        w = self.weight(call.layer).detach()
        cout, cin = w.shape[0], w.shape[1]
        info, axis = call.info, call.in_axis(self.in_dim)
        if axis is not None:
            _check_count(call, "input", cin, shape_of(call.x)[axis], "weight(layer).shape[1]")
        if info is not None and info.dim != axis:
            self.unsupported_axis(call, an, axis)
            info = None
        elif info is not None:
            an.read(call.node, call.x, lambda p: w[:, p], lambda v: self.fold_refusal(call, v))
        out_shape = call.out_shape()
        if out_shape is None:
            return None
        out_axis = self.out_dim % len(out_shape)
        _check_count(call, "output", cout, out_shape[out_axis], "weight(layer).shape[0]")
        const = self.output_constants(call.layer, unknown(cin) if info is None else info.const)
        return an.fresh(out_axis, cout, const)

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        w = self.weight(plan.layer)
        cout, cin = w.shape[0], w.shape[1]
        kin = plan.keep_in if plan.keep_in is not None else list(range(cin))
        kout = plan.keep_out if plan.keep_out is not None else list(range(cout))
        if len(kin) == cin and len(kout) == cout:
            return None
        new = self.narrow(plan.layer, torch.tensor(kin, dtype=torch.long),
                          torch.tensor(kout, dtype=torch.long))
        return Rebuilt(new, (cin, cout), (len(kin), len(kout)))


class PerChannelHandler(LayerHandler):
    """A layer that maps each channel on its own: output channel ``c`` depends on input
    channel ``c`` only (a BatchNorm, a per-channel scale or affine map).

    Define ``narrow(layer, keep)``: the layer for the kept channels only (an index tensor, in
    order). ``dim`` is the channel axis. A channel goes exactly when it goes before and after
    the layer. ``constants`` may say what a channel with a constant input outputs.
    """

    dim = 1

    @required
    def narrow(self, layer: nn.Module, keep: Tensor) -> nn.Module:
        raise NotImplementedError

    def constants(self, layer: nn.Module, const: Tensor) -> Tensor | None:
        """Per channel, the output for an input that is always ``const`` (NaN: it varies),
        or None: all vary."""
        return None

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        info, axis = call.info, call.in_axis(self.dim)
        if info is None or info.dim != axis:
            self.unsupported_axis(call, an, axis)
            return None
        const = self.constants(call.layer, info.const)
        return ChannelInfo(info.dim, info.slots,
                           unknown(len(info.slots)) if const is None else const)

    def rebuild(self, plan: Narrowing) -> Rebuilt | None:
        if plan.keep_out is None or len(plan.keep_out) == len(plan.output.slots):
            return None
        n, k = len(plan.output.slots), len(plan.keep_out)
        new = self.narrow(plan.layer, torch.tensor(plan.keep_out, dtype=torch.long))
        return Rebuilt(new, (n, n), (k, k))


class ElementwiseHandler(LayerHandler):
    """A layer that applies one function to every element (an activation of your own):
    channels pass through it unchanged and there is nothing to narrow. ``constants`` may say
    what it makes of a constant channel (default: unknown)."""

    def constants(self, layer: nn.Module, const: Tensor) -> Tensor | None:
        return None

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        info = call.info
        if info is None:
            return None
        const = self.constants(call.layer, info.const)
        return ChannelInfo(info.dim, info.slots,
                           unknown(len(info.slots)) if const is None else const)


def _check_count(call: LayerCall, side: str, handler_says: int, graph_says: int,
                 what: str) -> None:
    if handler_says != graph_says:
        raise ShrinkError(f"the shrink handler for {type(call.layer).__name__} ({call.name}) "
                          f"says {handler_says} {side} channels ({what}), but the traced "
                          f"{side} has {graph_says} on its channel axis; fix the handler's "
                          "weight() or its in_dim/out_dim")
