"""Fold inference BatchNorm into the convolution or linear layer that feeds it.

In eval mode a BatchNorm is a per-channel affine map, y = a * x + b, so a conv (or linear)
whose output goes only into a BatchNorm can absorb it: its filters are scaled by a and b
joins its bias (``torch.nn.utils.fusion`` does the arithmetic). The folded model runs one op
less per pair, which matters most where the remaining ops are small: batch 1, and the narrow
layers that ``shrink`` leaves. Zero filters stay zero (they are only scaled), so the pruned
pattern and its stored size are unchanged except that the BatchNorm's four vectors go and the
layer gains a bias.

The pairs are found in the torch.fx graph, so only real data flow counts: the producer's output
must have the BatchNorm as its only user, and neither module may be called twice. The
BatchNorm is replaced by ``nn.Identity`` in a copy of the model, which keeps its own class and
forward. The copy's outputs are compared with the input model's on ``example_inputs`` before it
is returned; the input model is never modified.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..errors import HwpruneError
from .tracing import trace
from .verify import ATOL, RTOL, compare_outputs, example_args, outputs_of

__all__ = ["fold_batchnorm", "FoldError"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FoldError(HwpruneError):
    """The model cannot be traced, or the folded copy does not compute what it computes."""


def fold_batchnorm(model: nn.Module, example_inputs: Any, *, atol: float = ATOL,
                   rtol: float = RTOL) -> nn.Module:
    """A copy of ``model`` in eval mode in which every BatchNorm fed only by a conv or
    linear layer is folded into it (the BatchNorm becomes ``nn.Identity``).

    Args:
        model: any traceable model (its own class, or the GraphModule ``shrink`` returns).
        example_inputs: a tensor or a tuple of tensors, to verify the result.
        atol, rtol: the verification tolerance on every output: max |difference| <= rtol *
            the output's largest magnitude + atol (``hwprune.deploy.verify``; folding reorders
            float arithmetic, so the outputs match to rounding, not bitwise).

    Raises:
        FoldError: bad ``example_inputs``, a model torch.fx cannot trace, or a folded copy
            that differs.
    """
    args = example_args(example_inputs, FoldError)
    work = copy.deepcopy(model).eval()
    traced = trace(work, FoldError)
    reference = outputs_of(work, args)
    with torch.no_grad():
        ShapeProp(traced).propagate(*args)  # a linear layer folds only on (N, C) outputs
        for producer, bn in _pairs(work, traced.graph):
            layer, norm = work.get_submodule(producer), work.get_submodule(bn)
            fused = (fuse_conv_bn_eval(layer, norm) if isinstance(layer, _CONV)
                     else fuse_linear_bn_eval(layer, norm))
            work.set_submodule(producer, fused)
            work.set_submodule(bn, nn.Identity())
    check = compare_outputs(outputs_of(work, args), reference, rtol=rtol, atol=atol)
    if not check.close:
        raise FoldError(f"folding BatchNorm changed {type(model).__name__}'s outputs by up to "
                        f"{check.max_abs_diff:.3g} at output scale {check.scale:.3g} (rtol="
                        f"{rtol}, atol={atol}); refusing to return it (the input model is "
                        "unchanged)")
    return work


def _pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """(producer, BatchNorm) module names that can be folded."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = model.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BN):
            continue
        src = node.args[0] if node.args else None
        if (not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or calls[src.target] != 1 or calls[node.target] != 1
                or not bn.track_running_stats or bn.running_mean is None):
            continue
        layer = model.get_submodule(src.target)
        shape = getattr(src.meta.get("tensor_meta"), "shape", None)
        conv = isinstance(layer, _CONV) and layer.out_channels == bn.num_features
        linear = (type(layer) is nn.Linear and isinstance(bn, nn.BatchNorm1d)
                  and shape is not None and len(shape) == 2
                  and layer.out_features == bn.num_features)
        if conv or linear:
            pairs.append((src.target, node.target))
    return pairs
