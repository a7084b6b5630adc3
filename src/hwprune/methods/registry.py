"""The registry of pruning methods: every method class, what it supports, and where it lives.

A method registers itself in its own module::

    @register_method(
        configs={"channel": {"structure": "channel", "sparsity": 0.5}},  # tiny test settings
        bad_settings=({"sparsity": 1.5},),   # each must raise a HwpruneError
        recipe="mymethod-digits",            # its shipped recipe (``hwprune demo`` runs it)
        doc="mymethod.md",                   # its page under docs/
    )
    class MyMethod(Pruner): ...

Everything that lists methods reads this registry: recipes (``method: {name: ...}``), the
demo, the command line's help, the conformance tests (``hwprune.methods.checks``) and the
docs index test. ``hwprune.methods`` imports every module of its package, so a new module
there registers itself without any central list being edited.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["MethodSpec", "register_method", "unregister_method", "all_methods", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        cls: the ``Pruner`` subclass.
        name: the class name: the method's name in recipes and listings (looked up
            case-insensitively).
        configs: ``{structure label: constructor keyword arguments}``, one tiny configuration
            per supported structure that prunes something within a few steps on a small
            model (the conformance tests train with them). The labels are the structures the
            method supports.
        structure_arg: the constructor argument that takes the structure (``None`` where the
            method has a fixed one), so tests can hand it structures it must refuse.
        bad_settings: keyword overrides of the first configuration that must each raise a
            ``HwpruneError`` at construction (a bad numeric setting, ...).
        recipe: the shipped recipe that runs the method on bundled data (``None`` for a
            method registered at run time, outside the package).
        doc: its page under ``docs/`` (``None`` likewise).
        epochs_arg: the constructor argument that takes the length of the pruning run in
            epochs (DPP: ``anneal_epochs``); the runner fills it with the recipe's
            ``train.prune_epochs`` where the recipe leaves it out (``None``: none).
        steps_arg: likewise in optimizer steps (ADMM: ``admm_steps``): the runner fills it
            with ``train.prune_epochs`` times the steps of an epoch.
    """

    cls: type
    name: str
    configs: Mapping[str, Mapping[str, Any]]
    structure_arg: str | None = "structure"
    bad_settings: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    recipe: str | None = None
    doc: str | None = None
    epochs_arg: str | None = None
    steps_arg: str | None = None

    @property
    def structures(self) -> tuple[str, ...]:
        """The structures the method supports (the labels of ``configs``)."""
        return tuple(self.configs)

    def config(self, structure: str) -> dict[str, Any]:
        """A fresh copy of the tiny configuration for ``structure``."""
        if structure not in self.configs:
            raise ConfigError(f"{self.name} has no configuration for structure {structure!r}; "
                              f"it supports {', '.join(self.structures)}")
        return dict(self.configs[structure])


_REGISTRY: dict[str, MethodSpec] = {}  # lower-case name -> spec, in registration order


def register_method(*, configs: Mapping[str, Mapping[str, Any]],
                    structure_arg: str | None = "structure",
                    bad_settings: tuple[Mapping[str, Any], ...] = (),
                    recipe: str | None = None, doc: str | None = None,
                    epochs_arg: str | None = None,
                    steps_arg: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a ``Pruner`` subclass under its class name (see
    ``MethodSpec`` for the fields). A second method of the same name (in any letter case) is
    an error; ``unregister_method`` frees the name."""
    from .base import Pruner

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Pruner)) or cls is Pruner:
            raise ConfigError(f"register_method needs a Pruner subclass; got {cls!r}")
        key = cls.__name__.lower()
        if key in _REGISTRY:
            raise ConfigError(f"a method named {key!r} is already registered "
                              f"({_REGISTRY[key].cls.__module__}.{_REGISTRY[key].cls.__name__})")
        if not configs:
            raise ConfigError(f"{cls.__name__}: configs needs at least one structure")
        _REGISTRY[key] = MethodSpec(cls=cls, name=cls.__name__,
                                    configs={k: dict(v) for k, v in configs.items()},
                                    structure_arg=structure_arg,
                                    bad_settings=tuple(dict(b) for b in bad_settings),
                                    recipe=recipe, doc=doc, epochs_arg=epochs_arg,
                                    steps_arg=steps_arg)
        return cls

    return decorate


def unregister_method(name: str) -> MethodSpec:
    """Remove the method called ``name`` from the registry; returns its spec."""
    spec = get_method(name)
    del _REGISTRY[spec.name.lower()]
    return spec


def all_methods() -> tuple[MethodSpec, ...]:
    """Every registered method, in registration order (the built-ins: baseline first)."""
    return tuple(_REGISTRY.values())


def get_method(name: str | type) -> MethodSpec:
    """The spec of the method called ``name`` (case-insensitive), or of the class ``name``."""
    if isinstance(name, type):
        for spec in _REGISTRY.values():
            if spec.cls is name:
                return spec
        raise ConfigError(f"{name.__name__} is not a registered method; decorate it with "
                          "hwprune.methods.register_method")
    spec = _REGISTRY.get(str(name).lower())
    if spec is None:
        raise ConfigError(f"unknown method {name!r}; registered: "
                          f"{', '.join(s.name for s in _REGISTRY.values())}")
    return spec
