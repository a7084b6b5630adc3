"""Checking a rewritten model against the model it came from, on example inputs.

``shrink``, ``fold_batchnorm`` and ``export_model`` each change (a copy of) a model and refuse
to return the result unless it computes the input model's outputs on ``example_inputs``. These
are the steps they share: the inputs as positional arguments, a model's outputs as a flat list
of tensors, and the comparison.

The comparison is relative to each output's scale: an output passes when

    max |got - reference| <= rtol * max(max |reference|, tiny) + atol

(``tiny``: the dtype's smallest normal number; integer and boolean outputs must be equal). An
absolute tolerance checks nothing where outputs are small (a randomly initialized network's
can be far below it) and fails on rounding where they are large; a relative one means the
same on both. Defaults: ``RTOL`` (float32 rounding through a deep network stays well inside
it, a wrong channel does not) and ``ATOL`` = 0 (no absolute floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["example_args", "flat_outputs", "outputs_of", "compare_outputs", "OutputComparison",
           "RTOL", "ATOL"]

#: default tolerance of the checks, relative to each output's largest magnitude
RTOL = 1e-4
#: default absolute floor added to it
ATOL = 0.0


def example_args(example_inputs: Any, error: type[Exception]) -> tuple:
    """``example_inputs`` as positional arguments; anything but a tensor or a tuple of
    tensors raises ``error``."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(a, Tensor) for a in args):
        raise error("example_inputs must be a tensor or a tuple of tensors, got "
                    f"{[type(a).__name__ for a in args]}")
    return args


def flat_outputs(out: Any) -> list[Tensor]:
    """The tensors in a model's output (a tensor, or lists, tuples and dicts of them), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in flat_outputs(o)]
    return []


def outputs_of(model: nn.Module, args: tuple) -> list[Tensor]:
    """``model(*args)`` without autograd, as ``flat_outputs``."""
    with torch.no_grad():
        return flat_outputs(model(*args))


@dataclass(frozen=True)
class OutputComparison:
    """``same_shapes``: as many outputs, each of the reference's shape. ``close``: that, and
    every output within the tolerance of the module docstring. ``max_abs_diff``: the largest
    difference over the outputs (inf where shapes differ); ``scale``: the largest magnitude of
    the reference's outputs."""

    same_shapes: bool
    close: bool
    max_abs_diff: float
    scale: float = 0.0


def _diff(g: Tensor, r: Tensor) -> float:
    """max |g - r| (nan where either has a nan), in float64 for integer and boolean outputs."""
    if not (r.is_floating_point() or r.is_complex()):
        g, r = g.double(), r.double()
    return float((g - r).abs().max())


def _within(g: Tensor, r: Tensor, rtol: float, atol: float) -> bool:
    if not (r.is_floating_point() or r.is_complex()):
        return torch.equal(g, r)
    tiny = torch.finfo(r.dtype).tiny
    return _diff(g, r) <= rtol * max(float(r.abs().max()), tiny) + atol  # False for nan


def compare_outputs(got: list[Tensor], reference: list[Tensor], rtol: float = RTOL,
                    atol: float = ATOL) -> OutputComparison:
    """Compare ``got`` with ``reference`` output by output, relative to each output's scale
    (the module docstring)."""
    pairs = list(zip(got, reference, strict=False))
    same_shapes = len(got) == len(reference) and all(g.shape == r.shape for g, r in pairs)
    if not same_shapes:
        return OutputComparison(False, False, math.inf)
    pairs = [(g.to(r.dtype), r) for g, r in pairs if r.numel()]
    diff = max((_diff(g, r) for g, r in pairs), default=0.0)
    scale = max((float(r.abs().max()) for _, r in pairs), default=0.0)
    close = all(_within(g, r, rtol, atol) for g, r in pairs)
    return OutputComparison(True, close, diff, scale)
