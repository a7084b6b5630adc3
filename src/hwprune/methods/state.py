"""The check of a pruner state before ``Pruner.load_state_dict`` loads any of it: a state that
does not fit is refused whole (``ConfigError`` naming the field or layer), so a load never
stops half way with some layers from the new state and the rest from the old."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..errors import ConfigError

__all__ = ["check_state"]


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
