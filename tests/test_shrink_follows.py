"""Shrink's analysis follows permutes, layer-scale and squeeze-excitation multiplies and ops
that are the identity in eval mode, and names the op that stops it where one does."""

import torch
import torch.fx
from torch import nn

import hwprune as hp


def stochastic_depth(x, p: float, training: bool):
    """Drops whole samples in training (as torchvision's, wrapped so fx does not trace it)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= p
    return x * keep / (1 - p)


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p=0.2):
        super().__init__()
        self.p = p

    def forward(self, x):
        return stochastic_depth(x, self.p, self.training)


class DropPath(nn.Module):
    """A drop path with Python control flow; called as a leaf module it is one opaque call."""

    def forward(self, x):
        if not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1, 1, 1) > 0.1)


def _zero_filters(conv, idx, bias=True):
    with torch.no_grad():
        conv.weight[idx] = 0
        if bias and conv.bias is not None:
            conv.bias[idx] = 0


def _close(a, b, x):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max()) <= 1e-5 * float(ya.abs().max())


class PermuteNet(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.c1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 6)
        self.c2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.c1(x).relu()
        x = torch.permute(x, (0, 2, 3, 1)) if self.functional else x.permute(0, 2, 3, 1)
        x = self.fc(x)
        return self.c2(x.permute(0, 3, 1, 2))


def test_permute_moves_the_channel_axis():
    for functional in (True, False):
        torch.manual_seed(0)
        model = PermuteNet(functional).eval()
        _zero_filters(model.c1, [0, 2, 5, 7], bias=False)  # constant channels: relu(bias)
        with torch.no_grad():
            model.fc.weight[[1, 4]] = 0
        x = torch.randn(2, 3, 8, 8)
        r = hp.shrink(model, x, return_result=True)
        assert r.layers == {"c1": ((3, 8), (3, 4)), "fc": ((8, 6), (4, 4)),
                            "c2": ((6, 4), (4, 4))}
        assert "fc" in r.folded  # the removed constants went into fc's bias through the permute
        assert _close(model, r.model, torch.randn(3, 3, 8, 8))


class LayerScaleNet(nn.Module):
    def __init__(self, channels_last):
        super().__init__()
        self.channels_last = channels_last
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5 if channels_last else torch.rand(8, 1, 1))
        self.fc, self.c2 = nn.Linear(8, 4), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.c1(x).relu()
        if self.channels_last:
            return self.fc(x.permute(0, 2, 3, 1) * self.gamma)
        return self.c2(self.gamma * x)


def test_a_layer_scale_is_narrowed_with_its_channels():
    for channels_last, consumer in ((True, "fc"), (False, "c2")):
        torch.manual_seed(0)
        model = LayerScaleNet(channels_last).eval()
        _zero_filters(model.c1, [0, 3])
        with torch.no_grad():
            model.gamma[[5, 6]] = 0  # a zero scale makes its channel zero, whatever c1 writes
        x = torch.randn(2, 3, 8, 8)
        r = hp.shrink(model, x, return_result=True)
        assert r.layers["c1"] == ((3, 8), (3, 4))
        assert r.layers[consumer] == ((8, 4), (4, 4))
        assert r.model.gamma.shape[0] == 4 and bool(r.model.gamma.ne(0).all())
        assert _close(model, r.model, torch.randn(3, 3, 8, 8))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.se1, self.se2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.c1(x).relu()
        s = torch.sigmoid(self.se2(self.se1(self.pool(x)).relu()))
        return self.c2(x * s)


def test_a_squeeze_excitation_gate_goes_with_its_channels():
    torch.manual_seed(0)
    model = SENet().eval()
    _zero_filters(model.c1, [1, 2, 4, 6])
    x = torch.randn(2, 3, 8, 8)
    r = hp.shrink(model, x, return_result=True)
    assert r.layers == {"c1": ((3, 8), (3, 4)), "se1": ((8, 2), (4, 2)),
                        "se2": ((2, 8), (2, 4)), "c2": ((8, 4), (4, 4))}
    assert _close(model, r.model, torch.randn(3, 3, 8, 8))


def test_a_squeeze_excitation_pruned_by_magnitude_shrinks():
    torch.manual_seed(0)
    model = SENet()
    pruner = hp.Magnitude(model, "filter", 0.5, targets=["c1"])
    pruner.finalize()
    x = torch.randn(2, 3, 8, 8)
    r = hp.shrink(model.eval(), x, return_result=True)
    # zeroed filters whose bias is not positive are zero after the relu: they go, gate and all
    kept = r.layers["c1"][1][1]
    assert kept < 8 and r.layers["se2"] == ((2, 8), (2, kept))
    assert _close(model, r.model, torch.randn(3, 3, 8, 8))


class DepthNet(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.c1, self.drop, self.c2 = nn.Conv2d(3, 8, 3, padding=1), drop, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.drop(self.c1(x).relu()))


def test_ops_that_are_the_identity_in_eval_do_not_stop_the_analysis():
    for drop, leaves in ((StochasticDepth(), ()), (DropPath(), (DropPath,)),
                         (nn.Dropout(0.3), ())):
        torch.manual_seed(0)
        model = DepthNet(drop).eval()
        _zero_filters(model.c1, [0, 1, 2])
        x = torch.randn(2, 3, 8, 8)
        r = hp.shrink(model, x, leaf_modules=leaves, return_result=True)
        assert r.layers == {"c1": ((3, 8), (3, 5)), "c2": ((8, 4), (5, 4))}, type(drop)
        assert _close(model, r.model, torch.randn(3, 3, 8, 8))


class RollThenDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.dw = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.dw(torch.roll(self.c1(x), 1, -1)))


def test_a_depthwise_conv_after_an_op_not_followed_names_that_op():
    torch.manual_seed(0)
    model = RollThenDepthwise().eval()
    _zero_filters(model.dw, [0, 1])
    r = hp.shrink(model, torch.randn(2, 3, 8, 8), return_result=True)
    reasons = [k.reason for k in r.kept if k.where == "dw"]
    assert reasons and all("roll" in why and "not followed" in why for why in reasons)
    assert not any("grouped conv" in k.reason for k in r.kept)


class Block(nn.Module):
    """A ConvNeXt block: depthwise conv, channels-last LayerNorm and MLP, layer scale."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.drop = StochasticDepth()

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        return x + self.drop(y.permute(0, 3, 1, 2))


class ConvNeXtLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2 = nn.Conv2d(3, 8, 2, stride=2), Block(8), Block(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def test_convnext_keeps_its_stream_for_the_layernorm_and_shrinks_the_mlp():
    torch.manual_seed(0)
    model = ConvNeXtLike().eval()
    _zero_filters(model.b2.dw, [0, 1])
    with torch.no_grad():
        for b in (model.b1, model.b2):
            b.fc1.weight[:16] = 0  # half of each MLP's hidden units: constant gelu(bias)
    x = torch.randn(2, 3, 16, 16)
    r = hp.shrink(model, x, return_result=True)
    assert r.layers["b1.fc2"] == ((32, 8), (16, 8)) and r.layers["b2.fc2"] == ((32, 8), (16, 8))
    # b2.dw's zero filters are channels of the residual stream (a depthwise conv passes its
    # classes on), listed once where the stream starts, with the real cause: the LayerNorm
    stream = [k.reason for k in r.kept if k.where == "stem"]
    assert stream and all("LayerNorm" in why for why in stream)
    assert not any("grouped conv" in k.reason for k in r.kept)
    assert _close(model, r.model, torch.randn(3, 3, 16, 16))
