"""Build what a resolved recipe names: the data, the model (and its pretrained weights), the
pruner's class and arguments, and each phase's optimizer and LR schedule.

Building is validation: every bad field becomes a one-line ``RecipeError`` naming it, raised
while the real objects are built, before anything is written.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import data as hdata
from .. import models as hmodels
from ..errors import HwpruneError
from ..methods import get_method
from ..schedules import Schedule
from .datasets import Augment, augmentable, dataset_spec
from .phases import Plan
from .recipe import RecipeError, method_class, method_kwargs

__all__ = ["Data", "Parts", "build", "field_error", "make_optimizer", "make_pruner",
           "new_model", "run_method_kwargs"]


def field_error(field: str, e: Exception) -> RecipeError:
    return RecipeError(f"recipe field {field}: {' '.join(str(e).split())}")


@dataclass
class Data:
    """The tensors a run trains and evaluates on (subsets already taken)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass
class Parts:
    """What ``build`` returns: the data, the model factory and the model it made, the
    method (None: a dense run) with its keyword arguments, checked on a copy of the model, and
    the training batches' augmentation (None: none)."""

    data: Data
    factory: Callable[..., nn.Module]
    model: nn.Module
    method_cls: type | None
    method_kwargs: dict[str, Any]
    augment: Augment | None = None  # the data set's, when the recipe asks for augmentation

    @property
    def example(self) -> Tensor:
        """One test input (batch 1): what reports, shrink and latency run on."""
        return self.data.test_x[:1]


def build(cfg: dict[str, Any]) -> Parts:
    """Seed, load the data, make the model (filling in ``model.args`` the data implies, e.g.
    ``num_classes``; ``cfg`` is changed in place), load its pretrained weights and check the
    method's parameters by building a pruner on a copy."""
    torch.manual_seed(cfg["seed"])
    data, info = load_data(cfg)
    factory = model_factory(cfg["model"]["name"])
    args = cfg["model"]["args"]
    params = _parameters(factory)
    for key, value in info.items():  # e.g. the vocabulary size of a text data set
        if key not in args and key in params:
            args[key] = value
    model = new_model(cfg, factory)
    if cfg["model"]["pretrained"]:
        load_pretrained(model, cfg)
    method = cfg["method"]
    steps_per_epoch = Plan(cfg, data.train_x, data.train_y).steps_per_epoch()
    parts = Parts(data, factory, model, method_class(method["name"]) if method else None,
                  run_method_kwargs(cfg, steps_per_epoch) if method else {},
                  dataset_spec(cfg["data"]["name"]).augment if cfg["data"]["augment"] else None)
    if parts.method_cls is not None:  # every method parameter is checked here, on a copy
        pruner = make_pruner(parts, copy.deepcopy(model))
        warn_late_schedule(cfg, getattr(pruner, "schedule", None), steps_per_epoch)
        warn_blind_start(cfg, getattr(pruner, "logit_init", None))
    return parts


class StartWarning(UserWarning):
    """A learned mask starts blind to a pretrained model's weights."""


def warn_blind_start(cfg: dict[str, Any], logit_init: Any) -> None:
    """Warn (``StartWarning``) where a pretrained model meets mask logits that start without
    its weights (DPP's ``"zeros"`` or ``"random"``): the first masks are drawn at random, so
    the pretrained function is lost before the masks learn (docs/dpp.md, the leaderboard's
    default-start row). A warning: a run that means to start blind may."""
    if not cfg["model"]["pretrained"] or logit_init not in ("zeros", "random"):
        return
    warnings.warn(StartWarning(
        f"method.logit_init is {logit_init!r} on a pretrained model "
        f"(model.pretrained: {cfg['model']['pretrained']}): the first masks are drawn at "
        "random and lose the pretrained function before they learn; set method.logit_init: "
        "magnitude to start from the weights' magnitude mask"), stacklevel=2)


class ScheduleWarning(UserWarning):
    """A method's sparsity schedule ends after the pruning phase: the masks are frozen for
    fine-tuning before they reach the recipe's sparsity."""


