"""Sparse execution of Linear layers, chosen per layer by timing, never by assumption.

``to_sparse_kernels(model, example_inputs)`` runs the model once to capture every ``nn.Linear``
layer's real input, then times, for that input, the dense ``F.linear`` against each sparse
candidate the hardware has:

* on CPU: the weight as a sparse CSR matrix, and as BSR with the largest block size (16, 8, 4)
  that divides the weight and has no more stored blocks than half the dense blocks;
* on CUDA (compute capability 8.0 or newer, fp16/bf16 weights in a 2:4 pattern along the input
  dimension): PyTorch's semi-structured sparse tensor
  (``torch.sparse.to_sparse_semi_structured``), the path to the 2:4 sparse tensor cores.

A layer is converted only where its fastest candidate beats dense by ``min_speedup`` (median of
``repeats`` timed calls after warm-up) and gives the dense output to tolerance; everything else
stays dense, and the result says why with the times measured. The input model is not modified.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["LayerChoice", "SparseKernelsResult", "SparseLinear", "is_2to4", "to_sparse_kernels"]

FORMATS = ("csr", "bsr", "2:4")


class SparseLinear(nn.Module):
    """A Linear layer whose weight is a sparse tensor (CSR, BSR or 2:4 semi-structured)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: str, in_features: int,
                 out_features: int):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        # plain attributes: sparse layouts are not all supported as parameters or buffers
        self.weight = weight
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.fmt == "2:4":
            y = F.linear(x2, self.weight, self.bias)
        else:  # W @ x^T on the sparse side: the product CPU kernels implement for CSR/BSR
            y = torch.sparse.mm(self.weight, x2.t()).t()
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


@dataclass
class LayerChoice:
    """One Linear layer: its shape and sparsity, the median times (ms) measured, the choice."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    dense_ms: float
    candidates_ms: dict[str, float] = field(default_factory=dict)
    chosen: str = "dense"
    reason: str = ""


@dataclass
class SparseKernelsResult:
    model: nn.Module
    layers: list[LayerChoice]

    def to_markdown(self) -> str:
        lines = ["| layer | shape | sparsity | dense ms | candidates ms | chosen | why |",
                 "| --- | --- | ---: | ---: | --- | --- | --- |"]
        for c in self.layers:
            cands = ", ".join(f"{k} {v:.3f}" for k, v in c.candidates_ms.items()) or "-"
            lines.append(f"| {c.name} | {c.shape[0]}x{c.shape[1]} | {c.sparsity:.1%} | "
                         f"{c.dense_ms:.3f} | {cands} | {c.chosen} | {c.reason} |")
        return "\n".join(lines)


def is_2to4(weight: Tensor) -> bool:
    """At most 2 nonzeros in every run of 4 consecutive weights along the input dimension."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.reshape(weight.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


def median_timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """A timer for ``device``: ``timer(fn, repeats)`` is the median milliseconds of ``fn``
    over ``repeats`` calls after two warm-up calls, CUDA synchronised around each."""
    def median_ms(fn: Callable[[], Any], repeats: int) -> float:
        times = []
        for i in range(repeats + 2):  # two warm-up calls
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return median_ms


