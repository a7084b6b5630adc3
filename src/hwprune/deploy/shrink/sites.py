"""Where a transformer's attention heads and feed-forward neurons are: its *sites*.

A Hugging Face transformer is not traced for shrinking (torch.fx cannot trace BERT or GPT-2);
its layout is read from the modules instead, by duck typing on the attribute names the model
families share:

* BERT-style attention (BERT, RoBERTa, ...): a module with ``self.query/key/value`` (linear,
  ``num_attention_heads`` heads of ``attention_head_size``) and ``output.dense`` (the output
  projection); feed-forward: a layer with ``intermediate.dense`` and ``output.dense``, the
  activation ``intermediate.intermediate_act_fn``;
* GPT-2-style attention: a module with ``c_attn`` (query, key and value side by side, a
  ``Conv1D``), ``c_proj``, ``num_heads``, ``head_dim`` and ``split_size``; feed-forward: a
  module with ``c_fc``, ``c_proj`` and ``act``;
* projection-style attention (transformers 5's Llama, Mistral, Qwen2, ViT, CLIP, ...): a
  module with ``q_proj/k_proj/v_proj``, ``o_proj`` (or ``out_proj``) and ``head_dim``, whose
  forward reshapes by ``head_dim`` alone. With grouped-query attention each key/value head
  serves a group of consecutive query heads, so the unit that can go is a key/value head with
  its whole group (a single head where there is no grouping); feed-forward: ``fc1``, ``fc2``
  and ``activation_fn``, or the gated ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``
  (``down(act(gate(x)) * up(x))``).

Every weight is seen as ``(out, in)`` (``targets.out_in``), whatever the layer stores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...targets import is_linear, out_in, weight_transposed

__all__ = ["AttentionSite", "FeedForwardSite", "attention_sites", "feed_forward_sites",
           "linear_weight", "narrow_linear"]


def linear_weight(layer: nn.Module) -> Tensor:
    """A linear-like layer's weight as ``(out, in)``."""
    return out_in(layer.weight.detach(), weight_transposed(layer))


def narrow_linear(layer: nn.Module, keep_out: Tensor | None = None,
                  keep_in: Tensor | None = None, bias_add: Tensor | None = None) -> nn.Module:
    """A copy of the linear-like ``layer`` (same class) with the kept output rows and input
    columns of its ``(out, in)`` weight, ``bias_add`` added to its (kept) bias."""
    w = linear_weight(layer)
    kout = keep_out if keep_out is not None else torch.arange(w.shape[0])
    kin = keep_in if keep_in is not None else torch.arange(w.shape[1])
    new = copy.deepcopy(layer)
    t = weight_transposed(layer)
    new.weight = nn.Parameter(out_in(w[kout][:, kin], t).contiguous().clone())
    if layer.bias is not None:
        b = layer.bias.detach() + (bias_add.to(layer.bias.dtype) if bias_add is not None else 0)
        new.bias = nn.Parameter(b[kout].clone())
    elif bias_add is not None and bias_add.any():  # a constant to take, and no bias to take it
        new.bias = nn.Parameter(bias_add[kout].to(w.dtype).clone())
    for attr, n in (("in_features", len(kin)), ("out_features", len(kout)), ("nx", len(kin)),
                    ("nf", len(kout))):
        if hasattr(new, attr):
            setattr(new, attr, n)
    return new


@dataclass
class AttentionSite:
    """One self-attention: ``heads`` units of ``head_dim`` (a head, or a key/value head's group
    of query heads); ``qkv()`` the query, key and value weights and biases as
    ``(heads * head_dim, hidden)`` rows, unit by unit (a shared key or value head repeated for
    each query head it serves); ``out`` the output projection (reads the units' columns);
    ``narrow(keep, bias_add)`` puts the narrowed layers in place."""

    name: str
    heads: int
    head_dim: int
    qkv: Callable[[], list[tuple[Tensor, Tensor | None]]]
    out: nn.Module
    narrow: Callable[[Tensor, Tensor], None]
    #: what a unit is, as ``ShrinkResult`` names it
    unit: str = "heads"


@dataclass
class FeedForwardSite:
    """One feed-forward block: ``up`` writes the neurons, ``act`` maps each on its own,
    ``down`` reads them; gated (``gate`` given): neuron i is ``act(gate_i(x)) * up_i(x)``.
    ``narrow(keep, bias_add)`` puts the narrowed layers in place."""

    name: str
    up: nn.Module
    act: nn.Module
    down: nn.Module
    narrow: Callable[[Tensor, Tensor], None]
    gate: nn.Module | None = None