def warn_late_schedule(cfg: dict[str, Any], schedule: Any, steps_per_epoch: int) -> None:
    """Warn (``ScheduleWarning``) where ``schedule`` (``method.schedule``) ends after the last
    step or epoch of the pruning phase: the run would then fine-tune, and save, a model at a
    lower sparsity than asked. A warning, not a refusal: a smoke run (``--quick``) cuts every
    phase short on purpose."""
    if not isinstance(schedule, Schedule):
        return
    epochs = cfg["train"]["prune_epochs"]
    length = epochs * steps_per_epoch if schedule.unit == "step" else epochs
    if schedule.end <= length:
        return
    phase = (f"train.prune_epochs={epochs} x {steps_per_epoch} steps an epoch = {length} steps"
             if schedule.unit == "step" else f"train.prune_epochs={epochs}")
    warnings.warn(ScheduleWarning(
        f"method.schedule ends at {schedule.unit} {schedule.end}, after the pruning phase "
        f"({phase}): the masks stop short of method.sparsity, and the run fine-tunes and "
        f"saves a less sparse model; allowed: method.schedule.end at most {length}, or more "
        "train.prune_epochs"), stacklevel=2)


def run_method_kwargs(cfg: dict[str, Any], steps_per_epoch: int | None = None
                      ) -> dict[str, Any]:
    """The method's keyword arguments from the recipe, with the length of the pruning phase
    passed to a method that declares an ``epochs_arg`` (DPP's temperature anneal spans the
    whole phase) or, given ``steps_per_epoch``, a ``steps_arg`` (ADMM's rho reaches its cap
    at the phase's last round), unless the recipe sets that argument itself."""
    method = cfg["method"]
    kwargs = method_kwargs(method)
    spec = get_method(method["name"])
    epochs = cfg["train"]["prune_epochs"]
    lengths = ((spec.epochs_arg, epochs),
               (spec.steps_arg, epochs * steps_per_epoch if steps_per_epoch else 0))
    for arg, length in lengths:
        if arg is not None and arg not in kwargs and length >= 1:
            kwargs[arg] = length
    return kwargs


def data_root(cfg: dict[str, Any]) -> Path:
    try:
        return hdata.data_dir(cfg["data"]["dir"])
    except HwpruneError as e:
        raise field_error("data.dir", e) from None


def load_data(cfg: dict[str, Any]) -> tuple[Data, dict[str, Any]]:
    """The recipe's data set with its seeded subsets, and the facts it gives the model."""
    d = cfg["data"]
    name = d["name"]
    spec = dataset_spec(name)
    if d["augment"] and spec.augment is None:
        raise RecipeError(f"recipe field data.augment: got True, but data set {name!r} has no "
                          f"augmentation; allowed: false, or a data set that has one "
                          f"({', '.join(augmentable()) or 'none registered'})")
    try:
        root = data_root(cfg) if spec.needs_folder else None
        train, test, info = spec.load(root, d, cfg["seed"])
    except RecipeError:
        raise
    except HwpruneError as e:
        raise field_error("data", e) from None
    tensors = []
    for split, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "tensors") or len(ds.tensors) != 2:
            raise RecipeError(f"recipe field data.name: {name!r} gave a {split} set of "
                              f"{type(ds).__name__}; allowed: a TensorDataset of (x, y)")
        x, y = ds.tensors
        n = d[f"{split}_subset"]
        if n is not None and n < len(x):
            g = torch.Generator().manual_seed(cfg["seed"] + (split == "test"))
            idx = torch.randperm(len(x), generator=g)[:n].sort().values
            x, y = x[idx], y[idx]
        tensors += [x, y]
    if y.dim() == 1 and "num_classes" not in info:  # class labels (text targets are 2-D)
        info["num_classes"] = int(max(int(tensors[1].max()), int(tensors[3].max())) + 1)
    return Data(*tensors), info


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The registered model (``hwprune.models.MODELS``) called ``name``."""
    if name not in hmodels.MODELS:
        raise RecipeError(f"recipe field model.name: got {name!r}; allowed: "
                          f"{', '.join(sorted(hmodels.MODELS))}, or a model your --plugin FILE "
                          "registers with hwprune.models.register_model")
    return hmodels.MODELS[name]


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def new_model(cfg: dict[str, Any], factory: Callable[..., nn.Module]) -> nn.Module:
    """A fresh model from the recipe's factory and arguments."""
    try:
        model = factory(**cfg["model"]["args"])
    except (TypeError, ValueError) as e:
        raise field_error("model.args", e) from None
    if not isinstance(model, nn.Module):
        raise RecipeError(f"recipe field model.name: {cfg['model']['name']!r} returned "
                          f"{type(model).__name__}; allowed: a factory of torch.nn.Module")
    return model


