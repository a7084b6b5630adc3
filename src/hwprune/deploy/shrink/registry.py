"""Which handler answers for a layer type: the built-in ones, and those users register.

``register_handler(MyLayer, handler)`` teaches shrink a layer type of its own (or replaces the
built-in handler of a torch layer); ``unregister_handler(MyLayer)`` takes it back. Registered
types are not traced into: shrink sees each call of them as one layer.
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from .handlers import ElementwiseHandler, LayerHandler, MixingHandler, PerChannelHandler
from .layers import BUILTIN_HANDLERS

__all__ = ["register_handler", "unregister_handler", "handler_for", "registered_types"]

_registered: dict[type, LayerHandler] = {}

_KINDS = "MixingHandler, PerChannelHandler, ElementwiseHandler or LayerHandler"


def register_handler(layer_type: type[nn.Module], handler: LayerHandler) -> None:
    """Use ``handler`` for ``layer_type`` and its subclasses from now on (replacing an earlier
    registration for the same type).

    Raises:
        ConfigError: ``layer_type`` is not an ``nn.Module`` subclass, ``handler`` is not an
            instance of one of the handler classes of ``hwprune.deploy``, or it lacks a method
            its kind requires, or a channel axis that is not an int.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ConfigError("register_handler: layer_type must be an nn.Module subclass, got "
                          f"{layer_type!r}")
    name = layer_type.__name__
    if isinstance(handler, type) and issubclass(handler, LayerHandler):
        raise ConfigError(f"register_handler({name}, ...): got the class {handler.__name__}; "
                          f"pass an instance, {handler.__name__}()")
    if not isinstance(handler, LayerHandler):
        raise ConfigError(f"register_handler({name}, ...): the handler must be an instance of "
                          f"a subclass of {_KINDS} (hwprune.deploy), got "
                          f"{type(handler).__name__}")
    missing = handler.missing()
    if missing:
        raise ConfigError(f"register_handler({name}, ...): {type(handler).__name__} does not "
                          f"define {', '.join(missing)}, which a {_kind(handler)} needs")
    for axis in ("in_dim", "out_dim", "dim"):
        value = getattr(handler, axis, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"register_handler({name}, ...): {type(handler).__name__}.{axis} "
                              f"must be an int channel axis (1 or -1, say), got {value!r}")
    _registered[layer_type] = handler


def unregister_handler(layer_type: type[nn.Module]) -> None:
    """Forget the handler registered for ``layer_type`` (a built-in one answers again).

    Raises:
        ConfigError: nothing is registered for ``layer_type``.
    """
    if layer_type not in _registered:
        known = sorted(t.__name__ for t in _registered) or "none"
        raise ConfigError(f"unregister_handler: no handler is registered for {layer_type!r}; "
                          f"registered: {known}")
    del _registered[layer_type]


def handler_for(layer_type: type) -> LayerHandler | None:
    """The handler for ``layer_type``: the nearest class in its MRO with one, a registered
    handler before a built-in one; None if there is none."""
    for t in layer_type.__mro__:
        handler = _registered.get(t) or BUILTIN_HANDLERS.get(t)
        if handler is not None:
            return handler
    return None


def registered_types() -> tuple[type, ...]:
    """The layer types users registered handlers for."""
    return tuple(_registered)


def _kind(handler: LayerHandler) -> str:
    for kind in (MixingHandler, PerChannelHandler, ElementwiseHandler):
        if isinstance(handler, kind):
            return kind.__name__
    return "LayerHandler"
