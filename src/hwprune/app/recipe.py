"""Recipes: one YAML file that names a whole pruning experiment, validated before anything runs.

A recipe has these sections (every key optional except ``model.name``; defaults below)::

    name: psp-digits            # default: the file's stem
    seed: 0
    model:
      name: small_cnn           # a registered model (hwprune.models.MODELS; yours: --plugin)
      args: {}                  # keyword arguments of the factory
      pretrained: null          # a state-dict checkpoint; relative paths: cwd, then data.dir
    data:
      name: digits              # a registered data set (hwprune.app.datasets.DATASETS):
                                # digits, cifar10, mnist, tinyshakespeare
      dir: null                 # the data folder; default $HWPRUNE_DATA_DIR
      train_subset: null        # a seeded random subset of this many training samples
      test_subset: null
      augment: false            # the data set's augmentation (cifar10: crop + flip)
      seq_len: 128              # text: characters per training sequence
    method:                     # null: no pruning (a dense reference run)
      name: PSP                 # a registered method (hwprune.methods.all_methods), by name
      structure: channel        # every other key is passed to the class as a keyword argument
      alpha_decay: 0.04
    optimizer:
      name: sgd                 # sgd, adam, adamw
      lr: 0.05
      momentum: 0.9
      weight_decay: 5.0e-4
      nesterov: false
      lr_schedule: cosine       # constant, cosine, step (per phase, per epoch)
      milestones: []            # step: epochs (within the phase) where lr is multiplied by gamma
      gamma: 0.1
      finetune_lr: null         # the fine-tuning phase's lr (default: lr)
    train:
      dense_epochs: 0           # phase 1: the dense model trains (no pruner yet)
      prune_epochs: 5           # phase 2: the pruner is created and trains with the model
      finetune_epochs: 0        # phase 3: retraining; phase_hook is called when it starts
      phase_hook: fix_pattern   # the method's phase hook (PHASE_HOOKS) run as fine-tuning starts
      batch_size: 64
      eval_batch_size: 512
      steps_per_epoch: null     # cap on the steps of an epoch (quick runs)
    end:
      finalize: true            # bake the pattern into plain modules
      shrink: false             # physically remove empty channels (needs hwprune.deploy.shrink)
      fold_batchnorm: false     # fold inference BatchNorm into the conv/linear before it
      save: true                # hp.save the deployable model to model.hwp
      report: true              # report.md / report.json
      plots: true               # PNGs (skipped with a note when matplotlib is missing)
      recalibrate_bn: 0         # BatchNorm statistics re-estimated on this many batches
      latency: true             # time the deployable model on this machine's CPU

``load_recipe`` / ``resolve`` return the *resolved* recipe: a plain nested dict with every
default filled in, which the runner writes back as ``recipe.yaml``. Every bad value raises
``RecipeError`` (a ``ConfigError``) with one line naming the field, the value and what is
allowed; infinite and NaN numbers are refused anywhere. Recipes are data: models, data sets and
methods are names in registries, never code (your own are registered by a ``--plugin`` file,
see ``hwprune.app.plugins``); method parameters are checked against the method's own
signature here and by the method's constructor in the runner, still before any output is
written.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["RecipeError", "load_recipe", "resolve", "apply_overrides", "method_class",
           "resolve_method", "method_kwargs", "shipped_recipes", "find_recipe",
           "read_recipe_text", "dump"]


class RecipeError(ConfigError):
    """A recipe field is unknown, of the wrong type, or outside its allowed values."""


# -- YAML --------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """Safe YAML, plus floats without a dot (``1e-3``), which YAML 1.1 reads as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None


def dump(cfg: Mapping[str, Any]) -> str:
    """The resolved recipe as YAML text (keys in schema order)."""
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)


# -- the schema ----------------------------------------------------------------------------------
class _Field:
    """One leaf: allowed types, default, and an optional check returning an error or None."""

    def __init__(self, types: tuple[type, ...], default: Any, allowed: str,
                 check: Callable[[Any], bool] | None = None, required: bool = False):
        self.types, self.default, self.allowed = types, default, allowed
        self.check, self.required = check, required

    def validate(self, path: str, value: Any) -> Any:
        if value is None and type(None) in self.types:
            return None
        ok_type = isinstance(value, self.types) and not (
            isinstance(value, bool) and bool not in self.types)
        if float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value, ok_type = float(value), True
        if not ok_type or (self.check is not None and not self.check(value)):
            raise RecipeError(f"recipe field {path}: got {value!r} ({type(value).__name__}); "
                              f"allowed: {self.allowed}")
        return value


