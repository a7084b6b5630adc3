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

Choices the paper leaves open (all parameters; docs/dpp.md, "Defaults that learn", has the
measurements behind the defaults):

* Logits start uniform (``logit_init="zeros"``): the noise then samples every group early on,
  so every weight gets trained before the logits decide. ``"random"`` (normal, as in the
  reference code) and ``"magnitude"`` (each group's norm standardised within its row: a
  pretrained model starts from its magnitude mask) are the alternatives.
* Gumbel noise scale per layer kind (``noise_scale=None``): 1.0 on linear, 0.1 on conv
  weights; a number sets all, ``{"linear": .., "conv": ..}`` some.
* Temperature ``temperature=(5.0, 0.5)`` annealed linearly per epoch over ``anneal_epochs``
  epochs (counted by ``epoch_end()``), then held at its end value; pass the run's length
  (the recipe runner passes ``train.prune_epochs``).
* Entropy penalty ``entropy_weight`` times the *mean* over every row of the model of
  H(softmax(D_row)) / log n: a value in [0, entropy_weight] on any model size.
* Each layer's logit gradient is rescaled to a fixed root mean square before the optimizer
  sees it (``normalize_logit_grad=True``): the straight-through gradient's scale depends on
  the model, so without it SGD barely moves the logits; ``logit_lr`` still sets their rate.
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

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..deploy.shrink.maps import FeatureMaps
from ..errors import ConfigError, StructureError
from ..parametrize import MapGate
from ..relaxations import GumbelTopK, check_relaxation
from ..schedules import Anneal
from ..structures import Element, FeatureMap, Filter, Kernel, KofN, Structure, parse_structure
from ..targets import Spec
from .base import PrunedLayer, Pruner
from .dpp_logits import (
    LOGIT_INITS,
    GradNormalizer,
    check_noise_scale,
    initial_logits,
    mask_metrics,
    noise_for,
    normalized_entropy,
)
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


@register_method(
    configs={"2:4": {"structure": "2:4", "anneal_epochs": 2},
             **{s: {"structure": s, "k": 0.5, "anneal_epochs": 2}
                for s in ("weight", "kernel", "filter", "map")}},
    bad_settings=({"noise_scale": -1.0}, {"noise_scale": {"lstm": 0.1}},
                  {"temperature": (5.0, 0.0)}, {"quantize_bits": 1},
                  {"logit_init": "ones"}, {"normalize_logit_grad": "yes"}),
    recipe="dpp-digits", doc="dpp.md", epochs_arg="anneal_epochs")
