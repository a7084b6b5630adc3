"""Shrink: a physically smaller model with the same function.

``shrink(model, example_inputs)`` removes the channels, filters and whole layers that are
entirely zero, following how tensors really flow: the model is traced with ``torch.fx`` and
every tensor's channel axis is labelled, position by position, with a *channel class*. Ops that
keep channels apart (BatchNorm, activations, pooling, dropout, depthwise convs, flatten) pass the
labels through; residual additions merge the labels of their operands (a channel of a residual
stream is one class across every producer and consumer); concatenation places its inputs'
labels side by side; a channel-padding op (the option-A shortcut of CIFAR ResNets) copies input
channels into output channels of their own class. Conv, Linear, Embedding and LSTM layers start
new classes.

A class is removed when every place that reads it agrees: the reading layer's weights for it are
all zero, or the channel carries a known constant (a zero filter followed by BatchNorm's shift,
say) that can be folded exactly into the reader's bias. Folding into a convolution with zero
padding is exact only for a constant of zero (at the borders the padding is not the constant),
so such channels stay. A channel that reaches the model's output, an op hwprune does not model,
or a module called more than once stays too, and the result says which and why. A residual
branch whose output is entirely constant (its last conv all zero, or its BatchNorm's scale zero)
is replaced by adding that constant; a DenseNet layer whose output channels all go is dropped
from its concatenation.

Layers are known through handlers, one per layer type (``layers`` holds torch's own); a user
teaches shrink a layer of their own with ``register_handler(MyLayer, handler)``.

The rewritten model is in eval mode (constants are folded with BatchNorm's running statistics,
so the function preserved is the inference function). Where only layers were narrowed it is an
instance of the input model's own class with the narrowed layers in place; where the graph had
to change (padding, a branch or a concatenated layer gone, a folded constant) it is a
``torch.fx.GraphModule``, whose calls cost some overhead at batch 1. Its outputs are compared
with the input model's on ``example_inputs`` before it is returned; a difference beyond
tolerance raises ``ShrinkError`` instead of returning a wrong model. The input model is never
modified.

The modules: ``pipeline`` (``shrink`` itself), ``analysis`` and ``ops`` (the channel classes of
every tensor; ``channels`` holds the classes and their union-find; ``shuffle``: channel
shuffles and chunks), ``handlers``, ``layers`` and
``registry`` (what a layer type does to channels and how it is narrowed), ``rewrite`` (the
graph surgery), ``result``; ``maps`` gives the same analysis' classes as coupled feature maps
(``feature_maps``: every weight that writes or reads each map), the groups of
``structure="map"``. ``norms`` keeps the channels a LayerNorm normalises over; ``transformer``
and ``sites`` shrink Hugging Face transformers (not traced) by their attention heads and
feed-forward neurons.
"""

from .handlers import (
    ElementwiseHandler,
    LayerCall,
    LayerHandler,
    MixingHandler,
    Narrowing,
    PerChannelHandler,
    Rebuilt,
)
from .maps import ExcludedMap, FeatureMaps, MapGroup, MapMember, feature_maps
from .pipeline import shrink
from .registry import register_handler, unregister_handler
from .result import KeptChannels, ShrinkError, ShrinkResult
from .rewrite import ChannelMap

__all__ = ["shrink", "ShrinkResult", "ShrinkError", "KeptChannels", "ChannelMap",
           "register_handler", "unregister_handler", "LayerHandler", "MixingHandler",
           "PerChannelHandler", "ElementwiseHandler", "LayerCall", "Narrowing", "Rebuilt",
           "feature_maps", "FeatureMaps", "MapGroup", "MapMember", "ExcludedMap"]
