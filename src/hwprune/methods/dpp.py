"""DPP: Dynamic Probabilistic Pruning (Gonzalez-Carabarin, Huijben, Veeling, Schmid, van Sloun,
2021).

DPP learns a *distribution* over k-out-of-n masks: every mask row has trainable logits ``D``
(one per group), the training forward pass keeps the top-k of ``D + s·Gumbel`` (exactly k per
row, a fresh sample every step) and the backward pass differentiates k successive softmaxes at
temperature ``tau`` through a straight-through estimator. Because the mask does not depend on
weight magnitudes, the weights can be quantized at the same time.

Granularities (``structure``), each a k-of-n constraint over rows of ``n`` groups:

============  ==============================================  ===========================
``"weight"``  k of a neuron's / filter's ``n = C·R·S`` inputs  rows: one per output unit
``"kernel"``  k of a filter's ``C`` kernels                    rows: one per filter
``"filter"``  k of a layer's ``F`` output maps                 rows: one per layer
``"map"``     k of a family's ``n`` coupled feature maps       rows: one per family
``"k:n"``     k of every run of ``n`` consecutive inputs       rows: one per run (N:M, 2:4)
============  ==============================================  ===========================

``k`` is an integer, or a fraction in (0, 1) of each row's length (rounded, at least 1)
for the first four; it is implied by ``"k:n"``.

``"filter"`` and ``"map"`` prune feature maps (``hwprune.methods.dpp_maps``): a row's mask
is drawn once per forward pass of the model and gates every tensor of its maps, so a pruned
map is exactly zero downstream. ``"filter"`` gates the layer's filters, its bias and the
BatchNorm that directly follows it (``hwprune.methods.filter_maps``); ``"map"`` (needs
``example_inputs``) gates every member of a coupled map (``hwprune.deploy.feature_maps``):
producer filters, biases and norm entries, and the consumers' input channels, one row per
family of maps (one layer's outputs, or one residual stream's channels).

Choices the paper leaves open (all parameters, with these defaults):

* Gumbel noise scale ``noise_scale=0.05`` (the reference code used 0.01 to 0.1).
* Temperature ``temperature=(5.0, 0.5)`` annealed linearly per epoch over
  ``anneal_epochs=10`` epochs (counted by ``epoch_end()``), then held at its end value.
* Entropy penalty ``entropy_weight=1e-4`` times the sum over rows of H(softmax(D_row)).
* Logits initialised from the weights (``logit_init="magnitude"``): each group's norm,
  standardised within its row, so a pretrained model starts from its magnitude mask;
  ``"zeros"`` starts from a uniform distribution (the noise then explores).
* Noise comes from the pruner's own generator (``seed``), so a resumed run repeats exactly.
  Under DistributedDataParallel the generator's state is broadcast from rank 0 when the
  pruner is created (and at every epoch end), so every rank draws the same noise: one mask
  per step for the whole global batch, as in one process (docs/distributed.md).

Mask metrics per layer, with ``p_r = softmax(D_r)`` over a row's ``n`` entries and
``H`` the entropy, both in [0, 1]:

* **confidence** = 1 − mean_r H(p_r) / log n: 1 when every row is sure of its choice;
* **diversity** = (H(mean_r p_r) − mean_r H(p_r)) / log n: the information the rows do not
  share (a Jensen-Shannon divergence); 0 when all rows choose alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..deploy.shrink.maps import FeatureMaps
from ..errors import ConfigError, StructureError
from ..parametrize import GumbelTopK, MapGate
from ..schedules import Anneal
from ..structures import Element, FeatureMap, Filter, Kernel, KofN, Structure, parse_structure
from ..targets import Spec
from .base import PrunedLayer, Pruner
from .dpp_maps import (
    NewSample,
    Quantized,
    SampledFilters,
    SharedSample,
    map_logits,
    map_rows,
)
from .filter_maps import prunes_filters
from .maps import MapTargets
from .registry import register_method

__all__ = ["DPP"]

_ROWS = {"weight": Element, "kernel": Kernel, "filter": Filter, "map": FeatureMap}
_INITS = ("magnitude", "zeros")


@register_method(
    configs={"2:4": {"structure": "2:4", "anneal_epochs": 2},
             **{s: {"structure": s, "k": 0.5, "anneal_epochs": 2}
                for s in ("weight", "kernel", "filter", "map")}},
    bad_settings=({"noise_scale": -1.0}, {"temperature": (5.0, 0.0)}, {"quantize_bits": 1}),
    recipe="dpp-digits", doc="dpp.md")
class DPP(MapTargets, Pruner):
    """Learned k-of-n masks sampled with Gumbel top-k.

    Args:
        model: the model to prune (modified in place).
        structure: ``"weight"``, ``"kernel"``, ``"filter"``, ``"map"``, or a k-of-n tile
            ``"k:n"``.
        k: kept per row (an int, or a fraction of the row length); implied by ``"k:n"``.
        temperature: ``(start, end)`` of the softmax temperature, both > 0.
        anneal_epochs: epochs over which the temperature goes from start to end.
        noise_scale: scale of the Gumbel noise in training, >= 0.
        entropy_weight: weight of the entropy penalty, >= 0.
        quantize_bits: None, or 2..16 for joint fake quantization (``True`` means 8).
        logit_init: ``"magnitude"`` or ``"zeros"``.
        seed: seed of the noise generator.
        logit_lr: learning rate of the logits (default: the optimizer default's).
        targets: which weights; see ``hwprune.targets``.
        example_inputs: a tensor or tuple of the model's inputs; needed by ``"map"`` (to
            trace the model), ignored otherwise.
        strict: refuse (``StructureError``) a default target that cannot carry the
            structure instead of leaving it dense with a ``SkippedLayersWarning``.
    """

    def __init__(self, model: nn.Module, structure: str | Structure = "2:4",
                 k: int | float | None = None, temperature: tuple[float, float] = (5.0, 0.5),
                 anneal_epochs: int = 10, noise_scale: float = 0.05,
                 entropy_weight: float = 1e-4, quantize_bits: int | bool | None = None,
                 logit_init: str = "magnitude", seed: int = 0, logit_lr: float | None = None,
                 targets: Spec = None, example_inputs: Any = None, strict: bool = False):
        self.example_inputs = example_inputs
        self.maps: FeatureMaps | None = None
        #: "map": the sample of every family's row, which every layer's gate reads
        self.map_sample: SharedSample | None = None
        #: "map": {row label: (the family's map positions, k)}
        self.map_families: dict[str, tuple[list[int], int]] = {}
        # the structure as given; rows of weight/kernel/filter get their n per layer
        self.row_kind, self._spec = _parse_dpp_structure(structure)
        self.k = k
        self.temperature = temperature
        self.anneal_epochs = anneal_epochs
        self.noise_scale = noise_scale
        self.entropy_weight = entropy_weight
        if isinstance(quantize_bits, bool):  # True means 8 bits, False off
            quantize_bits = 8 if quantize_bits else None
        self.quantize_bits = quantize_bits  # other values are checked in _check_config
        self.logit_init = logit_init
        self.logit_lr = logit_lr
        self.history: list[dict[str, Any]] = []
        self._check_k()
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        super().__init__(model, self._spec, targets, strict)

    # -- construction ---------------------------------------------------------------------
    def _check_k(self) -> None:
        if isinstance(self._spec, KofN):
            if self.k is not None and self.k != self._spec.k:
                raise ConfigError(f"structure {self._spec} implies k="
                                  f"{self._spec.k}; got k={self.k} (leave it out)")
            return
        k = self.k
        if k is None:
            raise ConfigError(f"structure {self.row_kind!r} needs k= (an int >= 1, or a "
                              "fraction in (0, 1) of each row)")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0 or (
                isinstance(k, float) and k >= 1):
            raise ConfigError(f"k must be an int >= 1 or a fraction in (0, 1); got {k!r}")

    def _layer_structure(self, shape: tuple[int, ...], name: str) -> Structure:
        if self.row_kind == "map":
            return super()._layer_structure(shape, name)
        if isinstance(self._spec, KofN):
            return self._spec
        base = _ROWS[self.row_kind]()
        base.validate(shape, name)
        n = shape[0] if self.row_kind == "filter" else base.num_groups(shape) // shape[0]
        k = self.k if isinstance(self.k, int) else max(1, round(self.k * n))
        if k > n:
            raise StructureError(f"{name}: k={k} exceeds the row length n={n} of "
                                 f"{self.row_kind!r} rows (shape {shape}); allowed: 1 <= k <= {n}")
        return KofN(k, n, base)

    def _check_config(self) -> None:
        t = self.temperature
        if (not isinstance(t, (tuple, list)) or len(t) != 2
                or not all(isinstance(v, (int, float)) and v > 0 for v in t)):
            raise ConfigError(f"temperature must be (start, end) with both > 0; got {t!r}")
        self._anneal = Anneal(float(t[0]), float(t[1]), self.anneal_epochs)
        for field in ("noise_scale", "entropy_weight"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{field} must be a number >= 0; got {v!r}")
        b = self.quantize_bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16):
            raise ConfigError(f"quantize_bits must be None, True (8) or an int in 2..16; got "
                              f"{b!r}")
        if self.logit_init not in _INITS:
            raise ConfigError(f"logit_init must be one of {_INITS}; got {self.logit_init!r}")

    def _make_parametrization(self, layer: PrunedLayer) -> nn.Module:
        if self.maps is not None:
            return self._map_gate(layer)
        w = getattr(layer.module, layer.param).detach()
        s = layer.structure
        if self.logit_init == "zeros":
            logits = torch.zeros(s.num_groups(layer.shape) // s.n, s.n)
        else:
            scores = s.scores(w, "l2").reshape(-1, s.n).float()
            logits = (scores - scores.mean(1, keepdim=True)) / (
                scores.std(1, keepdim=True, unbiased=False) + 1e-8)
        p = GumbelTopK(s, layer.shape, logits.to(w), self.noise_scale, self.quantize_bits,
                       self.generator)
        p.tau = self._anneal.value(0)
        # rows of whole filters gate the bias and BatchNorm after them with the same sample
        return SampledFilters(p) if prunes_filters(layer.structure) else p

    def _map_gate(self, layer: PrunedLayer) -> nn.Module:
        """"map": the gate of one weight, reading the rows of all families (built with the
        first layer's gate, which owns them)."""
        owner = self.map_sample is None
        if owner:
            rows = map_rows(self.maps, self.k)
            logits = map_logits(self.logit_init, self.maps, rows, self.layers)
            w = getattr(layer.module, layer.param)
            tops = [GumbelTopK(KofN(k, len(ids)), (len(ids),), logits[label].to(w),
                               self.noise_scale, None, self.generator)
                    for label, (ids, k) in rows.items()]
            for t in tops:
                t.tau = self._anneal.value(0)
            self.map_sample = SharedSample(tops, [ids for ids, _ in rows.values()])
            self.map_families = rows
        gate = MapGate(self.map_sample, self.maps.index(layer.name, layer.shape), owner)
        quantized = self.quantize_bits and len(layer.shape) > 1  # weights, not norm entries
        return Quantized(gate, self.quantize_bits) if quantized else gate

    def _rows(self) -> dict[str, nn.Module]:
        """{name: the GumbelTopK-like row set}: per layer, or per family of maps."""
        if self.map_sample is not None:
            return dict(zip(self.map_families, self.map_sample.rows, strict=True))
        return {name: layer.parametrization for name, layer in self.layers.items()}

    def _on_attach(self) -> None:
        samples = [self.map_sample] if self.map_sample is not None else [
            l.parametrization.sample for l in self.layers.values()
            if isinstance(l.parametrization, SampledFilters)]
        if samples:  # one sample per forward pass, read by every tensor of the maps
            self._add_hook(self.model.register_forward_pre_hook(NewSample(samples)))

    # -- the lifecycle hooks --------------------------------------------------------------
    def _method_param_groups(self, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        group = {**defaults, "params": [r.logits for r in self._rows().values()],
                 "weight_decay": 0.0}  # decay would flatten the distributions
        if self.logit_lr is not None:
            group["lr"] = self.logit_lr
        return [group]

    def _penalty(self) -> Tensor | None:
        if not self.entropy_weight:
            return None
        total = sum(_entropy(torch.softmax(r.logits, 1)).sum() for r in self._rows().values())
        return self.entropy_weight * total

    def _on_epoch_end(self) -> None:
        tau = self._anneal.value(self.epochs)
        for row in self._rows().values():
            row.tau = tau
        self.history.append({"epoch": self.epochs, "temperature": tau,
                             "layers": self._metrics()})

    def _mask(self, layer: PrunedLayer) -> Tensor:
        if self.maps is not None:
            keep = self.map_sample.kept().cpu()
            return self.maps.mask(layer.name, layer.shape, keep).to(layer.original().device)
        p = layer.parametrization
        return layer.structure.expand(p.eval_mask().reshape(-1), layer.shape) > 0.5

    def _layer_extras(self) -> dict[str, dict[str, Any]]:
        if self.maps is not None:
            return self._map_extras()
        out = self._metrics()
        for name, layer in self.layers.items():
            out[name].update(k=layer.structure.k, n=layer.structure.n,
                             temperature=layer.parametrization.tau)
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "history": list(self.history)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.history = list(state.get("history", []))
        tau = self._anneal.value(self.epochs)
        for row in self._rows().values():
            row.tau = tau

    # -- DPP itself -----------------------------------------------------------------------
    @property
    def tau(self) -> float:
        return self._anneal.value(self.epochs)

    def _map_extras(self) -> dict[str, dict[str, Any]]:
        """"map": per layer, the rows (families) it has members in, their k and n, and the
        mean confidence and diversity over them."""
        metrics, out = self._metrics(), {}
        for name, layer in self.layers.items():
            index = self.maps.index(name, layer.shape)
            mine = set(torch.cat([i[i >= 0] for i in index.values()]).tolist())
            rows = [r for r, (ids, _) in self.map_families.items() if mine & set(ids)]
            out[name] = {"rows": rows, "temperature": self.tau,
                         "k": [self.map_families[r][1] for r in rows],
                         "n": [len(self.map_families[r][0]) for r in rows]}
            for fact in ("confidence", "diversity"):
                out[name][fact] = sum(metrics[r][fact] for r in rows) / len(rows)
        return out

    def _metrics(self) -> dict[str, dict[str, float]]:
        out = {}
        with torch.no_grad():
            for name, row in self._rows().items():
                p = torch.softmax(row.logits.float(), 1)
                log_n = math.log(p.shape[1]) if p.shape[1] > 1 else 1.0
                row_h = _entropy(p)
                out[name] = {
                    "confidence": 1.0 - row_h.mean().item() / log_n,
                    "diversity": (_entropy(p.mean(0, keepdim=True)).item()
                                  - row_h.mean().item()) / log_n,
                }
        return out


def _entropy(p: Tensor) -> Tensor:
    """Entropy of each row of a probability matrix (natural log)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def _parse_dpp_structure(structure: str | Structure) -> tuple[str, Structure]:
    if isinstance(structure, str) and structure.strip().lower() in _ROWS:
        kind = structure.strip().lower()
        return kind, _ROWS[kind]()
    s = parse_structure(structure)
    if isinstance(s, KofN):
        return "k:n", s
    raise ConfigError(f"DPP structure must be 'weight', 'kernel', 'filter', 'map' or a k-of-n tile "
                      f"'k:n' (e.g. '2:4'); got {structure!r}")
