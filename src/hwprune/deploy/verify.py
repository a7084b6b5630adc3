"""Checking a rewritten model against the model it came from, on example inputs.

``shrink`` and ``fold_batchnorm`` both copy a model, change the copy, and refuse to return it
unless it computes the input model's outputs on ``example_inputs``. These are the steps they
share: the inputs as positional arguments, a model's outputs as a flat list of tensors, and
the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["example_args", "flat_outputs", "outputs_of", "compare_outputs", "OutputComparison"]


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
    every output ``allclose`` to the reference's. ``max_abs_diff``: inf where shapes differ."""

    same_shapes: bool
    close: bool
    max_abs_diff: float


def compare_outputs(got: list[Tensor], reference: list[Tensor], atol: float,
                    rtol: float) -> OutputComparison:
    same_shapes = len(got) == len(reference) and all(
        g.shape == r.shape for g, r in zip(got, reference, strict=True))
    if not same_shapes:
        return OutputComparison(False, False, math.inf)
    diff = max((float((g - r).abs().max()) for g, r in zip(got, reference, strict=True)
                if g.numel()), default=0.0)
    close = all(torch.allclose(g, r, atol=atol, rtol=rtol)
                for g, r in zip(got, reference, strict=True))
    return OutputComparison(True, close, diff)
