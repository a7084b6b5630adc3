"""Which parameters a method prunes: the ``targets=`` argument.

Default: the weight of every Conv and Linear layer and every ``nn.MultiheadAttention``'s input
projection, except the network's first conv and the layers that produce its output (the input
and the classifier are small and sensitive; every method in the field leaves them dense by
default). The output's layers are found in the torch.fx graph: from the output back, through
anything that is not a Conv/Linear/RNN/attention layer (pooling, flatten, norms, activations),
to the first such layer on every path -- a SqueezeNet's classifier conv as much as a ResNet's
``fc``. A model torch.fx cannot trace falls back to "the last Linear layer" with a warning that
says why. A method leaves a default target that cannot carry its structure dense (a
``SkippedLayersWarning``; ``strict=True`` refuses instead). ``targets`` may also be

* a name or glob, or a list of them, matched against module names (``"layer1.*"``) and
  parameter names (``"layer1.0.conv1.weight"``);
* module types (``nn.Conv2d``, or a list or tuple of types);
* a predicate ``f(name, module) -> bool`` over modules.

Linear-like layers of other libraries are known by name through ``LINEAR_LAYOUTS`` (no import
of the library needed): transformers' ``Conv1D`` (GPT-2's layers) is a linear layer whose
weight is stored transposed, ``(in, out)``; ``register_linear_layer`` adds another. A target
of such a layer has ``transposed=True``, and structures see its weight as ``(out, in)``
(``structures.transposed``), so ``"2:4"`` runs along its input dimension as on ``nn.Linear``.

A selected Conv/Linear module contributes its ``weight``; an LSTM/GRU/RNN module contributes
every ``weight_ih_l*`` / ``weight_hh_l*`` matrix; an ``nn.MultiheadAttention`` its input
projection ``in_proj_weight`` (or ``q/k/v_proj_weight`` when key and value have their own
sizes), a linear weight of shape (out, in); its ``out_proj`` is an ``nn.Linear`` of its own.
Biases are never pruned.

With ``norm_layers=True`` (PSP's ``"layer"`` structure, which gates a module's whole output)
BatchNorm/GroupNorm/LayerNorm modules with affine parameters may be named too, so that the
last BatchNorm of a residual branch can gate the branch. They are never selected by default.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .errors import TargetError

__all__ = ["Target", "resolve_targets", "check_prunable", "output_layers", "layer_weights",
           "SkippedLayersWarning",
           "LINEAR_LAYOUTS", "register_linear_layer", "is_linear", "weight_transposed",
           "out_in", "CONV_TYPES", "LINEAR_TYPES", "RNN_TYPES", "ATTENTION_TYPES", "NORM_TYPES",
           "PRUNABLE_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES = (nn.Linear,)
RNN_TYPES = (nn.RNNBase,)  # LSTM, GRU, RNN
ATTENTION_TYPES = (nn.MultiheadAttention,)  # its input projection is a linear weight
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
PRUNABLE_TYPES = (*CONV_TYPES, *LINEAR_TYPES, *RNN_TYPES, *ATTENTION_TYPES)

#: linear-like layer types by qualified class name -> whether the weight is stored (in, out)
LINEAR_LAYOUTS: dict[str, bool] = {"transformers.pytorch_utils.Conv1D": True}


def register_linear_layer(cls: type | str, transposed: bool) -> None:
    """Treat ``cls`` (a type, or its ``module.QualName``) as a linear layer with a ``weight``
    of shape ``(out, in)``, or ``(in, out)`` with ``transposed=True``."""
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    LINEAR_LAYOUTS[name] = bool(transposed)


def _layout(module: nn.Module) -> bool | None:
    """Whether ``module`` is linear-like with a transposed weight; None: not linear-like."""
    for cls in type(module).__mro__:
        found = LINEAR_LAYOUTS.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a registered linear-like layer (transformers' ``Conv1D``)."""
    return isinstance(module, LINEAR_TYPES) or _layout(module) is not None


