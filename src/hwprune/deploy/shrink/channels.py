"""Channel classes: a label per channel position, and the union-find that merges them.

Every tensor in the traced graph that has a channel axis gets a ``ChannelInfo``: the axis, a
class per position, and the constant each position carries (NaN where it varies with the
input). Positions that must be removed or kept together (the operands of a residual addition,
the input and outputs of a depthwise conv) share one class; ``ChannelClasses`` tracks which
classes are merged, which are pinned in place and why, and solves which can go.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ChannelInfo", "ChannelClasses", "unknown"]


def unknown(n: int) -> Tensor:
    """``n`` constants that are not known: the values vary with the input."""
    return torch.full((n,), math.nan, dtype=torch.float64)


@dataclass
class ChannelInfo:
    """A tensor's channel axis: ``dim``, a class per position, a constant per position (NaN:
    varies with the input)."""

    dim: int
    slots: list[int]
    const: Tensor  # float64, one value per position


class ChannelClasses:
    """Union-find over channel classes, with the reasons that pin a class in place."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: dict[int, str] = {}
        self.candidate: set[int] = set()  # zero weights or a constant somewhere: worth listing
        # class -> (class, reason): the first stays if the second does (a copy of a channel)
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