def _rows(layer: nn.Module, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
    w = linear_weight(layer)[start:stop]
    b = layer.bias.detach()[start:stop] if layer.bias is not None else None
    return w, b


def _bert_attention(name: str, m: nn.Module) -> AttentionSite | None:
    s = getattr(m, "self", None)
    dense = getattr(getattr(m, "output", None), "dense", None)
    if not (s is not None and dense is not None and is_linear(dense)
            and all(isinstance(getattr(s, p, None), nn.Module) and is_linear(getattr(s, p))
                    for p in ("query", "key", "value"))
            and hasattr(s, "num_attention_heads") and hasattr(s, "attention_head_size")):
        return None
    heads, d = s.num_attention_heads, s.attention_head_size

    def qkv() -> list[tuple[Tensor, Tensor | None]]:
        return [_rows(getattr(s, p), 0, heads * d) for p in ("query", "key", "value")]

    def narrow(keep: Tensor, bias_add: Tensor) -> None:
        rows = _head_rows(keep, d)
        for p in ("query", "key", "value"):
            setattr(s, p, narrow_linear(getattr(s, p), keep_out=rows))
        m.output.dense = narrow_linear(dense, keep_in=rows, bias_add=bias_add)
        s.num_attention_heads = len(keep)
        s.all_head_size = len(keep) * d

    return AttentionSite(name, heads, d, qkv, dense, narrow)


def _gpt2_attention(name: str, m: nn.Module) -> AttentionSite | None:
    if not (all(hasattr(m, a) for a in ("c_attn", "c_proj", "num_heads", "head_dim",
                                        "split_size"))
            and is_linear(m.c_attn) and is_linear(m.c_proj)
            and not getattr(m, "is_cross_attention", False)):
        return None
    heads, d, split = m.num_heads, m.head_dim, m.split_size

    def qkv() -> list[tuple[Tensor, Tensor | None]]:
        return [_rows(m.c_attn, i * split, i * split + heads * d) for i in range(3)]

    def narrow(keep: Tensor, bias_add: Tensor) -> None:
        rows = _head_rows(keep, d)
        m.c_attn = narrow_linear(m.c_attn, keep_out=torch.cat([rows + i * split
                                                               for i in range(3)]))
        m.c_proj = narrow_linear(m.c_proj, keep_in=rows, bias_add=bias_add)
        m.num_heads = len(keep)
        m.split_size = len(keep) * d
        m.embed_dim = len(keep) * d  # read by no forward; kept consistent

    return AttentionSite(name, heads, d, qkv, m.c_proj, narrow)


def _projection_attention(name: str, m: nn.Module) -> AttentionSite | None:
    out_name = "o_proj" if hasattr(m, "o_proj") else "out_proj"  # CLIP, BART, Whisper: out_proj
    q, k, v, o = (getattr(m, p, None) for p in ("q_proj", "k_proj", "v_proj", out_name))
    d = getattr(m, "head_dim", None)
    if not (all(isinstance(p, nn.Module) and is_linear(p) for p in (q, k, v, o))
            and isinstance(d, int) and not isinstance(d, bool) and d > 0):
        return None
    rows_q, rows_kv = linear_weight(q).shape[0], linear_weight(k).shape[0]
    if (rows_q % d or rows_kv % d or linear_weight(v).shape[0] != rows_kv
            or linear_weight(o).shape[1] != rows_q or rows_q % rows_kv):
        return None
    group = rows_q // rows_kv  # query heads per key/value head
    if getattr(m, "num_key_value_groups", group) != group:
        return None

    def qkv() -> list[tuple[Tensor, Tensor | None]]:
        return [_rows(q, 0, rows_q), _per_query_head(k, group, d), _per_query_head(v, group, d)]

    def narrow(keep: Tensor, bias_add: Tensor) -> None:
        rows, kv_rows = _head_rows(keep, group * d), _head_rows(keep, d)
        m.q_proj = narrow_linear(q, keep_out=rows)
        m.k_proj = narrow_linear(k, keep_out=kv_rows)
        m.v_proj = narrow_linear(v, keep_out=kv_rows)
        setattr(m, out_name, narrow_linear(o, keep_in=rows, bias_add=bias_add))
        # the forward reads none of these (it reshapes by head_dim): kept consistent
        for attr, n in (("num_heads", len(keep) * group), ("num_attention_heads",
                                                          len(keep) * group),
                        ("num_key_value_heads", len(keep))):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, n)

    return AttentionSite(name, rows_kv // d, group * d, qkv, o, narrow,
                         "heads" if group == 1 else "key/value groups")


