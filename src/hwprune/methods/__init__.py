"""Pruning methods. Each is a ``Pruner`` with the same lifecycle (see ``base``) that registers
itself (see ``registry``); ``checks`` holds the contract every method passes."""

import importlib
import pkgutil

from .base import PrunedLayer, Pruner
from .registry import MethodSpec, all_methods, get_method, register_method, unregister_method

# Every module of this package is imported, so a new method's module registers itself with
# no list to edit. The built-ins come first, in the order listings show them (baseline first);
# `checks` is a test helper, imported only when used.
_LISTED_FIRST = ("magnitude", "psp", "dpp", "admm", "darb")
_NOT_METHODS = ("checks",)
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: (
        _LISTED_FIRST.index(m.name) if m.name in _LISTED_FIRST else len(_LISTED_FIRST), m.name)):
    if _module.name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_module.name}")

from .admm import ADMM  # noqa: E402 (after the ordered imports above)
from .darb import DARB  # noqa: E402
from .dpp import DPP  # noqa: E402
from .magnitude import Magnitude  # noqa: E402
from .psp import PSP  # noqa: E402

__all__ = ["Pruner", "PrunedLayer", "Magnitude", "PSP", "DPP", "ADMM", "DARB", "MethodSpec",
           "all_methods", "get_method", "register_method", "unregister_method"]
