"""What the Lightning and the transformers callbacks share: which method to build, building it,
putting the method's parameter groups into the framework's optimizer (or checking they are
there), the facts to log, and the end of fitting (finalize, shrink, save, report).

Nothing here imports a framework; each callback maps its framework's hooks onto these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, LifecycleError
from ..methods import Pruner

__all__ = ["MethodChoice", "Finish", "Finished", "add_method_groups", "check_method_groups",
           "extend_schedulers", "facts", "PRUNER_FILE", "check_fix_at", "fix_when_due"]

#: the file a callback writes beside a framework's checkpoint (transformers' checkpoint folder)
PRUNER_FILE = "hwprune-pruner.pt"


class MethodChoice:
    """A method and its arguments, given as a ``Pruner`` class and keyword arguments
    (``MethodChoice(hp.DPP, {"structure": "2:4"})``), a registered method's name with keyword
    arguments (``"DPP"``), or a recipe's method block (``{"name": "DPP", "structure": "2:4"}``,
    checked like ``hwprune run`` checks it). ``build(model)`` makes the pruner."""

    def __init__(self, method: type | str | Mapping[str, Any], kwargs: Mapping[str, Any]):
        if isinstance(method, type):
            if not issubclass(method, Pruner):
                raise ConfigError(f"method: got the class {method.__name__}; allowed: a "
                                  "hwprune method class (hp.DPP, ...), its name, or a recipe's "
                                  "method block")
            self.cls, self.kwargs = method, dict(kwargs)
            return
        if isinstance(method, str):
            block: Any = {"name": method, **kwargs}
        elif isinstance(method, Mapping):
            if kwargs:
                raise ConfigError(f"method: a method block and keyword arguments "
                                  f"({', '.join(kwargs)}); allowed: one of them (put the "
                                  "arguments into the block)")
            block = dict(method)
        else:
            raise ConfigError(f"method: got {type(method).__name__}; allowed: a hwprune method "
                              "class (hp.DPP, ...), its name, or a recipe's method block")
        # the recipe's own checks and conversions: one reading of a method block everywhere
        from ..app.recipe import method_class, method_kwargs, resolve_method

        resolved = resolve_method(block)
        self.cls, self.kwargs = method_class(resolved["name"]), method_kwargs(resolved)

    def build(self, model: nn.Module) -> Pruner:
        """The pruner on ``model`` (the bare model: build before any DDP wrapping)."""
        try:
            return self.cls(model, **self.kwargs)
        except TypeError as e:  # a keyword the class does not take
            raise ConfigError(f"{self.cls.__name__}: {e}") from None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}({args})"


# -- the end of learning the pattern ---------------------------------------------------------
def check_fix_at(value: Any) -> int | None:
    """A callback's ``fix_pattern_at``: ``None``, or the number of epochs after which the
    pattern is fixed (``Pruner.fix_pattern()``) and the epochs left fine-tune the weights."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ConfigError(f"fix_pattern_at: got {value!r}; allowed: None, or a number of "
                          "epochs >= 1 after which the pattern is fixed for fine-tuning")
    return value


def fix_when_due(pruner: Pruner, at: int | None) -> None:
    """Right after ``pruner.epoch_end()``: ``fix_pattern()`` once ``at`` epochs have ended
    (and not again; a pruner resumed fixed stays so)."""
    if at is not None and pruner.epochs >= at and not pruner.pattern_fixed:
        pruner.fix_pattern()


# -- the optimizer ---------------------------------------------------------------------------
def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter group's hyperparameters (what ``pruner.param_groups(**defaults)`` takes),
    with its base learning rate where an LR scheduler keeps one (``initial_lr``): a scheduler
    may have changed ``lr`` already (a warm-up starts low; a resumed run is mid-schedule)."""
    out = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
    if "initial_lr" in group:
        out["lr"] = group["initial_lr"]
    return out


def _method_groups(optimizer: torch.optim.Optimizer, pruner: Pruner) -> list[dict[str, Any]]:
    """The method's own groups, with the optimizer's first group as the defaults: what
    ``pruner.param_groups(**those settings)`` would have made, after the model's group."""
    return pruner.param_groups(**_settings(optimizer.param_groups[0]))[1:]


def add_method_groups(optimizer: torch.optim.Optimizer, pruner: Pruner) -> list[dict[str, Any]]:
    """Give ``optimizer`` the method's parameter groups (PSP's alphas, DPP's logits, ...) with
    the method's settings: each method parameter leaves the user's group it was in (an
    optimizer built over ``model.parameters()`` of the pruned model holds them with the
    model's settings) and joins its own group. A group already there, exactly, is kept. The
    optimizer then equals one built over ``pruner.param_groups(**its first group's
    settings)``. Returns the groups it added (call before the optimizer has any state)."""
    added = []
    first = optimizer.param_groups[0]
    # a scheduler's factor so far (warm-up): the added groups start at the same point of it
    factor = first["lr"] / first["initial_lr"] if first.get("initial_lr") else 1.0
    for group in _method_groups(optimizer, pruner):
        ids = {id(p) for p in group["params"]}
        if any({id(p) for p in g["params"]} == ids for g in optimizer.param_groups):
            continue
        for g in optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        if "initial_lr" in first:
            group["initial_lr"] = group["lr"]
            group["lr"] = group["lr"] * factor
        optimizer.add_param_group(group)
        added.append(optimizer.param_groups[-1])
    return added


