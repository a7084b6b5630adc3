"""Small torch.fx helpers: a node's shape and name, the nodes in an argument, attributes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, fx, nn

__all__ = ["shape_of", "where", "nodes_in", "get_attr", "set_module", "set_tensor_attr"]


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The shape ``ShapeProp`` recorded for ``node``; None for a non-tensor or a non-node."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def where(node: fx.Node) -> str:
    """A node as the user knows it: the module's name, else the traced op's name."""
    return str(node.target) if node.op == "call_module" else node.name


def nodes_in(value: Any) -> Iterable[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


def get_attr(module: nn.Module, target: str) -> Any:
    """``module``'s attribute at the dotted path ``target``."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def set_tensor_attr(root: nn.Module, target: str, t: Tensor) -> None:
    """Replace the buffer or (frozen) parameter at ``target`` by a copy of ``t``."""
    parent, _, name = target.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if name in owner._buffers:
        owner._buffers[name] = t.clone()
    else:
        setattr(owner, name, nn.Parameter(t.clone(), requires_grad=False))
