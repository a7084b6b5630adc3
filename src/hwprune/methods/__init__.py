"""Pruning methods. Each is a ``Pruner`` with the same lifecycle (see ``base``)."""

from .admm import ADMM
from .base import PrunedLayer, Pruner
from .darb import DARB
from .dpp import DPP
from .magnitude import Magnitude
from .psp import PSP

__all__ = ["Pruner", "PrunedLayer", "Magnitude", "PSP", "DPP", "ADMM", "DARB"]