def _per_query_head(layer: nn.Module, group: int, d: int) -> tuple[Tensor, Tensor | None]:
    """A key or value projection's rows repeated for each of the ``group`` query heads that
    read each of its heads (as grouped-query attention repeats them)."""
    w, b = _rows(layer, 0, linear_weight(layer).shape[0])

    def repeat(t: Tensor) -> Tensor:
        heads = t.reshape(-1, d, *t.shape[1:])
        return heads.repeat_interleave(group, dim=0).reshape(-1, *t.shape[1:])

    return repeat(w), None if b is None else repeat(b)


def _bert_feed_forward(name: str, m: nn.Module) -> FeedForwardSite | None:
    up = getattr(getattr(m, "intermediate", None), "dense", None)
    down = getattr(getattr(m, "output", None), "dense", None)
    act = getattr(getattr(m, "intermediate", None), "intermediate_act_fn", None)
    if not (up is not None and down is not None and isinstance(act, nn.Module)
            and is_linear(up) and is_linear(down)):
        return None

    def narrow(keep: Tensor, bias_add: Tensor) -> None:
        m.intermediate.dense = narrow_linear(up, keep_out=keep)
        m.output.dense = narrow_linear(down, keep_in=keep, bias_add=bias_add)

    return FeedForwardSite(name, up, act, down, narrow)


def _gpt2_feed_forward(name: str, m: nn.Module) -> FeedForwardSite | None:
    if not (all(hasattr(m, a) for a in ("c_fc", "c_proj", "act")) and is_linear(m.c_fc)
            and is_linear(m.c_proj) and isinstance(m.act, nn.Module)):
        return None
    up, down = m.c_fc, m.c_proj

    def narrow(keep: Tensor, bias_add: Tensor) -> None:
        m.c_fc = narrow_linear(up, keep_out=keep)
        m.c_proj = narrow_linear(down, keep_in=keep, bias_add=bias_add)

    return FeedForwardSite(name, up, m.act, down, narrow)


def _fc_feed_forward(name: str, m: nn.Module) -> FeedForwardSite | None:
    up, down, act = (getattr(m, a, None) for a in ("fc1", "fc2", "activation_fn"))
    if not (all(isinstance(p, nn.Module) and is_linear(p) for p in (up, down))
            and isinstance(act, nn.Module)):
        return None

    def narrow(keep: Tensor, bias_add: Tensor) -> None:
        m.fc1 = narrow_linear(up, keep_out=keep)
        m.fc2 = narrow_linear(down, keep_in=keep, bias_add=bias_add)

    return FeedForwardSite(name, up, act, down, narrow)


def _gated_feed_forward(name: str, m: nn.Module) -> FeedForwardSite | None:
    gate, up, down, act = (getattr(m, a, None)
                           for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if not (all(isinstance(p, nn.Module) and is_linear(p) for p in (gate, up, down))
            and isinstance(act, nn.Module)):
        return None

    def narrow(keep: Tensor, bias_add: Tensor) -> None:
        m.gate_proj = narrow_linear(gate, keep_out=keep)
        m.up_proj = narrow_linear(up, keep_out=keep)
        m.down_proj = narrow_linear(down, keep_in=keep, bias_add=bias_add)

    return FeedForwardSite(name, up, act, down, narrow, gate)


def _head_rows(keep: Tensor, d: int) -> Tensor:
    """The rows (of a projection) of the kept heads, in order."""
    return (keep[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every self-attention of a known layout in ``model``, in module order."""
    return _sites(model, (_bert_attention, _gpt2_attention, _projection_attention))


def feed_forward_sites(model: nn.Module) -> list[FeedForwardSite]:
    """Every feed-forward block of a known layout in ``model``, in module order."""
    return _sites(model, (_bert_feed_forward, _gpt2_feed_forward, _fc_feed_forward,
                          _gated_feed_forward))


def _sites(model: nn.Module, readers) -> list:
    """What the first reader that knows a module's layout makes of it, for every module."""
    found = []
    for name, m in model.named_modules():
        site = next((s for s in (read(name, m) for read in readers) if s is not None), None)
        if site is not None:
            found.append(site)
    return found
