"""Deployment: what is done with a finalized pattern.

``shrink`` removes what is entirely zero (``register_handler`` teaches it a layer type of your
own; ``feature_maps`` lists the coupled maps it removes whole), ``fold_batchnorm`` folds
inference BatchNorm into the layer before it, ``to_sparse_kernels`` swaps in timed sparse
kernels, ``export_model`` writes TorchScript, ExportedProgram or ONNX.
"""

from .export import export_model
from .fold import FoldError, fold_batchnorm
from .shrink import (
    ElementwiseHandler,
    FeatureMaps,
    LayerHandler,
    MixingHandler,
    PerChannelHandler,
    ShrinkError,
    ShrinkResult,
    feature_maps,
    register_handler,
    shrink,
    unregister_handler,
)
from .sparse_kernels import to_sparse_kernels

__all__ = ["shrink", "ShrinkResult", "ShrinkError", "feature_maps", "FeatureMaps",
           "register_handler", "unregister_handler",
           "LayerHandler", "MixingHandler", "PerChannelHandler", "ElementwiseHandler",
           "fold_batchnorm", "FoldError", "to_sparse_kernels", "export_model"]
