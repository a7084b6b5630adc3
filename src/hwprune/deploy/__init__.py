"""Deployment: what is done with a finalized pattern.

``shrink`` removes what is entirely zero, ``fold_batchnorm`` folds inference BatchNorm into the
layer before it, ``to_sparse_kernels`` swaps in timed sparse kernels, ``export_model`` writes
TorchScript, ExportedProgram or ONNX.
"""

from .export import export_model
from .fold import FoldError, fold_batchnorm
from .shrink import ShrinkError, ShrinkResult, shrink
from .sparse_kernels import to_sparse_kernels

__all__ = ["shrink", "ShrinkResult", "ShrinkError", "fold_batchnorm", "FoldError",
           "to_sparse_kernels", "export_model"]