_NONE = type(None)


#: the largest integer torch's int64 holds: every count field is bounded by it
INT_MAX = 2**63 - 1
#: seeds also go to numpy and scikit-learn, which take 32-bit seeds
SEED_MAX = 2**32 - 1


def _int(low: int, default: Any, none: bool = False, high: int = INT_MAX) -> _Field:
    allowed = f"an integer >= {low} and <= {high}" + (" or null" if none else "")
    return _Field((int, _NONE) if none else (int,), default, allowed,
                  lambda v: low <= v <= high)


def _pos(default: Any, none: bool = False) -> _Field:
    allowed = "a number > 0" + (" or null" if none else "")
    return _Field((float, _NONE) if none else (float,), default, allowed, lambda v: v > 0)


def _choice(options: tuple[str, ...], default: str) -> _Field:
    return _Field((str,), default, f"one of {', '.join(options)}", lambda v: v in options)


def _bool(default: bool) -> _Field:
    return _Field((bool,), default, "true or false")


def _str(default: Any, none: bool = True, allowed: str = "a string") -> _Field:
    return _Field((str, _NONE) if none else (str,), default, allowed + (" or null" if none else ""))


OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")

SCHEMA: dict[str, Any] = {
    "name": _str(None, allowed="a run name"),
    "seed": _int(0, 0, high=SEED_MAX),
    "model": {
        "name": _Field((str,), None, "a registered model name (hwprune.models.MODELS)",
                       required=True),
        "args": _Field((dict,), {}, "a mapping of factory keyword arguments"),
        "pretrained": _str(None, allowed="a checkpoint path"),
    },
    "data": {
        "name": _str("digits", none=False, allowed="a data set name"),
        "dir": _str(None, allowed="a folder (default: $HWPRUNE_DATA_DIR)"),
        "train_subset": _int(1, None, none=True),
        "test_subset": _int(1, None, none=True),
        "augment": _bool(False),
        "seq_len": _int(2, 128),
    },
    "optimizer": {
        "name": _choice(OPTIMIZERS, "sgd"),
        "lr": _pos(0.05),
        "momentum": _Field((float,), 0.9, "a number in [0, 1)", lambda v: 0 <= v < 1),
        "weight_decay": _Field((float,), 5e-4, "a number >= 0", lambda v: v >= 0),
        "nesterov": _bool(False),
        "lr_schedule": _choice(LR_SCHEDULES, "cosine"),
        "milestones": _Field((list,), [], "a list of epochs (integers >= 1)",
                             lambda v: all(isinstance(e, int) and not isinstance(e, bool)
                                           and e >= 1 for e in v)),
        "gamma": _Field((float,), 0.1, "a number in (0, 1]", lambda v: 0 < v <= 1),
        "finetune_lr": _pos(None, none=True),
    },
    "train": {
        "dense_epochs": _int(0, 0),
        "prune_epochs": _int(0, 5),
        "finetune_epochs": _int(0, 0),
        "phase_hook": _Field((str, _NONE), "fix_pattern", "a public pruner method name or null",
                             lambda v: v.isidentifier() and not v.startswith("_")),
        "batch_size": _int(1, 64),
        "eval_batch_size": _int(1, 512),
        "steps_per_epoch": _int(1, None, none=True),
    },
    "end": {
        "finalize": _bool(True),
        "shrink": _bool(False),
        "fold_batchnorm": _bool(False),
        "save": _bool(True),
        "report": _bool(True),
        "plots": _bool(True),
        "recalibrate_bn": _int(0, 0),
        "latency": _bool(True),
    },
}
#: ``method`` is open-ended (its keys are the method's parameters): checked separately
METHOD_KEY = "method"
_ORDER = ["name", "seed", "model", "data", METHOD_KEY, "optimizer", "train", "end"]


