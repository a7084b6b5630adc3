"""The analysis: channel classes, constants and the conditions for removal over one graph.

``Analysis`` walks a traced graph once, in order, and gives every tensor with a channel axis a
``ChannelInfo``. A module call is answered by the handler registered for its type (the built-in
layers and any a user registered, see ``handlers``); a function or method call by the tensor-op
rules in ``ops``. Anything else pins the channels it touches, with the reason, and is recorded
in ``stopped`` (with the nodes after it that are untracked for that reason), so that a layer
whose input is untracked names the op that stopped the analysis.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import Tensor, fx

from . import ops
from .channels import ChannelClasses, ChannelInfo, unknown
from .handlers import LayerCall
from .nodes import nodes_in, where
from .registry import handler_for

__all__ = ["Analysis"]


class Analysis:
    """Channel classes, constants and the conditions for removal, over one traced graph.

    Handlers and op rules use ``info_of``, ``fresh``, ``read``, ``pin_all`` and
    ``unsupported`` to say how a call's channels relate to its inputs'.

    ``structural=True`` asks only what the graph allows, whatever the weights hold: a class a
    layer reads with nonzero weights is not pinned for it (the coupled feature maps of
    ``maps`` are found this way); shrink itself uses the default.
    """

    def __init__(self, gm: fx.GraphModule, structural: bool = False):
        self.gm = gm
        self.structural = structural
        self.modules = dict(gm.named_modules())
        self.classes = ChannelClasses()
        self.info: dict[fx.Node, ChannelInfo | None] = {}
        # node -> the op, not followed, that left it without channel info
        self.stopped: dict[fx.Node, str] = {}
        # node -> its channel info, decided ahead by a rule that looked past the node before
        # (the pieces of a chunk, the end of a channel shuffle)
        self.resolved: dict[fx.Node, ChannelInfo | None] = {}
        gets = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
        self.read_once_targets = {t for t, c in gets.items() if c == 1}
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.called = set(calls)
        self.shared = {t for t, c in calls.items() if c > 1
                       and any(True for _ in self.modules[t].parameters())}
        for node in gm.graph.nodes:
            self.info[node] = self._visit(node)
            if self.info[node] is None and node not in self.stopped:
                why = next((self.stopped[n] for n in nodes_in((node.args, node.kwargs))
                            if n in self.stopped), None)
                if why is not None:
                    self.stopped[node] = why

    # -- what handlers and op rules use ---------------------------------------------------
    def info_of(self, x: Any) -> ChannelInfo | None:
        return self.info.get(x) if isinstance(x, fx.Node) else None

    def input_of(self, node: fx.Node) -> tuple[Any, ChannelInfo | None]:
        """A call's first argument and its channel info."""
        x = node.args[0] if node.args else None
        return x, self.info_of(x)

    def fresh(self, dim: int, n: int, const: Tensor | None = None) -> ChannelInfo:
        """``n`` new classes on axis ``dim`` (a layer's outputs), with their constants."""
        return ChannelInfo(dim, self.classes.new(n), unknown(n) if const is None else const)

    def pin_all(self, value: Any, reason: str, candidate: bool = False) -> None:
        """Keep every channel of every node in ``value``, for ``reason``."""
        for n in nodes_in(value):
            info = self.info.get(n)
            if info is not None:
                for s in info.slots:
                    self.classes.pin(s, reason)
                    if candidate:
                        self.classes.candidate.add(s)

    def read(self, node: fx.Node, x: Any, weight_cols: Callable[[list[int]], Tensor],
             fold_refusal: Callable[[float], str | None]) -> None:
        """A weighted layer reads ``x``: a class it reads with nonzero weights stays unless its
        constant can be folded into the layer's bias (``fold_refusal(value)`` is None)."""
        info = self.info_of(x)
        if info is None:
            return
        for p, s in enumerate(info.slots):
            if self.structural or not bool(weight_cols([p]).any()):
                self.classes.candidate.add(s)
                continue
            v = float(info.const[p])
            if math.isnan(v):
                self.classes.pin(s, f"{where(node)} reads it with nonzero weights")
                continue
            self.classes.candidate.add(s)
            why = fold_refusal(v)
            if why is not None:
                self.classes.pin(s, why)

    def read_once(self, node: Any) -> bool:
        """Whether ``node`` reads an attribute that nothing else in the graph uses (shrink's
        own buffers, a layer scale), so that narrowing it disturbs no other op."""
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return False
        if node.target.startswith("_shrink_const_"):
            return True
        owner = node.target.rpartition(".")[0]
        return (node.target in self.read_once_targets and len(node.users) == 1
                and not (owner and owner in self.called))

    def unsupported(self, node: fx.Node, what: str) -> None:
        """Keep every channel ``node`` touches: ``what`` it does is not modelled."""
        self.stopped[node] = f"{what} ({where(node)}) is not followed by shrink"
        # listed in the result even where nothing is zero: the user should know what was
        # not analysed
        self.pin_all((node.args, node.kwargs), f"used by {what} ({where(node)}), which shrink "
                     "does not model", candidate=True)

    def kept_positions(self, node: Any, removed: set[int]) -> list[int] | None:
        """The positions of ``node``'s channel axis whose class is not in ``removed``."""
        info = self.info_of(node)
        if info is None:
            return None
        return [p for p, s in enumerate(info.slots) if self.classes.find(s) not in removed]

    # -- the walk ---------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> ChannelInfo | None:
        if node in self.resolved:
            return self.resolved.pop(node)
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.pin_all(node.args, "reaches the model's output")
            return None
        if node.op == "call_module":
            if node.target not in self.shared:
                return self._module(node)
            why = f"module {node.target} is called more than once"
            self.pin_all(node.args, why)  # first: this reason is the one reported
            out = self._module(node)
            for s in out.slots if out is not None else ():
                self.classes.pin(s, why)
            return out
        if node.op == "call_function":
            return ops.function_call(self, node)
        if node.op == "call_method":
            return ops.method_call(self, node)
        self.pin_all((node.args, node.kwargs), f"unsupported op {node.op} {node.target}")
        return None

    def _module(self, node: fx.Node) -> ChannelInfo | None:
        layer = self.modules[node.target]
        handler = handler_for(type(layer))
        x, info = self.input_of(node)
        if (handler is None and info is not None and not any(True for _ in layer.parameters())
                and not any(True for _ in layer.buffers())
                and ops.is_eval_identity(node, layer)):
            return ChannelInfo(info.dim, info.slots, info.const)  # stochastic depth in eval
        if handler is None:
            self.unsupported(node, f"module {node.target} ({type(layer).__name__})")
            return None
        return handler.analyse(LayerCall(node, layer, x, info), self)
