"""Tracing a model with torch.fx, as shrink and fold_batchnorm both need it."""

from __future__ import annotations

from torch import fx, nn

__all__ = ["trace", "check_not_compiled"]


def trace(model: nn.Module, error: type[Exception], *, leaf_modules: tuple[type, ...] = (),
          hint: str = "") -> fx.GraphModule:
    """``model`` as a ``GraphModule`` named after its class; ``leaf_modules`` are called, not
    traced into. A model fx cannot trace raises ``error``, its message ending with ``hint``."""

    check_not_compiled(model, error)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_modules) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise error(f"torch.fx cannot trace {type(model).__name__}: {e}"
                    + (f". {hint}" if hint else "")) from e
    return fx.GraphModule(model, graph, type(model).__name__)


def check_not_compiled(model: nn.Module, error: type[Exception]) -> None:
    """``error`` for torch.compile's wrapper (fx cannot trace it), saying what to pass."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise error(f"{type(model).__name__} is torch.compile's wrapper, which torch.fx cannot "
                    "trace: pass the model it wraps (compiled._orig_mod), then torch.compile "
                    "the result")
