"""What shrink gives back and how it fails: ``ShrinkResult``, ``KeptChannels``, ``ShrinkError``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...errors import HwpruneError

__all__ = ["ShrinkError", "KeptChannels", "ShrinkResult"]


class ShrinkError(HwpruneError):
    """The model cannot be traced, or the shrunk model would not compute the same function."""


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