def weight_transposed(module: nn.Module) -> bool:
    """Whether ``module``'s ``weight`` is stored ``(in, out)`` (transformers' ``Conv1D``)."""
    return bool(_layout(module))


def out_in(w: Tensor, transposed: bool) -> Tensor:
    """``w`` as ``(out, in)``: transposed back where the layer stores it ``(in, out)``
    (also the way back: the operation is its own inverse)."""
    return w.transpose(0, 1) if transposed else w


@dataclass(frozen=True)
class Target:
    """One prunable weight: ``getattr(module, param)`` inside ``model`` at ``name``."""

    name: str  # the parameter's full name as the user knows it, e.g. "layer1.0.conv1.weight"
    module_name: str
    module: nn.Module
    param: str  # attribute name on the module: "weight", "weight_ih_l0", ...

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(in, out)`` (a ``Conv1D``'s)."""
        return self.param == "weight" and weight_transposed(self.module)

    @property
    def out_in_shape(self) -> tuple[int, ...]:
        """The weight's shape seen as ``(out, in, *kernel)`` (swapped for a ``Conv1D``)."""
        s = tuple(getattr(self.module, self.param).shape)
        return (s[1], s[0], *s[2:]) if self.transposed else s


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


def layer_weights(module: nn.Module) -> list[str]:
    """The names of ``module``'s own prunable weights (``[]`` for other modules): a Conv's or
    Linear's ``weight``, an RNN's ``weight_*`` matrices, an attention's input projection(s)."""
    if isinstance(module, ATTENTION_TYPES):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [n for n in names if getattr(module, n, None) is not None]
    if isinstance(module, RNN_TYPES):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    if isinstance(module, CONV_TYPES) or is_linear(module):
        return ["weight"]
    return []


def _weights_of(module: nn.Module, norm_layers: bool = False) -> list[str]:
    if norm_layers and isinstance(module, NORM_TYPES):
        return ["weight"] if getattr(module, "weight", None) is not None else []
    return layer_weights(module)


def _full(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _all_candidates(model: nn.Module, norm_layers: bool = False) -> list[Target]:
    return [
        Target(_full(mname, p), mname, m, p)
        for mname, m in model.named_modules()
        for p in _weights_of(m, norm_layers)
    ]


class _LayerTracer(fx.Tracer):
    """Traces down to the prunable layers and the modules without children."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, PRUNABLE_TYPES) or is_linear(m)
                or next(m.children(), None) is None)


def _graph(model: nn.Module) -> fx.Graph:
    """The graph down to the layers, else with torch.nn's modules as leaves (a
    TransformerEncoderLayer's forward has control flow torch.fx cannot follow)."""
    try:
        return _LayerTracer().trace(model)
    except Exception as first:  # torch.fx raises many types for untraceable code
        try:
            return fx.Tracer().trace(model)
        except Exception:
            raise first from None


def output_layers(model: nn.Module) -> set[str]:
    """Names of the modules whose weights write the model's output: from the traced graph's
    output back to the first Conv/Linear/RNN layer on every path (an attention's ``out_proj``
    where the path meets an ``nn.MultiheadAttention``). Raises what torch.fx raises for a
    model it cannot trace, and ``TargetError`` where a path meets a module that holds layers
    but could only be traced as a whole."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):  # torch.compile's wrapper: the wrapped model's graph
        return {f"_orig_mod.{name}" for name in output_layers(inner)}
    graph = _graph(model)
    modules = dict(model.named_modules())
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, ATTENTION_TYPES):
            found.add(f"{node.target}.out_proj")
        elif isinstance(m, PRUNABLE_TYPES) or (m is not None and is_linear(m)):
            found.add(node.target)
        elif m is not None and any(isinstance(s, PRUNABLE_TYPES) or is_linear(s)
                                   for s in m.modules()):
            raise TargetError(f"the output comes through {node.target} ({type(m).__name__}), "
                              "whose layers torch.fx could only trace as a whole")
        else:
            stack.extend(node.all_input_nodes)
    return found


def _default(model: nn.Module, candidates: list[Target]) -> list[Target]:
    convs = [t for t in candidates if isinstance(t.module, CONV_TYPES)]
    skip = {t.name for t in convs[:1]}
    try:
        outputs = output_layers(model)
        skip |= {t.name for t in candidates if t.module_name in outputs}
    except Exception as e:  # torch.fx raises many types for untraceable code
        linears = [t for t in candidates if is_linear(t.module)]
        skip |= {t.name for t in linears[-1:]}
        warnings.warn(
            f"hwprune.targets: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
            f"{e}), so the layer that produces its output is not known; the default targets "
            f"leave its last Linear layer ({linears[-1].name if linears else 'none'}) dense "
            "instead. Pass targets= to choose the layers.", stacklevel=3)
    layers = (*CONV_TYPES, *ATTENTION_TYPES)
    return [t for t in candidates
            if (isinstance(t.module, layers) or is_linear(t.module)) and t.name not in skip]


def _matches(pattern: str, t: Target) -> bool:
    return fnmatch.fnmatchcase(t.name, pattern) or fnmatch.fnmatchcase(t.module_name, pattern)


Spec = str | type | tuple | list | Callable[[str, nn.Module], bool] | Iterable[str] | None


def resolve_targets(model: nn.Module, targets: Spec = None,
                    norm_layers: bool = False) -> list[Target]:
    """The ordered list of weights ``targets`` selects in ``model``; never empty."""
    candidates = _all_candidates(model)
    if targets is not None and norm_layers:
        candidates = _all_candidates(model, norm_layers=True)
    if not candidates:
        raise TargetError(
            f"{type(model).__name__} has no Conv, Linear, RNN or attention layer to prune; "
            "hwprune prunes the weights of nn.Conv1d/2d/3d, nn.Linear (and the linear-like "
            "layers of LINEAR_LAYOUTS, such as transformers' Conv1D), nn.LSTM/GRU/RNN and "
            "nn.MultiheadAttention's input projection"
        )
    if targets is None:
        chosen = _default(model, candidates)
        what = ("the default (every Conv/Linear/attention weight but the first conv and the "
                "layers that produce the output)")
    elif isinstance(targets, type) or _all_types(targets):
        types = targets if isinstance(targets, type) else tuple(targets)
        chosen = [t for t in candidates if isinstance(t.module, types)]
        what = f"types {types}"
    elif callable(targets):
        chosen = [t for t in candidates if targets(t.module_name, t.module)]
        what = "the predicate"
    else:
        patterns = ([targets] if isinstance(targets, str)
                    else list(targets) if isinstance(targets, Iterable) else [targets])
        if not all(isinstance(p, str) for p in patterns):
            raise TargetError(
                "targets must be None, a name/glob or a list of them, a module type or a list "
                f"of them, or a predicate f(name, module) -> bool; got {targets!r}"
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
    if targets is not None:  # a default target that is not prunable is the pruner's to skip
        for t in chosen:
            check_prunable(t)
    return chosen


def _all_types(targets: object) -> bool:
    """Whether ``targets`` is a non-empty list or tuple of module types."""
    return (isinstance(targets, (list, tuple)) and len(targets) > 0
            and all(isinstance(t, type) for t in targets))


def check_prunable(t: Target) -> None:
    """A target must be a non-empty parameter of its module (or already parametrized, which
    the pruner reports itself): a computed tensor cannot carry a parametrization, and an
    empty weight has no groups to prune."""
    if parametrize.is_parametrized(t.module, t.param):
        return
    w = getattr(t.module, t.param)
    if not isinstance(w, nn.Parameter):
        raise TargetError(f"{t.name}: a {type(w).__name__}, not an nn.Parameter of "
                          f"{type(t.module).__name__} (a computed tensor, not a leaf); "
                          "hwprune prunes parameters: assign an nn.Parameter, or exclude it "
                          "with targets=")
    if w.numel() == 0:
        raise TargetError(f"{t.name}: empty (shape {tuple(w.shape)}), nothing to prune; "
                          "exclude it with targets=")


def _preview(candidates: list[Target], limit: int = 12) -> str:
    names = [t.name for t in candidates]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
