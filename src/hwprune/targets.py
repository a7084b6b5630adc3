"""Which parameters a method prunes: the ``targets=`` argument.

Default: the weight of every Conv and Linear layer except the network's first conv and its last
linear layer (the input and the classifier are small and sensitive; every method in the field
leaves them dense by default). ``targets`` may also be

* a name or glob, or a list of them, matched against module names (``"layer1.*"``) and
  parameter names (``"layer1.0.conv1.weight"``);
* module types (``nn.Conv2d`` or a tuple of types);
* a predicate ``f(name, module) -> bool`` over modules.

A selected Conv/Linear module contributes its ``weight``; an LSTM/GRU/RNN module contributes
every ``weight_ih_l*`` / ``weight_hh_l*`` matrix (biases are never pruned).

With ``norm_layers=True`` (PSP's ``"layer"`` structure, which gates a module's whole output)
BatchNorm/GroupNorm/LayerNorm modules with affine parameters may be named too, so that the
last BatchNorm of a residual branch can gate the branch. They are never selected by default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from .errors import TargetError

__all__ = ["Target", "resolve_targets", "SkippedLayersWarning", "CONV_TYPES", "LINEAR_TYPES",
           "RNN_TYPES", "NORM_TYPES", "PRUNABLE_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES = (nn.Linear,)
RNN_TYPES = (nn.RNNBase,)  # LSTM, GRU, RNN
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
PRUNABLE_TYPES = (*CONV_TYPES, *LINEAR_TYPES, *RNN_TYPES)


@dataclass(frozen=True)
class Target:
    """One prunable weight: ``getattr(module, param)`` inside ``model`` at ``name``."""

    name: str  # the parameter's full name as the user knows it, e.g. "layer1.0.conv1.weight"
    module_name: str
    module: nn.Module
    param: str  # attribute name on the module: "weight", "weight_ih_l0", ...


class SkippedLayersWarning(UserWarning):
    """Default targets a method leaves dense because they cannot carry its structure (a
    depthwise conv's single input channel per group for k:n, a layer smaller than a block).
    One warning per pruner; ``skipped`` is ``{parameter name: why}`` (also ``pruner.skipped``).
    """

    def __init__(self, method: str, structure: str, skipped: dict[str, str]):
        self.skipped = dict(skipped)
        reasons = "; ".join(f"{name}: {why}" for name, why in self.skipped.items())
        super().__init__(
            f"{method}({structure}) leaves {len(self.skipped)} default target(s) dense that "
            f"cannot carry it: {reasons}. Pass strict=True to refuse instead, or targets= to "
            "choose the layers")


def _weights_of(module: nn.Module, norm_layers: bool = False) -> list[str]:
    if norm_layers and isinstance(module, NORM_TYPES):
        return ["weight"] if getattr(module, "weight", None) is not None else []
    if isinstance(module, RNN_TYPES):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    if isinstance(module, (*CONV_TYPES, *LINEAR_TYPES)):
        return ["weight"]
    return []


def _full(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _all_candidates(model: nn.Module, norm_layers: bool = False) -> list[Target]:
    return [
        Target(_full(mname, p), mname, m, p)
        for mname, m in model.named_modules()
        for p in _weights_of(m, norm_layers)
    ]


def _default(candidates: list[Target]) -> list[Target]:
    convs = [t for t in candidates if isinstance(t.module, CONV_TYPES)]
    linears = [t for t in candidates if isinstance(t.module, LINEAR_TYPES)]
    skip = set()
    if convs:
        skip.add(convs[0].name)
    if linears:
        skip.add(linears[-1].name)
    layers = (*CONV_TYPES, *LINEAR_TYPES)
    return [t for t in candidates if isinstance(t.module, layers) and t.name not in skip]


def _matches(pattern: str, t: Target) -> bool:
    return fnmatch.fnmatchcase(t.name, pattern) or fnmatch.fnmatchcase(t.module_name, pattern)


Spec = str | type | tuple | Callable[[str, nn.Module], bool] | Iterable[str] | None


def resolve_targets(model: nn.Module, targets: Spec = None,
                    norm_layers: bool = False) -> list[Target]:
    """The ordered list of weights ``targets`` selects in ``model``; never empty."""
    candidates = _all_candidates(model)
    if targets is not None and norm_layers:
        candidates = _all_candidates(model, norm_layers=True)
    if not candidates:
        raise TargetError(
            f"{type(model).__name__} has no Conv, Linear or RNN layer to prune; hwprune prunes "
            f"the weights of nn.Conv1d/2d/3d, nn.Linear, nn.LSTM/GRU/RNN"
        )
    if targets is None:
        chosen = _default(candidates)
        what = "the default (every Conv/Linear weight but the first conv and the last linear)"
    elif isinstance(targets, type) or (
        isinstance(targets, tuple) and targets and all(isinstance(t, type) for t in targets)
    ):
        chosen = [t for t in candidates if isinstance(t.module, targets)]
        what = f"types {targets}"
    elif callable(targets):
        chosen = [t for t in candidates if targets(t.module_name, t.module)]
        what = "the predicate"
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not all(isinstance(p, str) for p in patterns):
            raise TargetError(
                "targets must be None, a name/glob or a list of them, module types, or a "
                f"predicate f(name, module) -> bool; got {targets!r}"
            )
        chosen = [t for t in candidates if any(_matches(p, t) for p in patterns)]
        unmatched = [p for p in patterns if not any(_matches(p, t) for t in candidates)]
        if unmatched:
            raise TargetError(
                f"targets {unmatched} match no prunable weight; prunable weights are: "
                f"{_preview(candidates)}"
            )
        what = f"targets {patterns}"
    if not chosen:
        raise TargetError(f"{what} selects no weight; prunable weights are: {_preview(candidates)}")
    return chosen


def _preview(candidates: list[Target], limit: int = 12) -> str:
    names = [t.name for t in candidates]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
