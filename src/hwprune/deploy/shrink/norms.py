"""LayerNorm in shrink's analysis: the rule for a norm that mixes channels.

A LayerNorm normalises over its last ``len(normalized_shape)`` axes. Where the channel axis
is among them, each output depends on every channel through the mean and the variance, so
no channel can go, not even one that is exactly zero everywhere: the mean is ``sum / n`` and
the variance ``sum of squares / n``, and a LayerNorm over ``n - 1`` channels divides by
``n - 1`` (the statistics of the others change, and with them every output). Nor is the
normalised zero channel zero: it is ``(0 - mean) / std * weight + bias``, which varies. A zero
channel could go only if nothing reads its output (or its scale is zero) *and* the narrowed
norm kept dividing by the original ``n``, which ``nn.LayerNorm`` cannot. Such channels
are kept with that reason, and the output's channels are new classes that stay too. Where the
channel axis is not normalised (a LayerNorm over the time axis of ``(N, C, T)``), each
channel is normalised on its own and its class passes through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .channels import ChannelInfo, unknown
from .handlers import LayerCall, LayerHandler

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["LayerNormHandler"]


class LayerNormHandler(LayerHandler):
    """nn.LayerNorm: keeps the channels it normalises over (module docstring)."""

    def analyse(self, call: LayerCall, an: Analysis) -> ChannelInfo | None:
        info, shape = call.info, call.out_shape()
        if info is None or shape is None:
            return None
        normalised = range(len(shape) - len(call.layer.normalized_shape), len(shape))
        if info.dim not in normalised:
            return ChannelInfo(info.dim, info.slots, unknown(len(info.slots)))
        reason = (f"{call.name} (LayerNorm) normalises over the channel axis: removing a "
                  "channel, even an all-zero one, changes the mean and variance of the others")
        an.pin_all(call.x, reason)
        out = an.fresh(info.dim, len(info.slots))
        for s in out.slots:
            an.classes.pin(s, reason)
        return out
