"""``shrink``: trace, analyse, rewrite, verify, and give back the model's own class where it can."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..tracing import check_not_compiled, trace
from ..verify import ATOL, RTOL, compare_outputs, example_args, flat_outputs, outputs_of
from .analysis import Analysis
from .nodes import set_module
from .registry import registered_types
from .result import ShrinkError, ShrinkResult
from .rewrite import describe_kept, fold_constant_operands, rewrite, solve
from .transformer import is_transformer, shrink_transformer

__all__ = ["shrink"]

_TRACE_HINT = ("shrink needs a traceable forward; pass the modules it cannot trace as "
               "leaf_modules=(Type, ...) (their channels are then kept)")


def shrink(model: nn.Module, example_inputs: Any, *, atol: float = ATOL, rtol: float = RTOL,
           leaf_modules: tuple[type, ...] = (), return_result: bool = False
           ) -> nn.Module | ShrinkResult:
    """A physically smaller copy of ``model`` without its entirely-zero channels and layers.

    Args:
        model: a model whose pruned structures are zero (``pruner.finalize()``); not modified.
        example_inputs: a tensor or a tuple of positional inputs; used to trace shapes and to
            verify the result.
        atol, rtol: the verification tolerance on every output, eval mode: max |difference|
            <= rtol * the output's largest magnitude + atol (``hwprune.deploy.verify``).
        leaf_modules: module types not to trace into (custom ops); channels they touch stay,
            unless a handler is registered for the type (``register_handler``).
        return_result: give a ``ShrinkResult`` (model, what stayed and why) instead of the model.

    Returns:
        the model in eval mode (or a ``ShrinkResult``): an instance of the input model's own
        class when shrinking only narrowed layers, else a ``torch.fx.GraphModule`` (a graph
        rewritten: padding changed, a branch or a concatenated layer gone, a constant folded).

    A Hugging Face transformer (BERT, GPT-2, Llama, ViT and their kin) is not traced: its zero
    attention heads and feed-forward neurons are removed from the modules' layout
    (``transformer``).

    Raises:
        ShrinkError: the model cannot be traced, or the verification fails.
    """
    if not isinstance(model, nn.Module):
        raise ShrinkError(f"shrink needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ShrinkError("shrink the bare model (ddp.module), not its DistributedDataParallel "
                          "wrapper; the result has new parameters: wrap it in a new "
                          "DistributedDataParallel to train it further")
    check_not_compiled(model, ShrinkError)  # before a forward pass would compile it
    if is_transformer(model):  # heads and neurons from the modules' layout, no trace
        return shrink_transformer(model, example_inputs, rtol=rtol, atol=atol,
                                  return_result=return_result)
    args = example_args(example_inputs, ShrinkError)
    work = copy.deepcopy(model).eval()  # the user's model keeps its weights and its mode
    reference = outputs_of(work, args)
    gm = trace(work, ShrinkError, leaf_modules=(*leaf_modules, *registered_types()),
               hint=_TRACE_HINT)
    traced_code = gm.code
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
        branches = fold_constant_operands(gm, Analysis(gm))
        ShapeProp(gm).propagate(*args)
        an = Analysis(gm)
        removed, reasons = solve(gm, an)
        result = ShrinkResult(gm, _params(model), 0, branches=branches)
        rewrite(gm, an, removed, result)
        describe_kept(an, reasons, result)
        gm.eval()
        try:
            got = flat_outputs(gm(*args))
        except Exception as e:  # a narrowed layer that does not fit its neighbours
            raise ShrinkError(f"the shrunk model fails on example_inputs: {e} (a bug in shrink "
                              "or in a registered handler; the input model is unchanged)") from e
    check = compare_outputs(got, reference, rtol=rtol, atol=atol)
    if not check.same_shapes:
        raise ShrinkError("the shrunk model's outputs have other shapes than the input model's "
                          "(a bug in shrink or in a registered handler; the input model is "
                          "unchanged)")
    if not check.close:
        raise ShrinkError(f"the shrunk model differs from the input model by up to "
                          f"{check.max_abs_diff:.3g} at output scale {check.scale:.3g} "
                          f"(rtol={rtol}, atol={atol}) on example_inputs; refusing to return "
                          "it (a bug in shrink or in a registered handler; the input model is "
                          "unchanged)")
    if gm.code == traced_code:  # only layers narrowed: the model's own class can run it
        plain = _in_own_class(work, gm, args, got)
        if plain is not None:
            result.model = plain
    result.params_after = _params(result.model)
    result.max_abs_diff = check.max_abs_diff
    return result if return_result else result.model


def _in_own_class(work: nn.Module, gm: fx.GraphModule, args: tuple,
                  got: list[Tensor]) -> nn.Module | None:
    """``work`` (a copy of the input model) with the modules and attributes of ``gm``'s graph
    put in place, when the graph is the traced one unchanged: the user's class, its forward
    and methods, and no fx call overhead. None if it does not compute exactly what ``gm``
    computes."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            set_module(work, node.target, gm.get_submodule(node.target))
        elif node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            value = getattr(gm.get_submodule(owner) if owner else gm, name)
            setattr(work.get_submodule(owner) if owner else work, name, value)
    mine = outputs_of(work.eval(), args)
    same = len(mine) == len(got) and all(torch.equal(a, b) for a, b in zip(mine, got,
                                                                          strict=True))
    return work if same else None


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