def load_pretrained(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Load ``model.pretrained`` into ``model``; every key and shape must fit."""
    spec = cfg["model"]["pretrained"]
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.is_file():
        path = data_root(cfg) / spec
    if not path.is_file():
        raise RecipeError(f"recipe field model.pretrained: got {spec!r}; no such file "
                          "(relative paths are looked up in the working folder, then in "
                          "data.dir)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign files
        raise field_error("model.pretrained", e) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise RecipeError(f"recipe field model.pretrained: {spec} holds "
                          f"{type(obj).__name__}; allowed: a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mine = model.state_dict()
    # checkpoints from older PyTorch lack BatchNorm's step counter; it is not a weight
    missing = sorted(k for k in set(mine) - set(state)
                     if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(mine))
    shapes = [k for k in set(mine) & set(state) if tuple(mine[k].shape) != tuple(
        getattr(state[k], "shape", ()))]
    if missing or unexpected or shapes:
        what = "; ".join(f"{label} {len(keys)} ({', '.join(keys[:3])}"
                         f"{', ...' if len(keys) > 3 else ''})"
                         for label, keys in (("missing", missing), ("unexpected", unexpected),
                                             ("shape mismatch", sorted(shapes))) if keys)
        raise RecipeError(f"recipe field model.pretrained: {spec} does not fit model "
                          f"{cfg['model']['name']}: {what}")
    model.load_state_dict(state, strict=False)  # every key but the counters was checked


def make_pruner(parts: Parts, model: nn.Module) -> Any:
    """The recipe's method on ``model``; its own errors name the method. A method that
    traces the model (``structure: map``) gets one test input as ``example_inputs``: a
    recipe cannot hold a tensor."""
    kwargs = dict(parts.method_kwargs)
    if "example_inputs" in inspect.signature(parts.method_cls).parameters:
        kwargs.setdefault("example_inputs", parts.example)
    try:
        return parts.method_cls(model, **kwargs)
    except (HwpruneError, TypeError) as e:
        raise field_error(f"method ({parts.method_cls.__name__})", e) from None


#: ``optimizer.name`` -> the torch class
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(cfg: dict[str, Any], phase: str, epochs: int, model: nn.Module,
                   pruner: Any) -> tuple[torch.optim.Optimizer, Any]:
    """A fresh optimizer over ``pruner.param_groups()`` (the model's trainable parameters in a
    dense run) and the LR schedule of a phase of ``epochs`` epochs."""
    o = cfg["optimizer"]
    lr = o["finetune_lr"] if phase == "finetune" and o["finetune_lr"] else o["lr"]
    settings: dict[str, Any] = {"lr": lr, "weight_decay": o["weight_decay"]}
    if o["name"] == "sgd":
        settings.update(momentum=o["momentum"], nesterov=o["nesterov"])
    if pruner is not None:
        groups = pruner.param_groups(**settings)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], **settings}]
    optimizer = OPTIMIZERS[o["name"]](groups, lr=lr)
    if o["lr_schedule"] == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    elif o["lr_schedule"] == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, o["milestones"], o["gamma"])
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0)
    return optimizer, scheduler
