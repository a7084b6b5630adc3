"""PSP: Parameterized Structured Pruning (Schindler, Roth, Pernkopf, Fröning, 2019).

Every group (structure) ``i`` of a target weight gets one learnable scale ``alpha_i``,
initialised to 1; the layer computes with ``Q = alpha ⊙ W``. The alphas are trained with the
weights, in their own optimizer group, and a regulariser on them decides which groups survive:

* ``variant="decay"`` (the method): weight decay ``alpha_decay`` on the alphas, i.e. the
  paper's update ``Δα(t+1) = μ Δα(t) − η ∂E/∂α − λ η α`` when the optimizer is SGD with
  momentum. Decay pulls every alpha towards 0; the task gradient holds up the important ones,
  which opens a gap between important and unimportant groups.
* ``variant="l1"``: an L1 penalty ``alpha_decay * Σ|α|`` (returned by ``penalty()``) instead of
  weight decay.
* ``variant="fixed"``: the alphas train as in ``"decay"``, but instead of a threshold the
  ``sparsity`` fraction of groups with the smallest ``|α|`` are off in each layer (ties are
  broken by the group's weight norm), following an optional ``schedule``.

The L1-norm magnitude baseline of the paper is ``hp.Magnitude(..., norm="l1")``.

Choices the paper leaves open, made explicit (all parameters):

* ``threshold_mode`` defaults to ``"relative"`` and ``threshold`` (ε) to ``0.05`` there
  (``0.01`` with ``"absolute"``): a group
  is off while ``|α| < ε · max |α|`` of its layer (of its family of maps, for ``"map"``; of
  all the gated layers, for ``"layer"``, where each layer has one alpha).
  ``threshold_mode="absolute"`` (``|α| < ε``, the paper's rule) is kept for models without
  normalisation. Why relative by default: where BatchNorm follows a layer, scaling all its
  alphas together does not change the loss, so the task gradient has no component along
  the layer's alpha vector and weight decay only shrinks that vector (by about
  ``exp(-lr · λ · steps / (1 − momentum))``), the same factor for every group. An absolute
  ε then measures how long training ran, not which groups matter: it cuts nothing for a
  long time, then every group of a layer within a few steps. The relative rule reads only
  the alphas' sizes relative to each other, which is all the task can set.
* Off groups may come back (``revive=True``, the paper's "dynamic" pruning): the forward pass
  uses 0 for them, but α still receives the straight-through gradient ``Σ ∂E/∂q · w`` and is
  re-tested after every step. ``revive=False`` makes pruning permanent (with a fixed
  sparsity the ranking then chooses among the groups still on, so every layer keeps exactly
  its count). ``fix_pattern()`` ends the re-testing: fine-tuning keeps the flags of then.
* Thresholding starts at step ``threshold_start`` (default 0: from the first step).
* ``structure="layer"`` gates a module's whole output: one alpha scales its weight *and* its
  bias, so a pruned layer outputs exactly zero. Its ``targets`` may then also name norm
  layers: in a post-activation residual block the branch ends in a BatchNorm, and
  ``hp.PSP(model, "layer", targets="layer*.*.bn2")`` gates whole residual branches (BN's
  output scales exactly with its weight and bias). A DenseNet layer is gated through its last
  conv (``targets="block*.layers.*.conv2"`` for DenseNet-BC), whose output is all it adds.
* ``structure="map"`` (needs ``example_inputs``) learns one alpha per coupled feature map
  (``hwprune.deploy.feature_maps``), shared by every member: the filters, biases and norm
  entries that write the map and the input channels that read it are all multiplied by it,
  so a map that is off is exactly zero wherever it is used, and ``finalize()`` then
  ``hp.shrink`` remove it whole. Thresholds, ranking and "every layer keeps one" apply per
  family of maps (one layer's outputs, or one residual stream's channels).
* Every layer keeps at least its largest-``|α|`` group (a layer with nothing left would cut
  the network and can make BatchNorm statistics degenerate), except with
  ``structure="layer"``, where removing the whole layer is the point.

* ``structure="filter"`` prunes the layer's maps: a filter's alpha also scales the layer's
  bias and the scale and shift of the BatchNorm directly after it
  (``hwprune.methods.filter_maps``), so the map is ``alpha * BN(conv(x))``: the
  normalisation does not cancel the alpha, and an alpha that is off makes the map exactly
  zero, which ``hp.shrink`` removes.

A caveat users should know: a scale on a whole layer (``"layer"``) that is directly followed
by BatchNorm is cancelled by the normalisation in training mode, so the task gives it no
gradient and decay alone drives all of them down together; gate the BatchNorm itself
(``targets="...bn2"``) instead. Scales on input channels and im2col columns (the paper's main
structures) each get a task gradient, but their common scale (a layer's alphas all multiplied
by one factor) is cancelled the same way, which is why the default threshold is relative.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..deploy.shrink.maps import FeatureMaps
from ..errors import ConfigError
from ..parametrize import GroupScale, MapGate, MapScale
from ..schedules import OneShot, Schedule
from ..structures import KofN, Layer, Structure
from ..targets import Spec
from .base import PrunedLayer, Pruner
from .maps import MapTargets, map_scores
from .registry import register_method
from .selection import check_round_to, keep_all_but_lowest

__all__ = ["PSP"]

_VARIANTS = ("decay", "l1", "fixed")
_THRESHOLD_MODES = ("absolute", "relative")
_RANK_BY = ("alpha", "scaled")
#: ε per threshold mode: relative, of the layer's largest |alpha|; absolute, of |alpha|
DEFAULT_THRESHOLD = {"relative": 0.05, "absolute": 0.01}


# strong decay on fast alphas: groups fall under the absolute threshold within a few steps
_FAST = {"alpha_decay": 0.2, "alpha_lr": 0.5, "threshold": 0.6, "threshold_mode": "absolute"}


@register_method(
    configs={**{s: {"structure": s, **_FAST} for s in ("channel", "column", "filter", "kernel",
                                                      "element", "block:2x2", "map")},
             "layer": {"structure": "layer", "variant": "fixed", "sparsity": 0.5}},
    bad_settings=({"threshold": -0.5}, {"alpha_decay": -1.0}, {"variant": "l0"}),
    recipe="psp-digits", doc="psp.md")
class PSP(MapTargets, Pruner):
    """Learned structure scales with weight decay (or an L1 penalty, or a fixed sparsity).

    Args:
        model: the model to prune (modified in place).
        structure: ``"channel"``, ``"column"``, ``"filter"``, ``"kernel"``, ``"layer"``,
            ``"map"`` (or ``"element"``, ``"block:BHxBW"``); k-of-n patterns are refused
            (use DPP).
        alpha_decay: the sparsity knob: weight decay (``"decay"``, ``"fixed"``) or L1
            coefficient (``"l1"``) on the alphas; >= 0.
        threshold: ε; groups with ``|α| < ε`` times the layer's largest ``|α|`` (or, with
            ``threshold_mode="absolute"``, ``|α| < ε``) are off (``"decay"``, ``"l1"``); > 0;
            default 0.05 (relative) or 0.01 (absolute).
        variant: ``"decay"``, ``"l1"`` or ``"fixed"``.
        sparsity: fraction of groups off per layer, only for ``variant="fixed"``.
        rank_by: what ``"fixed"`` ranks: ``"alpha"`` (``|α|``, the paper's rule) or
            ``"scaled"`` (``|α| · ‖W_i‖₂``, the size of the group the layer computes with;
            at the start it is L2 magnitude pruning, so a pretrained model's own weights
            choose until the alphas have learned).
        schedule: for ``"fixed"``, how ``sparsity`` ramps up (``hwprune.schedules``; default:
            the full sparsity from the start, re-ranked after every step).
        revive: whether off groups may come back (see the module docstring).
        threshold_start: the step from which thresholding (or ranking) applies.
        threshold_mode: ``"relative"`` (|α| < ε · the layer's max |α|; scale-free, see the
            module docstring) or ``"absolute"`` (|α| < ε).
        alpha_lr, alpha_momentum: optimizer settings of the alpha group; default: the same as
            the weights' (as in the paper).
        targets: which weights; see ``hwprune.targets``.
        example_inputs: a tensor or tuple of the model's inputs; needed by ``"map"`` (to
            trace the model), ignored otherwise.
        strict: refuse (``StructureError``) a default target that cannot carry the
            structure instead of leaving it dense with a ``SkippedLayersWarning``.
        round_to: for ``"fixed"``, keep a multiple of this many filters, channels or maps in
            every layer or family larger than it (as ``Magnitude``'s); 1: no rounding.
    """

    def __init__(self, model: nn.Module, structure: str | Structure = "channel",
                 alpha_decay: float = 1e-3, threshold: float | None = None,
                 variant: str = "decay",
                 sparsity: float | None = None, schedule: Schedule | None = None,
                 revive: bool = True, threshold_start: int = 0,
                 threshold_mode: str = "relative", rank_by: str = "alpha",
                 alpha_lr: float | None = None, alpha_momentum: float | None = None,
                 targets: Spec = None, example_inputs: Any = None, strict: bool = False,
                 round_to: int = 1):
        self.example_inputs = example_inputs
        self.round_to = round_to
        self.maps: FeatureMaps | None = None
        self.map_scale: MapScale | None = None  # "map": the alphas every layer's gate reads
        self.alpha_decay = alpha_decay
        self.threshold = threshold
        self.variant = variant
        self.final_sparsity = sparsity
        self.schedule = schedule if schedule is not None else OneShot()
        self.revive = revive
        self.threshold_start = threshold_start
        self.threshold_mode = threshold_mode
        self.rank_by = rank_by
        self.alpha_lr = alpha_lr
        self.alpha_momentum = alpha_momentum
        super().__init__(model, structure, targets, strict)

    # -- construction ---------------------------------------------------------------------
    def _check_config(self) -> None:
        if self.threshold_mode not in _THRESHOLD_MODES:
            raise ConfigError(f"threshold_mode must be one of {_THRESHOLD_MODES}; got "
                              f"{self.threshold_mode!r}")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLD[self.threshold_mode]
        if self.variant not in _VARIANTS:
            raise ConfigError(f"variant must be one of {_VARIANTS}; got {self.variant!r}")
        if self.rank_by not in _RANK_BY:
            raise ConfigError(f"rank_by must be one of {_RANK_BY}; got {self.rank_by!r}")
        check_round_to(self.round_to, self.structure)
        if self.round_to > 1 and self.variant != "fixed":
            raise ConfigError(f"round_to applies only to variant='fixed' (the others keep what "
                              f"passes a threshold, not a count); got variant={self.variant!r}")
        if self.rank_by != "alpha" and self.variant != "fixed":
            raise ConfigError(f"rank_by={self.rank_by!r} applies only to variant='fixed' (the "
                              "other variants threshold |alpha|)")
        if isinstance(self.structure, KofN):
            raise ConfigError(f"PSP learns which groups survive, it cannot keep a fixed "
                              f"{self.structure} pattern; use hp.DPP or hp.Magnitude for k:n")
        _check_number("alpha_decay", self.alpha_decay, low=0.0, low_open=False)
        _check_number("threshold", self.threshold, low=0.0, low_open=True)
        if not isinstance(self.threshold_start, int) or self.threshold_start < 0:
            raise ConfigError(f"threshold_start must be a non-negative integer; got "
                              f"{self.threshold_start!r}")
        for field in ("alpha_lr", "alpha_momentum"):
            if getattr(self, field) is not None:
                _check_number(field, getattr(self, field), low=0.0, low_open=False)
        if self.variant == "fixed":
            s = self.final_sparsity
            if s is None:
                raise ConfigError("variant='fixed' needs sparsity= (fraction of groups off "
                                  "per layer, in [0, 1))")
            _check_number("sparsity", s, low=0.0, low_open=False, high=1.0)
            if not isinstance(self.schedule, Schedule):
                raise ConfigError("schedule must be None or a hwprune.schedules.Schedule; got "
                                  f"{self.schedule!r}")
        elif self.final_sparsity is not None:
            raise ConfigError(f"sparsity= applies only to variant='fixed'; variant "
                              f"{self.variant!r} sets sparsity through alpha_decay and "
                              "threshold")

    def _norm_targets_allowed(self) -> bool:
        return isinstance(self.structure, Layer)

    def _make_parametrization(self, layer: PrunedLayer) -> nn.Module:
        if self.maps is not None:
            owner = self.map_scale is None
            if owner:
                self.map_scale = MapScale(len(self.maps.groups),
                                          getattr(layer.module, layer.param))
            return MapGate(self.map_scale, self.maps.index(layer.name, layer.shape), owner)
        return GroupScale(layer.structure, layer.shape, getattr(layer.module, layer.param))

    def _tied_params(self, layer: PrunedLayer) -> list[tuple[nn.Module, str]]:
        # the layer structure scales a module's bias along with its weight
        if not isinstance(self.structure, Layer):
            return super()._tied_params(layer)
        has_bias = layer.param == "weight" and getattr(layer.module, "bias", None) is not None
        return [(layer.module, "bias")] if has_bias else []

    # -- the lifecycle hooks --------------------------------------------------------------
    def _method_param_groups(self, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        group = {**defaults, "params": list(self.alphas(live=True).values())}
        group["weight_decay"] = 0.0 if self.variant == "l1" else self.alpha_decay
        if self.alpha_lr is not None:
            group["lr"] = self.alpha_lr
        if self.alpha_momentum is not None:
            group["momentum"] = self.alpha_momentum
        return [group]

    def _penalty(self) -> Tensor | None:
        if self.variant != "l1" or self.pattern_fixed:
            return None
        return self.alpha_decay * sum(a.abs().sum() for a in self.alphas(live=True).values())

    def _on_step(self) -> None:
        if self.steps >= self.threshold_start:
            self._update_keep()

    def _freeze_pattern(self) -> None:
        # the keep flags stay as they are (step() no longer re-tests them); each kept group
        # keeps its learned scale, now a constant factor of its weights (in param_groups()
        # still, without a gradient: no optimizer moves it)
        for alpha in self.alphas(live=True).values():
            alpha.requires_grad_(False)

    def _on_epoch_end(self) -> None:
        if self.variant == "fixed" and self.schedule.unit == "epoch":
            self._update_keep()

    def _mask(self, layer: PrunedLayer) -> Tensor:
        if self.maps is not None:
            keep = self.map_scale.keep.cpu()
            return self.maps.mask(layer.name, layer.shape, keep).to(keep.device)
        p = layer.parametrization
        return layer.structure.expand(p.keep.to(torch.float32), layer.shape) > 0.5

    def _layer_extras(self) -> dict[str, dict[str, Any]]:
        """Per layer: the fraction of groups that are off, |alpha| quantiles, and the alphas
        themselves (a list, for histograms)."""
        out = {}
        for name, layer in self.layers.items():
            alpha, keep = self._layer_alphas(layer)
            magnitude = alpha.abs().float().cpu()
            out[name] = {"pruned_fraction": 1.0 - keep.float().mean().item(),
                         "alpha_abs_min": magnitude.min().item(),
                         "alpha_abs_median": magnitude.median().item(),
                         "alpha_abs_max": magnitude.max().item(),
                         "alpha": alpha.cpu().tolist()}
            if self.variant != "fixed" and self.threshold_mode == "absolute":
                out[name]["threshold"] = self.threshold
            elif self.variant != "fixed" and self.maps is None and not isinstance(
                    self.structure, Layer):  # the layer's own cut
                out[name]["threshold"] = self.threshold * magnitude.max().item()
        return out

    def _layer_alphas(self, layer: PrunedLayer) -> tuple[Tensor, Tensor]:
        """The (detached) alphas and keep flags of ``layer``'s groups; "map": of the maps it
        has a member in."""
        p = layer.parametrization
        if self.maps is None:
            return p.alpha.detach(), p.keep
        ids = torch.cat([i[i >= 0] for i in self.maps.index(layer.name, layer.shape).values()])
        ids = ids.unique().to(self.map_scale.keep.device)
        return self.map_scale.alpha.detach()[ids], self.map_scale.keep[ids]

    # -- PSP itself -----------------------------------------------------------------------
    def alphas(self, live: bool = False) -> dict[str, Tensor]:
        """``{parameter name: alpha}``; the live parameters if ``live``, else detached copies.
        With ``"map"``: ``{"map": alpha}``, one per map of ``self.maps.groups``, in order."""
        if self.maps is not None:
            a = self.map_scale.alpha
            return {"map": a if live else a.detach().clone()}
        return {n: (l.parametrization.alpha if live else l.parametrization.alpha.detach().clone())
                for n, l in self.layers.items()}

    @torch.no_grad()
    def _update_keep(self) -> None:
        if self.maps is not None:
            self._update_map_keep()
            return
        # "layer": one alpha per layer, so the relative rule compares the layers' gates
        gates = 1.0
        if isinstance(self.structure, Layer) and self.threshold_mode == "relative":
            gates = max(float(l.parametrization.alpha.abs().max()) for l in self.layers.values())
        for layer in self.layers.values():
            p = layer.parametrization
            magnitude = p.alpha.abs()
            if self.variant == "fixed":
                keep = self._rank_keep(layer, magnitude)
            else:
                scale = 1.0
                if self.threshold_mode == "relative":
                    scale = gates if isinstance(layer.structure, Layer) else magnitude.max()
                keep = magnitude >= self.threshold * scale
                if not isinstance(layer.structure, Layer) and not keep.any():
                    keep[int(magnitude.argmax())] = True  # a layer keeps its best group
            if not self.revive:
                keep &= p.keep
            p.keep.copy_(keep)
        self.sync()  # thresholds of rank-local alphas: every rank takes rank 0's keep flags

    def _rank_keep(self, layer: PrunedLayer, magnitude: Tensor) -> Tensor:
        t = self.steps if self.schedule.unit == "step" else self.epochs
        sparsity = self.schedule.sparsity(t, self.final_sparsity)
        min_keep = 0 if isinstance(layer.structure, Layer) else 1
        # ties (all alphas start at 1) go to the group with the larger weight norm: rank in
        # the order of descending norm, where the selection keeps the lower index
        norms = layer.structure.scores(layer.original().detach(), "l2")
        if self.rank_by == "scaled":
            magnitude = magnitude * norms.to(magnitude)
        if not self.revive:  # an off group cannot come back: it must not take a place
            magnitude = magnitude.masked_fill(~layer.parametrization.keep, -1.0)
        by_norm = torch.sort(norms, descending=True, stable=True).indices
        keep = torch.empty_like(magnitude, dtype=torch.bool)
        keep[by_norm] = keep_all_but_lowest(magnitude[by_norm], sparsity, min_keep,
                                            self.round_to)
        return keep

    def _update_map_keep(self) -> None:
        """``_update_keep`` for "map": per family of maps (the alternatives to each other),
        which keeps its best map."""
        p = self.map_scale
        magnitude = p.alpha.abs().cpu()
        keep = torch.ones_like(magnitude, dtype=torch.bool)
        if self.variant == "fixed":
            t = self.steps if self.schedule.unit == "step" else self.epochs
            sparsity = self.schedule.sparsity(t, self.final_sparsity)
            weights = {n: l.original() for n, l in self.layers.items()}
            norms = map_scores(self.maps, self.layers, "l2", weights)[0]
            if self.rank_by == "scaled":
                magnitude = magnitude * norms.to(magnitude)
            if not self.revive:  # as per layer: off maps take no place in the ranking
                magnitude = magnitude.masked_fill(~p.keep.cpu(), -1.0)
        for ids in self.maps.families().values():
            ids = torch.tensor(ids)
            m = magnitude[ids]
            if self.variant == "fixed":  # ties go to the larger weight norm, as per layer
                by_norm = torch.sort(norms[ids], descending=True, stable=True).indices
                k = torch.empty_like(m, dtype=torch.bool)
                k[by_norm] = keep_all_but_lowest(m[by_norm], sparsity, 1, self.round_to)
            else:
                scale = m.max() if self.threshold_mode == "relative" else 1.0
                k = m >= self.threshold * scale
                k[int(m.argmax())] = True
            keep[ids] = k
        keep = keep.to(p.keep.device)
        if not self.revive:
            keep &= p.keep
        p.keep.copy_(keep)
        self.sync()


def _check_number(field: str, value: Any, low: float, low_open: bool,
                  high: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        lo = "(" if low_open else "["
        hi = f"{high})" if high is not None else "inf)"
        raise ConfigError(f"{field} must be a number in {lo}{low:g}, {hi}; got {value!r}")
