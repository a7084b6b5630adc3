"""hwprune: hardware-constrained pruning for PyTorch.

Three independent axes: *structure* (``hwprune.structures``: how a weight is cut into groups),
*method* (``Magnitude`` and the learned methods: how the pattern is found) and *deployment*
(``finalize``, ``shrink``, ``save``: what is done with the pattern). See README.md.
"""

from . import models, schedules, structures
from .errors import (
    ConfigError,
    HwpruneError,
    LifecycleError,
    StructureError,
    TargetError,
)
from .export import export_model
from .fold import FoldError, fold_batchnorm
from .methods import ADMM, DARB, DPP, PSP, Magnitude, Pruner
from .report import Report, report
from .shrink import ShrinkError, ShrinkResult, shrink
from .sparse_kernels import to_sparse_kernels
from .storage import load, save

__version__ = "0.1.0"

__all__ = [
    "Magnitude",
    "PSP",
    "DPP",
    "ADMM",
    "DARB",
    "Pruner",
    "report",
    "shrink",
    "ShrinkResult",
    "ShrinkError",
    "fold_batchnorm",
    "FoldError",
    "to_sparse_kernels",
    "export_model",
    "save",
    "load",
    "Report",
    "models",
    "schedules",
    "structures",
    "HwpruneError",
    "StructureError",
    "TargetError",
    "ConfigError",
    "LifecycleError",
    "__version__",
]
