"""What the zoo benchmarks share: counting a model the same way whoever pruned it, and
Torch-Pruning's magnitude pruner as a new user calls it (needs the zoo venv: ``make zoo``).

MACs are counted by ``hp.report``'s counter (``hwprune.report.macs.measure_macs``: the whole
forward pass, per sample) and parameters plainly, for hwprune's shrunk models and
Torch-Pruning's alike, so the two sides are counted by one counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hwprune.report.macs import measure_macs

__all__ = ["macs", "params", "logits_layer", "torch_pruning", "relative_diff", "one_line",
           "attempt"]


def macs(model: nn.Module, x1: torch.Tensor) -> int:
    """MACs of one sample of ``x1``, as ``hp.report`` counts them (its ``model_macs``)."""
    return measure_macs(model, x1, [])[1]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The last conv or linear layer a forward pass calls: the one that writes the logits
    (Torch-Pruning must be told to leave it, or it prunes classes)."""
    calls: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.append(mod))
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return calls[-1]


def torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float,
                  round_to: int | None = None) -> tuple[nn.Module, float]:
    """``model`` pruned in place by Torch-Pruning's ``MagnitudePruner`` (L1 importance, every
    layer at ``ratio`` of its channels, the logits layer ignored), and the seconds it took
    (building the dependency graph and removing the channels)."""
    import torch_pruning as tp

    ignored = [logits_layer(model, x)]
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model.eval(), x, importance=tp.importance
                                       .MagnitudeImportance(p=1), pruning_ratio=ratio,
                                       ignored_layers=ignored, round_to=round_to)
    pruner.step()
    return model, time.perf_counter() - start


def relative_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max |a(x) - b(x)| over max |a(x)|, eval mode."""
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max()) / max(float(ya.abs().max()), 1e-30)


def one_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def attempt(stage: str, fn: Callable[[], Any], record: dict) -> Any:
    """``fn()``; on an exception, ``record`` gets ``stage`` and the error's line and None is
    returned (a failure is a result of the benchmark, not its end)."""
    try:
        return fn()
    except Exception as e:  # every failure is a row of the table
        record.update(ok=False, stage=stage, error=one_line(e))
        return None
