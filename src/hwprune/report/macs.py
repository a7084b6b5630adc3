"""Measuring MACs for ``report``: one forward pass under PyTorch's ``FlopCounterMode``, split
over the prunable weights, per sample.

MACs = FLOPs / 2 (the counter counts multiply-accumulate ops: mm, addmm, bmm, convolution).
A module's count goes to its weight; what the counter cannot see is computed from the shapes
the forward pass saw (hooks record them):

* an RNN's fused lstm/gru/rnn op counts 0: an (out, in) matrix does out*in MACs per time step
  and batch element, so the RNN's weights get that, and it is added to the model's total;
* an ``nn.MultiheadAttention`` computes its projections inside one functional call: the input
  projection does ``E * numel`` MACs on each of query, key and value, ``out_proj`` ``E *
  numel(query)``; the counter counts them under the attention module, so the total is right.
  PyTorch's fused "fast path" for attention and transformer layers is invisible to the counter,
  so it is turned off while measuring.

Every count is **per sample**: the forward pass's count divided by the batch size, the first
dimension of the first input unless ``batch_size`` says otherwise (pass it for inputs whose
first dimension is not the batch: sequence-first (time, batch, ...) RNN inputs, unbatched
inputs). That is how papers and other pruning tools count, and it makes the numbers the same
for any example batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from ..errors import HwpruneError
from ..targets import ATTENTION_TYPES, RNN_TYPES

__all__ = ["measure_macs", "forward_on_meta", "batch_size_of", "Weight"]

#: (module name, module, parameter name) of one prunable weight
Weight = tuple[str, nn.Module, str]


def _args(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise HwpruneError(
        "report: example_inputs must be a tensor or a tuple of tensors (the positional "
        f"arguments of model(...)); got {type(inputs).__name__}"
    )


def batch_size_of(inputs: Any, batch_size: int | None = None) -> int:
    """``batch_size`` if given, else the first dimension of the first input (1 for a scalar)."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise HwpruneError(f"report: batch_size must be an int >= 1; got {batch_size!r}")
        return batch_size
    args = _args(inputs)
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"tensor of shape {tuple(inputs.shape)}"
    parts = [f"{tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
    return f"tuple of shapes ({', '.join(parts)})"


def _rnn_steps(x: Any) -> int:
    """Time steps x batch the RNN runs for this input: every weight is used once per one."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.data.shape[0])
    if x.dim() == 2:  # unbatched (T, input)
        return int(x.shape[0])
    return int(x.shape[0] * x.shape[1])


def _attention_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """numel of query, key and value of one ``nn.MultiheadAttention`` call."""
    given = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
    return tuple(int(given[k].numel()) for k in ("query", "key", "value"))  # type: ignore


class _Shapes:
    """Forward pre-hooks recording what the counter cannot split: RNN steps, attention inputs."""

    def __init__(self, modules: list[nn.Module]):
        self.rnn_steps: dict[int, int] = {}
        self.attention: dict[int, list[int]] = {}
        self.handles = []
        for m in modules:
            if isinstance(m, RNN_TYPES):
                self.handles.append(m.register_forward_pre_hook(self._rnn))
            else:
                self.handles.append(m.register_forward_pre_hook(self._attend, with_kwargs=True))

    def _rnn(self, m: nn.Module, a: tuple[Any, ...]) -> None:
        self.rnn_steps[id(m)] = self.rnn_steps.get(id(m), 0) + _rnn_steps(a[0])

    def _attend(self, m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        seen = self.attention.setdefault(id(m), [0, 0, 0])
        for i, n in enumerate(_attention_inputs(a, kw)):
            seen[i] += n

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def forward_on_meta(model: nn.Module, args: tuple[Any, ...],
                    shapes: _Shapes) -> FlopCounterMode | None:
    """The counted forward pass on ``meta`` tensors: the same ops and shapes, so the same
    counts, with no arithmetic done. ``None`` where the model cannot run on meta (an op that
    reads values, a tensor made on another device inside ``forward``); what the hooks saw is
    then forgotten."""
    ours = {h.id for h in shapes.handles}
    if any(m._forward_hooks or any(k not in ours for k in m._forward_pre_hooks)
           for m in model.modules()):
        return None  # a hook (a pruner's statistics) would see meta tensors: count for real
    state = {k: v.to("meta") for k, v in (*model.named_parameters(remove_duplicate=False),
                                          *model.named_buffers(remove_duplicate=False))}
    meta_args = tuple(a.to("meta") if isinstance(a, Tensor) else a for a in args)
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            functional_call(model, state, meta_args, tie_weights=False)
    except Exception:  # any failure: the real pass below counts (and reports its error)
        shapes.rnn_steps.clear()
        shapes.attention.clear()
        return None
    return counter


def _forward(model: nn.Module, inputs: Any, shapes: _Shapes) -> FlopCounterMode:
    """One forward pass of ``inputs`` (eval mode, no_grad, fused attention paths off) under a
    flop counter, on meta tensors where the model allows it (``forward_on_meta``), else on the real
    ones; the model's modes and the fast-path setting are restored afterwards."""
    args = _args(inputs)
    modes = [(m, m.training) for m in model.modules()]
    fast = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        meta = forward_on_meta(model, args, shapes)
        if meta is not None:
            return meta
        with torch.no_grad(), counter:
            model(*args)
    except HwpruneError:
        raise
    except Exception as e:
        raise HwpruneError(
            f"report: the model failed on example_inputs ({_describe(inputs)}): "
            f"{type(e).__name__}: {e}"
        ) from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        shapes.remove()
        for m, training in modes:
            m.training = training
    return counter


def _attention_macs(m: nn.Module, param: str, seen: list[int]) -> int:
    """MACs of one attention projection from the numel of its query, key and value."""
    q, k, v = seen
    rows = getattr(m, param).shape[0]
    if param == "in_proj_weight":  # rows = 3E: E on each of query, key, value
        return rows // 3 * (q + k + v)
    return rows * {"q_proj_weight": q, "k_proj_weight": k, "v_proj_weight": v}[param]


def measure_macs(model: nn.Module, inputs: Any, weights: list[Weight],
                 batch_size: int | None = None) -> tuple[list[int], int, int]:
    """(MACs per sample of each of ``weights``, of the whole forward pass, the batch size)."""
    batch = batch_size_of(inputs, batch_size)
    owners = {id(m.out_proj): m for m in model.modules() if isinstance(m, ATTENTION_TYPES)}
    hooked = list({id(m): m for m in model.modules()
                   if isinstance(m, (*RNN_TYPES, *ATTENTION_TYPES))}.values())
    shapes = _Shapes(hooked)
    counter = _forward(model, inputs, shapes)
    counts = {k: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__  # the counter names modules "<root class>.<qualified name>"

    def counted(mname: str) -> int:
        return counts.get(f"{root}.{mname}" if mname else root, 0)

    by_module: dict[int, list[int]] = {}
    for i, (_, m, _) in enumerate(weights):
        by_module.setdefault(id(m), []).append(i)
    macs = [0] * len(weights)
    unseen = 0
    for idx in by_module.values():
        mname, m, _ = weights[idx[0]]
        own = counted(mname)
        if parametrize.is_parametrized(m):  # work done computing the weight is not the layer's
            own -= sum(counted(f"{mname}.parametrizations.{t}") for t in m.parametrizations)
        sizes = [getattr(m, weights[i][2]).numel() for i in idx]
        if isinstance(m, ATTENTION_TYPES):
            for i in idx:
                macs[i] = _attention_macs(m, weights[i][2], shapes.attention.get(id(m), [0] * 3))
        elif id(m) in owners:  # out_proj: used by its attention's functional call
            q = shapes.attention.get(id(owners[id(m)]), [0] * 3)[0]
            macs[idx[0]] = m.weight.shape[0] * q
        elif isinstance(m, RNN_TYPES) and own == 0:  # a fused op the counter cannot see
            for i, size in zip(idx, sizes, strict=True):
                macs[i] = size * shapes.rnn_steps.get(id(m), 0)
                unseen += macs[i]
        else:
            for i, size in zip(idx, sizes, strict=True):
                macs[i] = own * size // sum(sizes) if size else 0
    total = counter.get_total_flops() // 2 + unseen
    return [_per_sample(n, batch) for n in macs], _per_sample(total, batch), batch


def _per_sample(macs: int, batch: int) -> int:
    return (2 * macs + batch) // (2 * batch)  # rounded to the nearest integer