def _bsr_blocksize(w: Tensor) -> tuple[int, int] | None:
    out, inp = w.shape
    for b in (16, 8, 4):
        if out % b or inp % b:
            continue
        blocks = w.reshape(out // b, b, inp // b, b).ne(0).any(3).any(1)
        if blocks.float().mean() <= 0.5:
            return (b, b)
    return None


def _candidates(w: Tensor, formats: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Sparse weights to try, and why the other formats are not tried."""
    out, skipped = {}, {}
    cuda = w.device.type == "cuda"
    for fmt in formats:
        if fmt == "csr" and not cuda:
            out[fmt] = w.to_sparse_csr()
        elif fmt == "bsr" and not cuda:
            bs = _bsr_blocksize(w)
            if bs is None:
                skipped[fmt] = "no block size (16, 8, 4) leaves half the blocks empty"
            else:
                out[fmt] = w.to_sparse_bsr(bs)
        elif fmt == "2:4":
            why = _semi_structured_unavailable(w)
            if why is not None:
                skipped[fmt] = why
                continue
            try:
                from torch.sparse import to_sparse_semi_structured

                out[fmt] = to_sparse_semi_structured(w)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                skipped[fmt] = f"to_sparse_semi_structured refused: {e}"
        else:
            skipped[fmt] = f"{fmt} is not tried on {w.device.type}"
    return out, skipped


def _semi_structured_unavailable(w: Tensor) -> str | None:
    if w.device.type != "cuda":
        return "2:4 semi-structured kernels need a CUDA device"
    if torch.cuda.get_device_capability(w.device) < (8, 0):
        return "2:4 semi-structured kernels need compute capability 8.0 or newer"
    if w.dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 kernels take fp16/bf16 weights, this one is {w.dtype}"
    if not is_2to4(w):
        return "the weight is not 2:4 sparse along its input dimension"
    return None


def to_sparse_kernels(model: nn.Module, example_inputs: Any, *,
                      formats: Sequence[str] = FORMATS, min_speedup: float = 1.1,
                      repeats: int = 20, atol: float = 1e-4, rtol: float = 1e-3,
                      return_result: bool = False) -> nn.Module | SparseKernelsResult:
    """A copy of ``model`` whose Linear layers run on sparse kernels where that was faster.

    Args:
        model: the model (its device and dtype are used as they are); not modified.
        example_inputs: a tensor or tuple of inputs of the size that will be served; each
            Linear layer is timed on the input it receives from them.
        formats: candidates among ``"csr"``, ``"bsr"`` (CPU) and ``"2:4"`` (CUDA).
        min_speedup: convert a layer only if dense time / sparse time is at least this
            (default 1.1: a margin over timing noise).
        repeats: timed calls per candidate (median; two warm-up calls first).
        atol, rtol: a converted layer must give the dense output to this tolerance (fp16/bf16
            kernels accumulate differently from dense ones).
        return_result: give a ``SparseKernelsResult`` (model and per-layer timings).
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"formats must be a non-empty subset of {FORMATS}, got {formats!r}")
    if not (isinstance(min_speedup, int | float) and min_speedup >= 0):
        raise ConfigError(f"min_speedup must be a number >= 0, got {min_speedup!r}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
    work = copy.deepcopy(model).eval()
    inputs: dict[str, Tensor] = {}

    def keep_input(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:  # None: output unchanged
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [m.register_forward_hook(keep_input(n))
             for n, m in work.named_modules() if isinstance(m, nn.Linear)]
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.inference_mode():
        work(*args)
    for h in hooks:
        h.remove()
    choices = []
    with torch.inference_mode():
        for name, x in inputs.items():
            choices.append(_choose(work, name, x, formats, min_speedup, repeats, atol, rtol))
    return SparseKernelsResult(work, choices) if return_result else work


def _choose(work: nn.Module, name: str, x: Tensor, formats: Sequence[str], min_speedup: float,
            repeats: int, atol: float, rtol: float) -> LayerChoice:
    lin = work.get_submodule(name)
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    median_ms = median_timer(w.device)
    dense_ms = median_ms(lambda: F.linear(x, w, b), repeats)
    choice = LayerChoice(name, tuple(w.shape), float((w == 0).float().mean()), dense_ms)
    cands, skipped = _candidates(w, formats)
    ref = F.linear(x, w, b)
    for fmt, sw in cands.items():
        layer = SparseLinear(sw, b, fmt, lin.in_features, lin.out_features)
        try:
            ok = torch.allclose(layer(x), ref, atol=atol, rtol=rtol)
        except (RuntimeError, NotImplementedError) as e:
            skipped[fmt] = f"the kernel failed: {e}"
            continue
        if not ok:
            skipped[fmt] = "its output differs from dense beyond tolerance"
            continue
        choice.candidates_ms[fmt] = median_ms(lambda layer=layer: layer(x), repeats)
    notes = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    if not choice.candidates_ms:
        choice.reason = notes or "no candidate"
        return choice
    best = min(choice.candidates_ms, key=choice.candidates_ms.get)
    speedup = dense_ms / choice.candidates_ms[best]
    if speedup >= min_speedup:
        choice.chosen = best
        choice.reason = f"{best} {speedup:.2f}x faster than dense"
        parent, _, attr = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, attr,
                SparseLinear(cands[best], b, best, lin.in_features, lin.out_features))
    else:
        choice.reason = f"fastest sparse ({best}) is {speedup:.2f}x dense, below {min_speedup}"
    if notes:
        choice.reason += f" ({notes})"
    return choice
