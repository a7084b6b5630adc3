"""hp.deploy.register_handler: shrink taught layer types of the user's own."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwprune as hp
from hwprune.deploy import (
    ElementwiseHandler,
    MixingHandler,
    PerChannelHandler,
    register_handler,
    unregister_handler,
)
from hwprune.deploy.shrink import ShrinkError, shrink
from hwprune.deploy.shrink.registry import registered_types
from hwprune.errors import ConfigError, HwpruneError

from conftest import _params

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


class ScaledConv(nn.Module):
    """A conv holding its own weight, with a gain per output channel."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.gain = nn.Parameter(torch.rand(cout) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1) * self.gain.view(1, -1, 1, 1)


class ChannelAffine(nn.Module):
    """y = gain * x + shift, per channel."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(c) + 0.5)
        self.shift = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class SoftClip(nn.Module):
    def forward(self, x):
        return torch.clamp(x, -3.0, 3.0)


class ScaledConvHandler(MixingHandler):
    def weight(self, layer):
        return layer.weight

    def narrow(self, layer, keep_in, keep_out):
        new = ScaledConv(len(keep_in), len(keep_out))
        new.weight.data = layer.weight.data[keep_out][:, keep_in].clone()
        new.gain.data = layer.gain.data[keep_out].clone()
        return new


class ChannelAffineHandler(PerChannelHandler):
    def narrow(self, layer, keep):
        new = ChannelAffine(len(keep))
        new.gain.data = layer.gain.data[keep].clone()
        new.shift.data = layer.shift.data[keep].clone()
        return new


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.affine = ChannelAffine(8)
        self.clip = SoftClip()
        self.scaled = ScaledConv(8, 6)
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c3(F.relu(self.scaled(self.clip(self.affine(self.c1(x))))))


def _net():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.scaled.weight[:, [1, 4]] = 0  # scaled ignores c1's channels 1 and 4
        net.c3.weight[:, [0, 3]] = 0  # nothing reads scaled's outputs 0 and 3
    return net


@pytest.fixture
def registered():
    """register_handler for the test; every registration is taken back afterwards."""
    before = set(registered_types())
    yield register_handler
    for t in set(registered_types()) - before:
        unregister_handler(t)
    assert set(registered_types()) == before


def _close_to_scale(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max()) <= 1e-5 * float(ya.abs().max())


def test_unknown_layers_keep_their_channels_with_a_reason():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    r = shrink(model, x, return_result=True)  # traced into: ops shrink does not model
    assert "c1" not in r.layers and "c3" not in r.layers
    assert any("does not model" in k.reason for k in r.kept)
    leaves = (ScaledConv, ChannelAffine, SoftClip)
    r = shrink(model, x, leaf_modules=leaves, return_result=True)  # called as modules
    assert not r.layers and r.params_after == r.params_before
    assert any("affine (ChannelAffine)" in k.reason and "does not model" in k.reason
               for k in r.kept)


def test_registered_layers_are_shrunk_physically(registered):
    registered(ScaledConv, ScaledConvHandler())
    registered(ChannelAffine, ChannelAffineHandler())
    registered(SoftClip, ElementwiseHandler())
    model, x = _net(), torch.randn(2, 3, 8, 8)
    r = shrink(model, x, return_result=True)
    small = r.model
    assert type(small) is Net  # only layers narrowed: the model's own class
    assert r.layers == {"c1": ((3, 8), (3, 6)), "affine": ((8, 8), (6, 6)),
                        "scaled": ((8, 6), (6, 4)), "c3": ((6, 4), (4, 4))}
    assert isinstance(small.scaled, ScaledConv) and small.scaled.weight.shape == (4, 6, 3, 3)
    # two of c1's filters (weights and bias), their gain and shift, the scaled conv's weights
    # for two inputs and two outputs and its two gains, and two columns of c3
    expected = (2 * (3 * 9 + 1) + 2 * 2 + (8 * 6 - 6 * 4) * 9 + 2 + 2 * 4)
    assert _params(model) - _params(small) == expected
    assert _close_to_scale(model, small, torch.randn(4, 3, 8, 8))
    unregister_handler(SoftClip)  # traced into again: its clamp keeps c1's channels
    r = shrink(model, x, return_result=True)
    assert "c1" not in r.layers and r.layers["scaled"] == ((8, 6), (8, 4))
    assert any("clamp" in k.reason and "does not model" in k.reason for k in r.kept)


def test_a_handler_that_misreads_the_layer_is_refused(registered):
    class WrongWeight(ScaledConvHandler):
        def weight(self, layer):
            return layer.weight[:, :5]  # says 5 input channels; the layer has 8

    class ForgetsTheGain(ScaledConvHandler):
        def narrow(self, layer, keep_in, keep_out):
            new = super().narrow(layer, keep_in, keep_out)
            new.gain.data.fill_(1.0)
            return new

    class WrongSize(ScaledConvHandler):
        def narrow(self, layer, keep_in, keep_out):
            return ScaledConv(len(keep_in) + 1, len(keep_out))

    model, x = _net(), torch.randn(2, 3, 8, 8)
    registered(ScaledConv, WrongWeight())
    with pytest.raises(ShrinkError, match=r"handler for ScaledConv \(scaled\) says 5 input"):
        shrink(model, x, leaf_modules=(ChannelAffine, SoftClip))
    registered(ScaledConv, ForgetsTheGain())  # replaces the registration
    with pytest.raises(ShrinkError, match="differs from the input model"):
        shrink(model, x, leaf_modules=(ChannelAffine, SoftClip))
    registered(ScaledConv, WrongSize())
    with pytest.raises(ShrinkError, match="fails on example_inputs"):
        shrink(model, x, leaf_modules=(ChannelAffine, SoftClip))


def test_bad_registrations_are_config_errors():
    class NoNarrow(MixingHandler):
        def weight(self, layer):
            return layer.weight

    class TextAxis(ChannelAffineHandler):
        dim = "channels"

    with pytest.raises(ConfigError, match="nn.Module subclass, got 'ScaledConv'"):
        register_handler("ScaledConv", ScaledConvHandler())
    with pytest.raises(ConfigError, match="nn.Module subclass"):
        register_handler(ScaledConv(1, 1), ScaledConvHandler())
    with pytest.raises(ConfigError, match="got the class ScaledConvHandler; pass an instance"):
        register_handler(ScaledConv, ScaledConvHandler)
    with pytest.raises(ConfigError, match="must be an instance .* got function"):
        register_handler(ScaledConv, lambda layer: layer)
    with pytest.raises(ConfigError, match="NoNarrow does not define narrow, which a "
                                          "MixingHandler needs"):
        register_handler(ScaledConv, NoNarrow())
    with pytest.raises(ConfigError, match=r"TextAxis.dim must be an int channel axis"):
        register_handler(ChannelAffine, TextAxis())
    with pytest.raises(ConfigError, match="no handler is registered for"):
        unregister_handler(ScaledConv)
    assert issubclass(ConfigError, HwpruneError) and registered_types() == ()


def test_the_docs_example_runs():
    text = DOCS.read_text()
    section = text[text.index("## Teaching shrink a layer of its own"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    scope: dict = {}
    try:
        exec(compile(block, str(DOCS), "exec"), scope)
    finally:
        unregister_handler(scope["ScaledConv"])
    model, r = scope["model"], scope["r"]
    assert hp.deploy.register_handler is register_handler
    assert r.layers == {"0": ((3, 8), (3, 6)), "2": ((8, 6), (6, 4)), "4": ((6, 4), (4, 4))}
    assert (r.params_before, r.params_after) == (690, 408)  # as the block's comment says
    assert _close_to_scale(model, r.model, torch.randn(3, 3, 8, 8))
