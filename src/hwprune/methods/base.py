"""The pruning lifecycle every method shares.

::

    pruner = Method(model, structure, ..., targets=None)   # validate, then parametrize
    opt = torch.optim.SGD(pruner.param_groups(lr=0.1, momentum=0.9))
    loss = task_loss + pruner.penalty(); ...; opt.step(); pruner.step()
    pruner.epoch_end()
    pruner.fix_pattern()                                    # optional: fine-tune a fixed pattern
    model = pruner.finalize()                               # plain modules, zeros baked in

A method subclasses ``Pruner`` and fills in a few hooks: the parametrization that computes a
layer's effective weight, what happens at ``step``/``epoch_end``, its penalty, its own
learnable parameters and their optimizer settings, and its extra resumable state. Everything
a user can get wrong is checked in ``__init__`` before the model is touched.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import distributed
from ..errors import ConfigError, HwpruneError, LifecycleError, StructureError, TargetError
from ..structures import FeatureMap, Structure, parse_structure, transposed
from ..targets import SkippedLayersWarning, Spec, Target, check_prunable, resolve_targets
from .filter_maps import attach_ties, bake_ties, checked_ties, filter_ties
from .layer import PrunedLayer
from .registry import get_method
from .state import Resumable

__all__ = ["Pruner", "PrunedLayer"]


def _pruned_by_hwprune(t: Target) -> bool:
    """Whether a hwprune pruner's parametrization is on the target's weight."""
    return parametrize.is_parametrized(t.module, t.param) and any(
        type(p).__module__.startswith("hwprune.") for p in t.module.parametrizations[t.param])


def _check_plain(t: Target) -> None:
    """A target's weight must be a plain parameter: not a computed tensor, and not
    parametrized by anything but hwprune (weight_norm, spectral_norm: the default selection
    leaves it out, a named target is refused)."""
    if not parametrize.is_parametrized(t.module, t.param):
        check_prunable(t)
        return
    kinds = [type(p) for p in t.module.parametrizations[t.param]]
    raise StructureError(f"{t.name}: parametrized by {', '.join(k.__name__ for k in kinds)}, "
                         "which hwprune does not prune through: "
                         f"torch.nn.utils.parametrize.remove_parametrizations(module, "
                         f"{t.param!r}) bakes it into a plain parameter; or leave the layer out "
                         "with targets=")


def _select_layers(pruner: Pruner, targets: Spec, strict: bool) -> None:
    """Fill ``pruner.layers`` with the targets that can carry its structure (the method's
    ``_layer_structure``, ``validate``, ``_check_config`` and ``_check_layer``). A default
    target that cannot is recorded in ``pruner.skipped`` and named in one warning; a named
    target, or any with ``strict``, raises. Nothing of the model is touched."""
    model = pruner.model
    # only the default selection adapts to the model; named targets and strict=True refuse
    may_skip = targets is None and not strict
    errors: list[HwpruneError] = []

    def skip(name: str, error: HwpruneError) -> None:
        if not may_skip:
            raise error
        pruner.skipped[name] = str(error).removeprefix(f"{name}: ")
        errors.append(error)

    for t in pruner._targets(model, targets):
        shape = tuple(getattr(t.module, t.param).shape)
        if _pruned_by_hwprune(t):
            raise StructureError(f"{t.name} is already parametrized by another pruner; "
                                 "finalize it first")
        try:
            _check_plain(t)
        except (StructureError, TargetError) as e:
            skip(t.name, e)
            continue
        try:
            # a Conv1D stores (in, out): the method picks the structure of the (out, in) view
            structure = pruner._layer_structure(t.out_in_shape, t.name)
            structure = transposed(structure) if t.transposed else structure
            structure.validate(shape, t.name)
        except StructureError as e:
            skip(t.name, e)
            continue
        pruner.layers[t.name] = PrunedLayer(t, structure, shape)
    pruner._check_config()  # method-specific validation, still before the model is touched
    for name, layer in list(pruner.layers.items()):
        try:
            pruner._check_layer(layer)
        except (StructureError, ConfigError) as e:
            skip(name, e)
            del pruner.layers[name]
    if not pruner.layers:  # nothing fits: the first layer's kind of error, naming them all
        raise type(errors[0])(
            f"no default target of {type(model).__name__} can carry "
            f"{type(pruner).__name__}'s {pruner.structure}: " + "; ".join(
                f"{n}: {why}" for n, why in pruner.skipped.items()))
    if pruner.skipped:
        warnings.warn(SkippedLayersWarning(type(pruner).__name__, str(pruner.structure),
                                           pruner.skipped), stacklevel=4)


class Pruner(Resumable):
    """Base class of all methods. Subclasses override the ``_hooks`` below, not the verbs."""

    #: public methods a recipe's ``train.phase_hook`` may call when fine-tuning starts
    PHASE_HOOKS: tuple[str, ...] = ("fix_pattern",)

    def __init__(self, model: nn.Module, structure: str | Structure, targets: Spec = None,
                 strict: bool = False):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise ConfigError(
                "create the pruner on the bare model, then wrap it in DistributedDataParallel"
            )
        self.model = model
        self.structure = parse_structure(structure)
        if isinstance(self.structure, FeatureMap) and not self._prunes_maps():
            raise ConfigError(_no_maps(type(self)))
        self.layers: dict[str, PrunedLayer] = {}
        #: default targets that cannot carry the structure: {parameter name: why}
        self.skipped: dict[str, str] = {}
        _select_layers(self, targets, strict)
        self._filter_ties = filter_ties(model, self.layers, type(self).__name__)
        #: {layer name: [(module, tensor name)]}: tensors outside the targets that each
        #: layer's gate also gates (a pruned filter's bias and BatchNorm entries)
        self.ties = checked_ties({n: self._tied_params(l) for n, l in self.layers.items()})
        self.steps = 0
        self.epochs = 0
        #: set by ``fix_pattern()``: the pattern no longer changes, only the weights train
        self.pattern_fixed = False
        self._final_masks: dict[str, Tensor] | None = None
        self._hooks: list[Any] = []  # handles of hooks on the model, removed at finalize
        touched = [layer.module for layer in self.layers.values()]
        touched += [m for tied in self.ties.values() for m, _ in tied]
        before = {id(m): _parametrized_names(m) for m in touched}
        try:
            for layer in self.layers.values():
                layer.parametrization = self._make_parametrization(layer)
                parametrize.register_parametrization(layer.module, layer.param,
                                                     layer.parametrization)
            attach_ties(self.ties, self.layers, type(self).__name__)
            self._on_attach()
            self.sync()  # under torch.distributed every rank starts from rank 0's decisions
        except BaseException:
            # a failure on a later layer must not leave the earlier ones parametrized: the
            # model is handed back as it came (a second pruner would refuse it otherwise)
            self._detach(before)
            raise

    # -- hooks for methods ---------------------------------------------------------------
    def _prunes_maps(self) -> bool:
        """Whether the method prunes the coupled feature maps of ``structure="map"``."""
        return False

    def _tied_params(self, layer: PrunedLayer) -> list[tuple[nn.Module, str]]:
        """Tensors outside the targets that ``layer``'s gate (``output_gate()`` of its
        parametrization) also gates: a pruned filter's bias and the BatchNorm entries after
        it (``hwprune.methods.filter_maps``)."""
        return self._filter_ties.get(layer.name, [])

    def _targets(self, model: nn.Module, targets: Spec) -> list[Target]:
        """The weights to parametrize (``"map"``: every weight of a map, found from the graph)."""
        return resolve_targets(model, targets, norm_layers=self._norm_targets_allowed())

    def _norm_targets_allowed(self) -> bool:
        """Whether ``targets`` may name norm layers (whole-output gates; PSP's "layer")."""
        return False

    def _layer_structure(self, shape: tuple[int, ...], name: str) -> Structure:
        """The structure of one layer (DPP's rows depend on the layer's shape)."""
        return self.structure

    def _check_config(self) -> None:
        """Raise ``ConfigError`` for bad method parameters (called before attaching)."""

    def _check_layer(self, layer: PrunedLayer) -> None:
        """Raise ``StructureError``/``ConfigError`` if ``layer`` cannot carry the method's
        pattern (after ``_check_config``); a default target that fails is skipped."""

    def _make_parametrization(self, layer: PrunedLayer) -> nn.Module:
        raise NotImplementedError

    def _on_attach(self) -> None:
        """Called once parametrizations are registered (e.g. a one-shot prune)."""

    def _on_step(self) -> None:
        """Called after each optimizer step; ``self.steps`` is already incremented."""

    def _on_epoch_end(self) -> None:
        """Called at each epoch end; ``self.epochs`` is already incremented."""

    def _on_fix_pattern(self) -> None:
        """Called by ``fix_pattern()`` (under ``no_grad``) to settle the pattern where that
        changes state (ADMM projects the weights); ``_freeze_pattern`` follows."""

    def _freeze_pattern(self) -> None:
        """Make training keep the pattern of now (DPP: the top-k of the logits, no more
        sampling; PSP: the keep flags) and stop the method's own parameters that only served
        to choose it. Also called when a fixed pruner's state is loaded: it must not change
        the state."""

    def _penalty(self) -> Tensor | None:
        return None

    def _method_param_groups(self, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        """Groups for the method's own learnable parameters (each with its settings)."""
        return []

    def _mask(self, layer: PrunedLayer) -> Tensor:
        """Bool tensor of the weight's shape: which weights are kept now."""
        return layer.parametrization.mask.clone()

    def _final_weight(self, layer: PrunedLayer) -> Tensor:
        """The weight to bake in at ``finalize()`` (deterministic, eval-mode value)."""
        return layer.effective_weight()

    def _layer_extras(self) -> dict[str, dict[str, Any]]:
        """Method-specific per-layer facts for the report (PSP: alphas; DPP: confidence)."""
        return {}

    # -- the public verbs ------------------------------------------------------------------
    def param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the model's parameters with ``defaults``, then one
        group per kind of the method's own parameters with the method's settings."""
        self._check_live("param_groups")
        method_groups = self._method_param_groups(defaults)
        owned = {id(p) for g in method_groups for p in g["params"]}
        model_params = [
            p for p in self.model.parameters() if p.requires_grad and id(p) not in owned
        ]
        return [{"params": model_params, **defaults}, *method_groups]

    def penalty(self) -> Tensor:
        """The method's regulariser to add to the loss (a zero tensor where it has none)."""
        self._check_live("penalty")
        p = self._penalty()
        return p if p is not None else torch.zeros((), device=self._device())

    def step(self) -> None:
        """Advance the method by one optimizer step (schedules, ADMM updates, ...); after
        ``fix_pattern()`` only the count advances."""
        self._check_live("step")
        self.steps += 1
        if not self.pattern_fixed:
            with torch.no_grad():
                self._on_step()

    def epoch_end(self) -> None:
        """Advance per-epoch schedules (temperature, epoch-based sparsity schedules); after
        ``fix_pattern()`` only the count advances."""
        self._check_live("epoch_end")
        self.epochs += 1
        if not self.pattern_fixed:
            with torch.no_grad():
                self._on_epoch_end()
        self.sync()  # cheap once per epoch; covers state no decision broadcast (DPP's logits)

    def fix_pattern(self) -> None:
        """End the learning phase: from now on the model computes with the pattern it would
        keep at ``finalize()`` (DPP's deterministic top-k, not a sample; PSP's current keep
        flags; ADMM's projection), and training changes only the weights. Call it where
        fine-tuning starts (the recipe runner does, through ``train.phase_hook``): a method
        left learning would still move its pattern, so the fine-tuned weights would not be
        those of the pattern that is kept. Calling it twice is an error."""
        self._check_live("fix_pattern")
        if self.pattern_fixed:
            raise LifecycleError("fix_pattern() was already called: the pattern is fixed")
        with torch.no_grad():
            self._on_fix_pattern()
            self._freeze_pattern()
        self.pattern_fixed = True
        self.sync()

    def masks(self) -> dict[str, Tensor]:
        """``{parameter name: bool tensor of the weight's shape}``: True where kept."""
        if self._final_masks is not None:
            return {k: v.clone() for k, v in self._final_masks.items()}
        with torch.no_grad():
            return {name: self._mask(layer) for name, layer in self.layers.items()}

    def finalize(self) -> nn.Module:
        """Bake the effective weights (zeros, scales) into plain modules, in place.

        Removes every parametrization this pruner registered; the returned model (the same
        object as ``pruner.model``) needs nothing of hwprune to run. The pruner is finished
        afterwards: ``masks()`` still answers, the training verbs raise.
        """
        self._check_live("finalize")
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            bake_ties(self.ties)  # while the gates they read still exist
            self._remove_hooks()
            finals = {name: self._final_weight(layer).detach().clone()
                      for name, layer in self.layers.items()}
            self._final_masks = {name: self._mask(layer) for name, layer in self.layers.items()}
            # +0.0 where pruned: w * mask leaves -0.0 for negative w, which would hide the
            # pattern from the storage encoders (a -0.0 is a stored value, not an absent one)
            finals = {name: w.masked_fill(~self._final_masks[name], 0.0)
                      for name, w in finals.items()}
            self._final_extras = self._layer_extras()
            for name, layer in self.layers.items():
                parametrize.remove_parametrizations(
                    layer.module, layer.param, leave_parametrized=False
                )
                getattr(layer.module, layer.param).copy_(finals[name])
                layer.parametrization = None
        self.model.train(was_training)
        return self.model

    def sync(self, src: int = 0, weights: bool = False) -> None:
        """Make this pruner's state on every rank equal to rank ``src``'s (a no-op in a single
        process): every tensor of the parametrizations (masks, alphas, logits, ADMM's Z/U and
        pattern), the method's extra state (DPP's noise generator, DARB's block sizes, ADMM's
        rho), and with ``weights`` the trainable weights underneath. Methods call it right
        after a decision taken from rank-local numbers; it is a collective, so every rank must
        reach it (see ``hwprune.distributed``)."""
        if not distributed.is_distributed():
            return
        tensors = [t for layer in self.layers.values()
                   for t in layer.parametrization.state_dict(keep_vars=True).values()]
        if weights:
            tensors += [layer.original() for layer in self.layers.values()]
        distributed.broadcast_tensors(tensors, src)
        extra = self._extra_state()
        if extra:  # structural: empty on every rank or on none
            self._load_extra_state(distributed.broadcast_object(extra, src))

    def layer_extras(self) -> dict[str, dict[str, Any]]:
        """``{parameter name: {fact: value}}`` the method adds to reports; after
        ``finalize()``, the values as they were at that moment."""
        if self.finalized:
            return self._final_extras
        with torch.no_grad():
            return self._layer_extras()

    @property
    def finalized(self) -> bool:
        return self._final_masks is not None

    def _detach(self, before: dict[int, set[str]]) -> None:
        """Remove the parametrizations and hooks this pruner registered (not those already
        there)."""
        self._remove_hooks()
        with torch.no_grad():
            modules = [layer.module for layer in self.layers.values()]
            modules += [m for tied in self.ties.values() for m, _ in tied]
            for m in modules:
                for tensor in _parametrized_names(m) - before[id(m)]:
                    parametrize.remove_parametrizations(m, tensor, leave_parametrized=False)
            for layer in self.layers.values():
                layer.parametrization = None

    def _add_hook(self, handle: Any) -> None:
        """Keep a hook's handle, so that ``finalize()`` (or a failed construction) removes it."""
        self._hooks.append(handle)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- summaries ---------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of the targeted weights that are pruned now."""
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        return 1.0 - kept / total

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - m.float().mean().item() for n, m in self.masks().items()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(structure={str(self.structure)!r}, "
                f"layers={len(self.layers)}, steps={self.steps}, epochs={self.epochs})")

    # -- helpers ------------------------------------------------------------------------
    def _check_live(self, verb: str) -> None:
        if self.finalized:
            raise LifecycleError(f"{verb}() after finalize(): this pruner is finished")

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).original().device


def _no_maps(cls: type) -> str:
    try:
        supported = ", ".join(get_method(cls).structures)
    except ConfigError:  # a subclass not registered as a method
        supported = "see its docstring"
    return (f"{cls.__name__} does not prune structure 'map' (coupled feature maps); it "
            f"supports: {supported}. hp.Magnitude(model, 'map', sparsity, "
            "example_inputs=...), hp.PSP(model, 'map', example_inputs=...) and "
            "hp.DPP(model, 'map', k=..., example_inputs=...) prune feature maps")


def _parametrized_names(module: nn.Module) -> set[str]:
    return set(module.parametrizations) if parametrize.is_parametrized(module) else set()
