"""A pruner's resumable state: ``state_dict`` / ``load_state_dict`` (``Resumable``, a base of
``Pruner``) and the check of a state before any of it is loaded: a state that does not fit is
refused whole (``ConfigError`` naming the field or layer), so a load never stops half way with
some layers from the new state and the rest from the old."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, LifecycleError

__all__ = ["Resumable", "check_state"]


class Resumable:
    """What ``Pruner`` saves and restores to resume exactly; the pruner provides ``layers``,
    ``structure``, the counters, ``pattern_fixed``, ``_check_live`` and ``_freeze_pattern``.
    Methods add their own state through the two hooks below."""

    def _extra_state(self) -> dict[str, Any]:
        """Resumable state outside the parametrizations (RNG, ADMM phase, ...)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: counters, and per layer the
        parametrization's state (masks, alphas, logits, ...), plus method extras."""
        self._check_live("state_dict")
        return {
            "method": type(self).__name__,
            "structure": str(self.structure),
            "steps": self.steps,
            "epochs": self.epochs,
            "pattern_fixed": self.pattern_fixed,
            "layers": {
                name: {k: v.detach().clone() for k, v in layer.parametrization.state_dict().items()}
                for name, layer in self.layers.items()
            },
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output into this pruner (built the same way).

        Everything is checked before anything is loaded (``ConfigError`` naming the field or
        layer); if loading still fails part way (a method's extra state), the pruner is put
        back as it was, so a failed load never leaves some layers from the new state."""
        self._check_live("load_state_dict")
        check_state(state, type(self).__name__, str(self.structure),
                    {name: layer.parametrization.state_dict()
                     for name, layer in self.layers.items()})
        if self.pattern_fixed and not state.get("pattern_fixed", True):
            raise LifecycleError("the state was saved before fix_pattern() and this pruner has "
                                 "fixed its pattern: load it into one that has not")
        saved = self.state_dict()
        try:
            self._load_checked(state)
        except BaseException:
            self._load_checked(saved)
            raise

    def _load_checked(self, state: dict[str, Any]) -> None:
        for name, layer in self.layers.items():
            layer.parametrization.load_state_dict(state["layers"][name])
        self.steps, self.epochs = state["steps"], state["epochs"]
        self._load_extra_state(state.get("extra", {}))
        if state.get("pattern_fixed") and not self.pattern_fixed:  # fixed mid-phase (ADMM's
            with torch.no_grad():  # retrain_at), or by a caller before saving
                self._freeze_pattern()
            self.pattern_fixed = True


def check_state(state: Any, method: str, structure: str,
                layers: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Raise ``ConfigError`` naming the first field of ``state`` (``Pruner.state_dict()``
    output) that does not fit a pruner of ``method`` and ``structure`` whose layers'
    parametrizations hold ``layers`` ({layer name: their state_dict()})."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"pruner state must be a mapping (state_dict() output); got "
                          f"{type(state).__name__}")
    missing = [k for k in ("method", "structure", "steps", "epochs", "layers") if k not in state]
    if missing:
        raise ConfigError(f"pruner state has no {', '.join(missing)}; allowed: the output of "
                          "state_dict()")
    if state["method"] != method:
        raise ConfigError(f"state is from method {state['method']!r}, this pruner is {method!r}")
    if state["structure"] != structure:
        raise ConfigError(f"state has structure {state['structure']!r}, this pruner "
                          f"{structure!r}")
    if not isinstance(state.get("pattern_fixed", False), bool):
        raise ConfigError(f"pruner state field pattern_fixed: got {state['pattern_fixed']!r}; "
                          "allowed: true or false")
    for field in ("steps", "epochs"):
        v = state[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"pruner state field {field}: got {v!r}; allowed: an int >= 0")
    given = state["layers"]
    if not isinstance(given, Mapping):
        raise ConfigError(f"pruner state field layers: got {type(given).__name__}; allowed: a "
                          "mapping of layer name to its parametrization state")
    if set(given) != set(layers):
        raise ConfigError(
            "state targets differ from this pruner's: missing "
            f"{sorted(set(layers) - set(given))}, unexpected "
            f"{sorted(set(given) - set(layers), key=str)}"
        )
    for name, mine in layers.items():
        _check_layer(name, given[name], mine)
    if not isinstance(state.get("extra", {}), Mapping):
        raise ConfigError(f"pruner state field extra: got {type(state['extra']).__name__}; "
                          "allowed: a mapping")


def _check_layer(name: str, given: Any, mine: Mapping[str, Tensor]) -> None:
    """``given`` must hold a tensor of the same shape for every entry of ``mine``."""
    if not isinstance(given, Mapping):
        raise ConfigError(f"pruner state of layer {name}: got {type(given).__name__}; "
                          "allowed: a mapping of tensors")
    if set(given) != set(mine):
        raise ConfigError(f"pruner state of layer {name}: keys {sorted(map(str, given))}; "
                          f"allowed: {sorted(mine)}")
    for key, ref in mine.items():
        v = given[key]
        if not isinstance(v, Tensor) or v.shape != ref.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ConfigError(f"pruner state of layer {name}: {key} is {got}; allowed: a "
                              f"tensor of shape {tuple(ref.shape)}")