class DPP(MapTargets, Pruner):
    """Learned k-of-n masks sampled with Gumbel top-k.

    Args:
        model: the model to prune (modified in place).
        structure: ``"weight"``, ``"kernel"``, ``"filter"``, ``"map"``, or a k-of-n tile
            ``"k:n"``.
        k: kept per row (an int, or a fraction of the row length); implied by ``"k:n"``.
        temperature: ``(start, end)`` of the softmax temperature, both > 0.
        anneal_epochs: epochs over which the temperature goes from start to end (give the
            length of the run; the recipe runner does).
        noise_scale: scale of the Gumbel noise in training: None (per layer kind, see
            ``dpp_logits.DEFAULT_NOISE``), a number >= 0, or ``{"linear"|"conv": number}``.
        entropy_weight: weight of the entropy penalty (a mean over rows, in [0, 1]), >= 0.
        quantize_bits: None, or 2..16 for joint fake quantization (``True`` means 8).
        logit_init: ``"zeros"`` (uniform), ``"random"`` or ``"magnitude"``.
        seed: seed of the noise generator (and of ``"random"`` logits).
        logit_lr: learning rate of the logits (default: the optimizer default's).
        relaxation: the gradient's relaxation: ``"ksoftmax"`` (the paper's k successive
            softmaxes, O(k·n) per row), ``"sigmoid"`` (a threshold sigmoid, O(n)), or
            ``"auto"`` (per layer: ``"ksoftmax"`` for small k); see ``hwprune.relaxations``.
        normalize_logit_grad: rescale each layer's logit gradient to a fixed RMS, so the
            logits move at about their learning rate under SGD as under Adam.
        targets: which weights; see ``hwprune.targets``.
        example_inputs: a tensor or tuple of the model's inputs; needed by ``"map"`` (to
            trace the model), ignored otherwise.
        strict: refuse (``StructureError``) a default target that cannot carry the
            structure instead of leaving it dense with a ``SkippedLayersWarning``.
    """

    def __init__(self, model: nn.Module, structure: str | Structure = "2:4",
                 k: int | float | None = None, temperature: tuple[float, float] = (5.0, 0.5),
                 anneal_epochs: int = 10,
                 noise_scale: float | Mapping[str, float] | None = None,
                 entropy_weight: float = 0.25, quantize_bits: int | bool | None = None,
                 logit_init: str = "zeros", seed: int = 0, logit_lr: float | None = None,
                 normalize_logit_grad: bool = True, targets: Spec = None,
                 example_inputs: Any = None, strict: bool = False, relaxation: str = "auto"):
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
        self.relaxation = relaxation
        self.normalize_logit_grad = normalize_logit_grad
        self.history: list[dict[str, Any]] = []
        self._grad_normalizers: dict[str, GradNormalizer] = {}
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
        check_noise_scale(self.noise_scale)
        v = self.entropy_weight
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"entropy_weight must be a number >= 0; got {v!r}")
        b = self.quantize_bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16):
            raise ConfigError(f"quantize_bits must be None, True (8) or an int in 2..16; got "
                              f"{b!r}")
        if self.logit_init not in LOGIT_INITS:
            raise ConfigError(f"logit_init must be one of {LOGIT_INITS}; got "
                              f"{self.logit_init!r}")
        if not isinstance(self.normalize_logit_grad, bool):
            raise ConfigError(f"normalize_logit_grad must be True or False; got "
                              f"{self.normalize_logit_grad!r}")
        check_relaxation(self.relaxation)

    def _make_parametrization(self, layer: PrunedLayer) -> nn.Module:
        if self.maps is not None:
            return self._map_gate(layer)
        w = getattr(layer.module, layer.param).detach()
        logits = initial_logits(self.logit_init, layer.structure, w, self.generator)
        p = GumbelTopK(layer.structure, layer.shape, logits.to(w),
                       noise_for(self.noise_scale, layer.shape), self.quantize_bits,
                       self.generator, self.relaxation)
        self._normalize_grad(layer.name, p.logits)
        p.tau = self._anneal.value(0)
        # rows of whole filters gate the bias and BatchNorm after them with the same sample
        return SampledFilters(p) if prunes_filters(layer.structure) else p

    def _normalize_grad(self, row: str, logits: Tensor) -> None:
        if self.normalize_logit_grad:  # runs on each backward's gradient, before accumulation
            self._grad_normalizers[row] = GradNormalizer()
            logits.register_hook(self._grad_normalizers[row])

    def _map_gate(self, layer: PrunedLayer) -> nn.Module:
        """"map": the gate of one weight, reading the rows of all families (built with the
        first layer's gate, which owns them)."""
        owner = self.map_sample is None
        if owner:
            rows = map_rows(self.maps, self.k)
            logits = map_logits(self.logit_init, self.maps, rows, self.layers, self.generator)
            w = getattr(layer.module, layer.param)
            noise = noise_for(self.noise_scale, layer.shape)  # the kind of the maps' writer
            tops = [GumbelTopK(KofN(k, len(ids)), (len(ids),), logits[label].to(w), noise,
                               None, self.generator, self.relaxation)
                    for label, (ids, k) in rows.items()]
            for label, top in zip(rows, tops, strict=True):
                top.tau = self._anneal.value(0)
                self._normalize_grad(label, top.logits)
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

    def _on_step(self) -> None:
        rows = self._rows()
        for name, normalizer in self._grad_normalizers.items():
            grad = rows[name].logits.grad
            if grad is not None:  # the gradient the optimizer just used
                normalizer.observe(grad)

    def _penalty(self) -> Tensor | None:
        # the mean over every row of the model, so the penalty is in [0, entropy_weight]
        # whatever the model's size (a sum over rows grows with it)
        if not self.entropy_weight or self.pattern_fixed:
            return None
        rows = self._rows().values()
        total = sum(normalized_entropy(r.logits).sum() for r in rows)
        return self.entropy_weight * total / sum(r.logits.shape[0] for r in rows)

    def _freeze_pattern(self) -> None:
        # every row computes with its deterministic top-k from now on, in training too; the
        # logits stay in param_groups() (an optimizer's groups must not change mid-run) but
        # get no gradient, so no optimizer moves them
        for row in self._rows().values():
            row.fixed = True
            row.logits.requires_grad_(False)

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
        return {"generator": self.generator.get_state(), "history": list(self.history),
                "grad_normalizers": {name: g.state_dict()
                                     for name, g in self._grad_normalizers.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.history = list(state.get("history", []))
        for name, saved in state.get("grad_normalizers", {}).items():
            if name in self._grad_normalizers:
                self._grad_normalizers[name].load_state_dict(saved)
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
        return {name: mask_metrics(row.logits) for name, row in self._rows().items()}


def _parse_dpp_structure(structure: str | Structure) -> tuple[str, Structure]:
    if isinstance(structure, str) and structure.strip().lower() in _ROWS:
        kind = structure.strip().lower()
        return kind, _ROWS[kind]()
    s = parse_structure(structure)
    if isinstance(s, KofN):
        return "k:n", s
    raise ConfigError(f"DPP structure must be 'weight', 'kernel', 'filter', 'map' or a k-of-n tile "
                      f"'k:n' (e.g. '2:4'); got {structure!r}")
