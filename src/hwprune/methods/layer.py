"""``PrunedLayer``: one target weight under pruning, as every method's hooks see it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..structures import Structure
from ..targets import Target

__all__ = ["PrunedLayer"]


@dataclass
class PrunedLayer:
    """One target weight under pruning: where it lives, its structure, its parametrization."""

    target: Target
    structure: Structure
    shape: tuple[int, ...]
    parametrization: nn.Module | None = None

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def module(self) -> nn.Module:
        return self.target.module

    @property
    def param(self) -> str:
        return self.target.param

    def effective_weight(self) -> Tensor:
        """The weight the layer computes with now (mask, scale, ... applied)."""
        return getattr(self.module, self.param)

    def original(self) -> nn.Parameter:
        """The trainable tensor underneath the parametrization."""
        return self.module.parametrizations[self.param].original