def _resolve_section(spec: Mapping[str, Any], given: Any, path: str) -> dict[str, Any]:
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise RecipeError(f"recipe field {path}: got {given!r} ({type(given).__name__}); "
                          "allowed: a mapping")
    for key in given:
        if key not in spec:
            raise RecipeError(f"recipe field {path}.{key}: unknown key; allowed: "
                              f"{', '.join(spec)}")
    out = {}
    for key, field in spec.items():
        sub = f"{path}.{key}"
        if isinstance(field, dict):
            out[key] = _resolve_section(field, given.get(key), sub)
        elif key not in given:
            if field.required:
                raise RecipeError(f"recipe field {sub}: missing; allowed: {field.allowed}")
            out[key] = copy.deepcopy(field.default)
        else:
            out[key] = field.validate(sub, given[key])
    return out


# -- methods ------------------------------------------------------------------------------------
def _method_names() -> str:
    from ..methods import all_methods

    return ", ".join(sorted(spec.name for spec in all_methods()))


def method_class(name: str) -> type:
    """The registered method class called ``name`` (case-insensitive; see
    ``hwprune.methods.all_methods``)."""
    from ..methods import get_method

    try:
        return get_method(str(name)).cls
    except ConfigError:
        raise RecipeError(f"recipe field method.name: got {name!r}; allowed: {_method_names()}, "
                          "or method: null (no pruning)") from None


