"""DPP's masks over feature maps, drawn once per forward pass and read by several tensors.

DPP's ``"filter"`` rows choose k of a layer's output maps; its ``"map"`` rows choose k of the
coupled maps of one family (``hwprune.deploy.feature_maps``: one layer's outputs, or one
residual stream's channels). Either way several tensors must see the *same* sample in one
forward pass: a filter row gates the layer's weight, its bias and the BatchNorm after it; a
map row gates every member of its maps (producer filters, biases, norm entries, consumer
input channels). ``SharedSample`` composes one ``GumbelTopK`` per row (its logits, noise,
temperature and relaxation, untouched) and keeps its training sample until the model's next
forward pass (a forward pre-hook, ``NewSample``, drops it); in eval mode it gives the
deterministic top-k. ``SampledFilters`` is the ``"filter"`` layer's parametrization on top
of it; ``"map"`` layers use ``hwprune.parametrize.MapGate`` with one shared
``SharedSample`` of all families' rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..deploy.shrink.maps import FeatureMaps
from ..errors import ConfigError
from ..parametrize import fake_quantize
from ..structures import KofN
from .dpp_logits import RANDOM_INIT_STD
from .maps import map_scores

__all__ = ["SharedSample", "SampledFilters", "Quantized", "NewSample", "map_rows",
           "map_logits", "row_label"]


class SharedSample(nn.Module):
    """One value per map (``effective_alpha()``): 1 kept, 0 pruned, from ``rows`` (each a
    ``GumbelTopK`` over one ``(1, n)`` row) whose entries are the maps ``maps[i]``.

    Training: one sample per forward pass of the model (drawn at the first read, kept until
    ``reset()``), with the rows' relaxation as its gradient. Eval, and training once the rows
    are ``fixed``: the top-k of the logits."""

    def __init__(self, rows: Sequence[nn.Module], maps: Sequence[Sequence[int]]):
        super().__init__()
        self.rows = nn.ModuleList(rows)
        ids = torch.cat([torch.as_tensor(list(m), dtype=torch.long) for m in maps])
        device = rows[0].logits.device
        self.register_buffer("inverse", torch.argsort(ids).to(device), persistent=False)
        self.drawn: Tensor | None = None

    def reset(self) -> None:
        self.drawn = None

    @property
    def fixed(self) -> bool:
        """Whether the rows' pattern is fixed (``fix_pattern()``): training reads the eval
        mask then."""
        return all(r.fixed for r in self.rows)

    def effective_alpha(self) -> Tensor:
        if not self.training or self.fixed:
            return self._per_map([r.eval_mask() for r in self.rows])
        if self.drawn is None:
            self.drawn = self._per_map([r.sample_mask() for r in self.rows])
        return self.drawn

    def kept(self) -> Tensor:
        """Per map, whether the deterministic (eval) mask keeps it (bool)."""
        return self._per_map([r.eval_mask() for r in self.rows]) > 0.5

    def _per_map(self, masks: Iterable[Tensor]) -> Tensor:
        return torch.cat([m.reshape(-1) for m in masks])[self.inverse]

    def __getstate__(self) -> dict[str, Any]:
        # a sample is part of one forward pass' graph: copies and pickles draw their own
        state = self.__dict__.copy()
        state["drawn"] = None
        return state


class SampledFilters(nn.Module):
    """DPP's ``"filter"`` (or ``"k:n@filter"``) parametrization: the layer's ``GumbelTopK``
    rows over its filters, drawn once per forward pass so that the bias and BatchNorm entries
    gated with the filters (``output_gate()``, read by ``TiedScale``) see the mask the weight
    does. Exposes the rows' ``logits``, ``tau``, ``fixed``, ``structure`` and ``eval_mask()``
    like the ``GumbelTopK`` itself."""

    def __init__(self, topk: nn.Module):
        super().__init__()
        self.sample = SharedSample([topk], [range(topk.logits.numel())])  # one per filter

    @property
    def topk(self) -> nn.Module:
        return self.sample.rows[0]

    @property
    def logits(self) -> nn.Parameter:
        return self.topk.logits

    @property
    def structure(self) -> KofN:
        return self.topk.structure

    @property
    def tau(self) -> float:
        return self.topk.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self.topk.tau = value

    @property
    def fixed(self) -> bool:
        return self.topk.fixed

    @fixed.setter
    def fixed(self, value: bool) -> None:
        self.topk.fixed = value

    def eval_mask(self) -> Tensor:
        return self.topk.eval_mask()

    def output_gate(self) -> Tensor:
        """Per filter: 1.0 kept, 0.0 pruned (the sample of this forward pass)."""
        return self.sample.effective_alpha()

    def forward(self, w: Tensor) -> Tensor:
        t = self.topk
        masked = w * t.structure.expand(self.output_gate(), t.shape)
        return fake_quantize(masked, t.quantize_bits) if t.quantize_bits else masked


class Quantized(nn.Module):
    """``gate(w)`` with DPP's joint fake quantization (``bits``)."""

    def __init__(self, gate: nn.Module, bits: int):
        super().__init__()
        self.gate, self.bits = gate, bits

    def forward(self, w: Tensor) -> Tensor:
        return fake_quantize(self.gate(w), self.bits)


class NewSample:
    """A forward pre-hook for the model: every ``SharedSample`` draws afresh in the pass."""

    def __init__(self, samples: Sequence[SharedSample]):
        self.samples = list(samples)

    def __call__(self, module: nn.Module, args: Any) -> None:
        for s in self.samples:
            s.reset()


def row_label(maps: FeatureMaps, ids: Sequence[int]) -> str:
    """A family's name in reports: where its first map appears (``"conv1"``, ``"layer1.0"``)."""
    return maps.groups[ids[0]].where[0]


def map_rows(maps: FeatureMaps, k: int | float) -> dict[str, tuple[list[int], int]]:
    """``{row label: (the family's map positions, k)}``, one row per family of ``maps``:
    ``k`` an int (at most the family's size) or a fraction of it (rounded, at least 1)."""
    out = {}
    for ids in maps.families().values():
        n = len(ids)
        kept = k if isinstance(k, int) else max(1, round(k * n))
        label = row_label(maps, ids)
        if kept > n:
            raise ConfigError(f"k={k} exceeds the {n} feature maps of the family at {label!r}; "
                              f"allowed: 1 <= k <= {n}, or a fraction in (0, 1)")
        out[label] = (ids, kept)
    return out


def map_logits(init: str, maps: FeatureMaps, rows: Mapping[str, tuple[list[int], int]],
               layers: Mapping[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
    """``{row label: (1, n) logits}``: ``"zeros"``, ``"random"`` (normal, from
    ``generator``), or ``"magnitude"``: each map's L2 norm over all its members, standardised
    within its row (``layers``: ``PrunedLayer``s, not yet parametrized)."""
    if init == "zeros":
        return {label: torch.zeros(1, len(ids)) for label, (ids, _) in rows.items()}
    if init == "random":
        return {label: torch.randn(1, len(ids), generator=generator) * RANDOM_INIT_STD
                for label, (ids, _) in rows.items()}
    weights = {n: getattr(l.module, l.param).detach() for n, l in layers.items()}
    norms = map_scores(maps, layers, "l2", weights)[0].float()
    out = {}
    for label, (ids, _) in rows.items():
        s = norms[torch.tensor(ids)]
        out[label] = ((s - s.mean()) / (s.std(unbiased=False) + 1e-8)).reshape(1, -1)
    return out