def check_method_groups(optimizer: torch.optim.Optimizer, pruner: Pruner, fix: str) -> None:
    """Raise ``ConfigError`` unless every method group is in ``optimizer`` with the method's
    own settings (those where it differs from the optimizer's defaults); ``fix`` says how."""
    defaults = _settings(optimizer.param_groups[0])
    holder = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    method = type(pruner).__name__
    for group in _method_groups(optimizer, pruner):
        params = group["params"]
        missing = sum(id(p) not in holder for p in params)
        if missing:
            raise ConfigError(f"the optimizer lacks {missing} of the {len(params)} parameters of "
                              f"{method}'s parameter group; {fix}")
        own = {k: v for k, v in group.items() if k != "params" and defaults.get(k) != v}
        for p in params:
            held = _settings(holder[id(p)])
            wrong = {k: held.get(k) for k, v in own.items() if held.get(k) != v}
            if wrong:
                raise ConfigError(f"the optimizer holds {method}'s parameters with "
                                  f"{wrong}; the method's group has "
                                  f"{ {k: own[k] for k in wrong} }; {fix}")


#: a scheduler's per-group lists that ``extend_schedulers`` knows how to extend
_EXTENDED = ("base_lrs", "_last_lr", "lr_lambdas")


def extend_schedulers(schedulers: Iterable[Any], optimizer: torch.optim.Optimizer,
                      added: list[dict[str, Any]]) -> None:
    """Let LR schedulers built before ``add_method_groups`` schedule the added groups too: each
    gets its ``initial_lr`` and a base LR; ``LambdaLR``/``MultiplicativeLR`` repeat their
    first lambda. A scheduler that keeps anything else per group (``CyclicLR``'s
    ``max_lrs``, ``OneCycleLR``'s keys in each group, ``ReduceLROnPlateau``'s ``min_lrs``) is
    refused: build the optimizer over ``pruner.param_groups(...)`` for it."""
    before = len(optimizer.param_groups) - len(added)
    standard = {"params", "initial_lr", *optimizer.defaults}  # what the optimizer itself keeps
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is not optimizer or not added:
            continue
        per_group = [k for k, v in vars(scheduler).items()
                     if isinstance(v, list) and len(v) == before and k not in _EXTENDED]
        per_group += sorted(set(optimizer.param_groups[0]) - standard)
        if not hasattr(scheduler, "base_lrs") or per_group:
            raise ConfigError(f"{type(scheduler).__name__} keeps "
                              f"{', '.join(per_group) or 'no base_lrs'} per parameter group "
                              "and cannot be told about the method's groups added after it was "
                              "built; allowed: a scheduler such as StepLR, CosineAnnealingLR, "
                              "LinearLR or LambdaLR, or an optimizer built over "
                              "callback.pruner.param_groups(...) with add_param_groups=False")
        for group in added:
            scheduler.base_lrs.append(group.setdefault("initial_lr", group["lr"]))
            if isinstance(getattr(scheduler, "lr_lambdas", None), list):
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])


# -- what to log -----------------------------------------------------------------------------
def facts(pruner: Pruner) -> dict[str, float]:
    """``sparsity`` and, for every numeric per-layer fact of the method's report (DPP's
    temperature and confidence, PSP's pruned fraction, ADMM's unified and zero fractions,
    ...), its mean over the pruned layers; steps and epochs. Names carry no prefix."""
    out = {"sparsity": pruner.sparsity(), "steps": float(pruner.steps),
           "epochs": float(pruner.epochs)}
    values: dict[str, list[float]] = {}
    for layer_facts in pruner.layer_extras().values():
        for key, value in layer_facts.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
    out.update({key: sum(v) / len(v) for key, v in values.items()})
    return out


# -- the end of fitting ----------------------------------------------------------------------
@dataclass
class Finished:
    """What ``Finish`` made: the finalized (and maybe shrunk) model and its report."""

    model: nn.Module
    report: Any = None


@dataclass
class Finish:
    """What to do when fitting ends: ``finalize`` bakes the pattern in (the pruner is then
    finished); with ``example_inputs`` (one batch the model takes), ``shrink`` removes empty
    channels (a new model), ``report`` counts what was gained; ``save`` writes the deployable
    model with ``hp.save`` (rank 0 only)."""

    finalize: bool = False
    shrink: bool = False
    save: str | Path | None = None
    report: bool = False
    example_inputs: Tensor | tuple[Tensor, ...] | None = None

    def __post_init__(self) -> None:
        wants = [name for name in ("shrink", "report") if getattr(self, name)]
        if self.save is not None:
            wants.append("save")
        if wants and not self.finalize:
            raise ConfigError(f"{', '.join(wants)} at the end of fitting need finalize=True")
        if (self.shrink or self.report) and self.example_inputs is None:
            raise ConfigError("shrink and report need example_inputs= (one batch the model "
                              "takes, e.g. x[:1])")

    def __call__(self, pruner: Pruner, is_main: bool) -> Finished | None:
        """Do it to ``pruner``'s model (the bare one); ``is_main``: the rank that writes."""
        if not self.finalize:
            return None
        if pruner.finalized:
            raise LifecycleError("the pruner was finalized before fitting ended")
        from .. import report as make_report
        from .. import save, shrink

        model = pruner.finalize()
        examples = self.example_inputs
        if self.shrink:
            model = shrink(model, examples)
        done = Finished(model)
        if self.report:
            done.report = make_report(model, examples, pruner=pruner)
        if self.save is not None and is_main:
            save(model, self.save)
        return done