def _method_params(cls: type) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    for skip in ("self", "model"):
        params.pop(skip, None)
    return {k: p for k, p in params.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def resolve_method(given: Any) -> dict[str, Any] | None:
    """A recipe's ``method`` section checked against the method's signature: a name or a
    mapping with ``name:`` and parameters; ``None`` stays ``None`` (a dense run)."""
    if given is None:
        return None
    if isinstance(given, str):
        given = {"name": given}
    if not isinstance(given, Mapping):
        raise RecipeError(f"recipe field method: got {given!r} ({type(given).__name__}); "
                          "allowed: a mapping with name: and the method's parameters, or null")
    if "name" not in given:
        raise RecipeError("recipe field method.name: missing; allowed: a method class name "
                          f"({_method_names()})")
    cls = method_class(given["name"])
    params = _method_params(cls)
    for key in given:
        if key != "name" and key not in params:
            raise RecipeError(f"recipe field method.{key}: unknown parameter of {cls.__name__}; "
                              f"allowed: {', '.join(params)}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in given]
    if missing:
        raise RecipeError(f"recipe field method.{missing[0]}: missing; {cls.__name__} requires "
                          f"{', '.join(missing)}")
    return {"name": cls.__name__, **{k: v for k, v in given.items() if k != "name"}}


def method_kwargs(method: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keyword arguments of a resolved ``method`` section: YAML lists become
    tuples (``temperature: [5, 0.5]``, ``block: [4, 4]``) except ``targets`` (a list of names),
    and a ``{type: cubic, ...}`` mapping becomes a ``hwprune.schedules`` object."""
    from .. import schedules

    kinds = {"one_shot": schedules.OneShot, "oneshot": schedules.OneShot,
             "linear": schedules.Linear, "cubic": schedules.Cubic}
    out = {}
    for key, value in method.items():
        if key == "name":
            continue
        if isinstance(value, list) and key != "targets":
            value = tuple(value)
        elif isinstance(value, Mapping) and "type" in value:
            kind = kinds.get(str(value["type"]).lower())
            if kind is None:
                raise RecipeError(f"recipe field method.{key}.type: got {value['type']!r}; "
                                  f"allowed: {', '.join(kinds)}")
            args = {k: v for k, v in value.items() if k != "type"}
            try:
                value = kind(**args)
            except TypeError as e:
                raise RecipeError(f"recipe field method.{key}: {e}") from None
            except ConfigError as e:
                raise RecipeError(f"recipe field method.{key}: {e}") from None
        out[key] = value
    return out


# -- whole recipes ------------------------------------------------------------------------------
def refuse_non_finite(value: Any, path: str) -> None:
    """A ``RecipeError`` for the first infinite or NaN number anywhere in ``value`` (YAML's
    ``.inf``, ``.nan``, or ``1e400``, which overflows to infinity): none has a meaning here."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"recipe field {path}: got {value!r}; allowed: a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            refuse_non_finite(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            refuse_non_finite(item, f"{path}[{i}]")


def _check_phase_hook(cfg: dict[str, Any]) -> None:
    """A phase hook is one the method declares (``PHASE_HOOKS``: ``fix_pattern`` for every
    method, ADMM's ``hard_project`` too); any other name is refused before training rather
    than skipped, so fine-tuning never runs with a pattern that still moves, and no other
    pruner method can be called from a recipe (``finalize`` there would end pruning
    mid-run)."""
    hook, method = cfg["train"]["phase_hook"], cfg[METHOD_KEY]
    if hook is None or method is None:
        return
    cls = method_class(method["name"])
    if hook not in cls.PHASE_HOOKS:
        raise RecipeError(f"recipe field train.phase_hook: got {hook!r}; allowed: a phase hook "
                          f"of {cls.__name__} ({', '.join(cls.PHASE_HOOKS)}) or null")


def resolve(raw: Any, name: str | None = None) -> dict[str, Any]:
    """Check a parsed recipe and fill in every default; returns the resolved recipe."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"recipe: got {type(raw).__name__}; allowed: a mapping of sections "
                          f"({', '.join(_ORDER)})")
    refuse_non_finite(raw, "")  # every section, model.args and the method's parameters too
    for key in raw:
        if key not in _ORDER:
            raise RecipeError(f"recipe field {key}: unknown key; allowed: {', '.join(_ORDER)}")
    out: dict[str, Any] = {}
    for key in _ORDER:
        if key == METHOD_KEY:
            out[key] = resolve_method(raw.get(key))
        elif isinstance(SCHEMA[key], dict):
            out[key] = _resolve_section(SCHEMA[key], raw.get(key), key)
        else:
            out[key] = SCHEMA[key].validate(key, raw[key]) if key in raw else SCHEMA[key].default
    if ":" in out["model"]["name"]:  # the old "module:callable" form imported and ran code
        raise RecipeError(f"recipe field model.name: got {out['model']['name']!r}; recipes are "
                          "data and never name code: register your model with "
                          "hwprune.models.register_model(name, factory) in a Python file, pass "
                          "it as hwprune run --plugin FILE, and name it here")
    _check_phase_hook(out)
    if out["name"] is None:
        out["name"] = name or out["model"]["name"]
    train = out["train"]
    if train["dense_epochs"] + train["prune_epochs"] + train["finetune_epochs"] < 1:
        raise RecipeError("recipe field train.prune_epochs: got 0 epochs in all; allowed: "
                          "dense_epochs + prune_epochs + finetune_epochs >= 1")
    if out["end"]["shrink"] or out["end"]["save"]:
        if not out["end"]["finalize"]:
            raise RecipeError("recipe field end.finalize: got False with shrink or save; "
                              "allowed: true (only a finalized model can be shrunk or saved)")
    if out["end"]["shrink"]:
        import hwprune
        if not callable(getattr(hwprune, "shrink", None)):
            raise RecipeError("recipe field end.shrink: got True, but this hwprune has no "
                              "hwprune.deploy.shrink; allowed: false")
    return out


def _set(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set key=value`` items (dotted keys; values parsed as YAML) to a raw recipe."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise RecipeError(f"--set {item!r}: allowed: key=value with a dotted key, "
                              "e.g. optimizer.lr=0.01")
        _set(raw, key, parse_yaml(text, f"--set {key}"))
    return raw


RECIPES_PACKAGE = "hwprune.app.recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in the package (``hwprune run NAME`` finds them)."""
    root = resources.files(RECIPES_PACKAGE)
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir()
                  if p.name.endswith(".yaml"))


def find_recipe(spec: str) -> tuple[str, str]:
    """``(text, name)`` of a recipe file path or a shipped recipe's name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return read_recipe_text(path), path.stem
    name = spec.removesuffix(".yaml")
    if "/" not in spec and name in shipped_recipes():
        return resources.files(RECIPES_PACKAGE).joinpath(f"{name}.yaml").read_text(), name
    raise RecipeError(f"recipe {spec!r}: no such file, nor a shipped recipe; shipped: "
                      f"{', '.join(shipped_recipes())}")


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file; ``RecipeError`` for a file that is not UTF-8 text."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path}: not a text file (byte {e.start} is not UTF-8); "
                          "allowed: a YAML file") from None


def load_recipe(spec: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe (a path or a shipped name), apply ``--set`` overrides, resolve it."""
    text, name = find_recipe(spec)
    raw = parse_yaml(text, f"recipe {spec}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {spec}: got {type(raw).__name__}; allowed: a mapping of "
                          f"sections ({', '.join(_ORDER)})")
    return resolve(apply_overrides(raw, overrides or []), name=name)
