"""hwprune: hardware-constrained pruning for PyTorch.

Three independent axes: *structure* (``hwprune.structures``: how a weight is cut into groups),
*method* (``Magnitude`` and the learned methods: how the pattern is found) and *deployment*
(``finalize``, ``shrink``, ``save``: what is done with the pattern). See README.md.
"""

from . import deploy, models, schedules, structures
from .deploy import (
    FoldError,
    ShrinkError,
    ShrinkResult,
    export_model,
    fold_batchnorm,
    shrink,
    to_sparse_kernels,
)
from .errors import (
    ConfigError,
    HwpruneError,
    LifecycleError,
    StructureError,
    TargetError,
)
from .methods import ADMM, DARB, DPP, PSP, Magnitude, Pruner

# `hp.report` is the function; the package of the same name stays importable as
# `from hwprune.report import plots`.
from .report import Report, report
from .storage import load, save
from .targets import SkippedLayersWarning

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
    "deploy",
    "HwpruneError",
    "StructureError",
    "TargetError",
    "ConfigError",
    "LifecycleError",
    "SkippedLayersWarning",
    "__version__",
]
