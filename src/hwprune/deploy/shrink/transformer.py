"""Shrinking a transformer: removing its zero attention heads and feed-forward neurons.

torch.fx cannot trace Hugging Face's BERT or GPT-2, and their hidden (residual) dimension
could not lose a channel anyway: every block normalises it with a LayerNorm, whose mean and
variance are taken over all hidden channels, so removing one, even one that is exactly zero
everywhere, changes the statistics of the rest (``(sum x) / n`` is not ``(sum x) / (n-1)``).
What can go is inside the blocks, found from the layout of the modules (``sites``):

* a **head** goes when its columns of the output projection are all zero, or when its value
  rows are: then the head outputs its value bias wherever it attends (attention weights sum
  to one), a constant that the output projection's bias takes;
* a **feed-forward neuron** goes when its column of the down projection is zero, or when its
  row of the up projection is: then it always outputs ``act(bias)``, which the down
  projection's bias takes. A gated neuron, ``act(gate(x)) * up(x)``, goes when one factor is
  a constant zero (its up row and bias zero, or its gate row zero and ``act(gate bias)`` zero)
  or both are constants (their product goes into the down projection's bias).

A unit of attention is a head, or under grouped-query attention a key/value head with the
query heads that read it (``sites``): the query heads of a group go together.

A head whose query or key rows are zero stays: its attention is uniform, not zero. At least
one head and one neuron stay per block (a layer of zero heads is not an HF module). The
result is the model's own class, narrowed in place (head counts and split sizes updated),
checked against the input model on ``example_inputs`` like every shrink.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..verify import compare_outputs, example_args, flat_outputs, outputs_of
from .result import KeptChannels, ShrinkError, ShrinkResult
from .sites import (
    AttentionSite,
    FeedForwardSite,
    attention_sites,
    feed_forward_sites,
    linear_weight,
)

__all__ = ["is_transformer", "shrink_transformer"]


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is, or holds, a Hugging Face model with attention or feed-forward
    blocks of a layout ``sites`` knows."""
    return (any(type(m).__module__.startswith("transformers.") for m in model.modules())
            and bool(attention_sites(model) or feed_forward_sites(model)))


def _heads(site: AttentionSite, result: ShrinkResult) -> tuple[Tensor, Tensor]:
    """The heads that stay and the constant the output projection's bias takes."""
    d = site.head_dim
    wo = linear_weight(site.out)
    (wq, _), (wk, _), (wv, bv) = site.qkv()
    keep, add = [], torch.zeros(wo.shape[0], dtype=torch.float64)
    uniform = []
    for h in range(site.heads):
        cols = slice(h * d, (h + 1) * d)
        if not wo[:, cols].any():
            continue
        if not wv[cols].any():
            if bv is not None:
                add += wo[:, cols].double() @ bv[cols].double()
            continue
        keep.append(h)
        if not (wq[cols].any() and wk[cols].any()):
            uniform.append(h)
    if uniform:
        result.kept.append(KeptChannels(f"{site.name} {site.unit}", uniform,
                                        "their query or key weights are zero, which makes the "
                                        "attention uniform, not zero: the head still adds its "
                                        "values' average"))
    if not keep:
        keep = [0]
        result.kept.append(KeptChannels(f"{site.name} {site.unit}", [0],
                                        "every head is zero; one stays, as an attention of no "
                                        "heads is not a module"))
        add -= _head_constant(site, 0)
    return torch.tensor(keep, dtype=torch.long), add


def _head_constant(site: AttentionSite, h: int) -> Tensor:
    """What a zero head ``h`` folded into the bias (undone where it stays after all)."""
    d, wo = site.head_dim, linear_weight(site.out)
    (_, _), (_, _), (wv, bv) = site.qkv()
    cols = slice(h * d, (h + 1) * d)
    if not wo[:, cols].any() or bv is None:
        return torch.zeros(wo.shape[0], dtype=torch.float64)
    return wo[:, cols].double() @ bv[cols].double()


def _neurons(site: FeedForwardSite, result: ShrinkResult) -> tuple[Tensor, Tensor]:
    """The neurons that stay and the constant the down projection's bias takes."""
    up, down = linear_weight(site.up), linear_weight(site.down)
    b = _bias(site.up, up)
    read = down.ne(0).any(0)
    written = up.ne(0).any(1)
    with torch.no_grad():
        if site.gate is None:  # a zero row outputs act(bias)
            constant, value = ~written, site.act(b.clone())
        else:  # act(gate) * up: constant where a zero factor makes it so
            gate = linear_weight(site.gate)
            gated, opened = gate.ne(0).any(1), site.act(_bias(site.gate, gate).clone())
            constant = (~written & (~gated | (b == 0))) | (~gated & (opened == 0))
            value = opened * b
    keep = read & ~constant
    const = torch.zeros_like(b)
    const[read & constant] = value[read & constant]
    if not keep.any():
        keep[0] = True
        const[0] = 0
        result.kept.append(KeptChannels(f"{site.name} feed-forward", [0], "every neuron is "
                                        "zero; one stays, as a layer of no neurons is not "
                                        "an HF module"))
    return keep.nonzero().flatten(), down.double() @ const.double()


def _bias(layer: nn.Module, w: Tensor) -> Tensor:
    """A linear-like layer's bias (zeros where it has none)."""
    return layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0],
                                                                           dtype=w.dtype)


def shrink_transformer(model: nn.Module, example_inputs: Any, *, rtol: float, atol: float,
                       return_result: bool = False) -> nn.Module | ShrinkResult:
    """``shrink`` for a transformer (``is_transformer``): the module docstring."""
    args = example_args(example_inputs, ShrinkError)
    work = copy.deepcopy(model).eval()
    reference = outputs_of(work, args)
    result = ShrinkResult(work, _params(model), 0)
    with torch.no_grad():
        for site in attention_sites(work):
            keep, add = _heads(site, result)
            if len(keep) < site.heads:
                site.narrow(keep, add)
                result.layers[f"{site.name} ({site.unit})"] = ((site.heads, site.heads),
                                                         (len(keep), len(keep)))
        for ff in feed_forward_sites(work):
            n = linear_weight(ff.up).shape[0]
            keep, add = _neurons(ff, result)
            if len(keep) < n:
                ff.narrow(keep, add)
                result.layers[f"{ff.name} (neurons)"] = ((n, n), (len(keep), len(keep)))
        try:
            got = flat_outputs(work(*args))
        except Exception as e:  # a narrowed block that does not fit its module's forward
            raise ShrinkError(f"the shrunk {type(model).__name__} fails on example_inputs: "
                              f"{e} (a layout hwprune.deploy.shrink.sites misreads; the "
                              "input model is unchanged)") from e
    check = compare_outputs(got, reference, rtol=rtol, atol=atol)
    if not check.close:
        raise ShrinkError(f"the shrunk {type(model).__name__} differs from the input model by "
                          f"up to {check.max_abs_diff:.3g} at output scale {check.scale:.3g} "
                          f"(rtol={rtol}, atol={atol}) on example_inputs; refusing to return it")
    result.params_after = _params(work)
    result.max_abs_diff = check.max_abs_diff
    return result if return_result else work


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
