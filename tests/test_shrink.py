"""hp.shrink: physically smaller models that compute the same function (eval mode)."""

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hwprune as hp
from hwprune.deploy.shrink import ShrinkError, shrink
from hwprune.models import PadShortcut, SmallCNN, densenet_bc, resnet20

from conftest import TinyLSTM, _max_diff, _params, _randomize_bn

# the modules, not the function hp.shrink that shadows the package as an attribute of
# hwprune.deploy
shrink_mod = sys.modules["hwprune.deploy.shrink"]
layers_mod = sys.modules["hwprune.deploy.shrink.layers"]


def _macs(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("option", ["A", "B"])
def test_resnet_channels_and_a_whole_block(option):
    torch.manual_seed(0)
    model = _randomize_bn(resnet20(shortcut=option))
    x = torch.randn(2, 3, 16, 16)
    removed_params, removed_macs = 0, 0
    with torch.no_grad():
        for i, block in enumerate([*model.layer1, *model.layer2, *model.layer3]):
            if i == 4:  # layer2.1: its last conv all zero, the whole branch goes
                block.conv2.weight.zero_()
                c1, c2 = block.conv1.weight, block.conv2.weight
                removed_params += c1.numel() + c2.numel() + 4 * c1.shape[0]
                removed_macs += (c1.numel() + c2.numel()) * 8 * 8
                continue
            # conv2 ignores some of conv1's channels: conv1's filter and BN entry go too
            drop = torch.randperm(block.conv2.in_channels)[: 1 + i % 5]
            block.conv2.weight[:, drop] = 0
            hw = (16 >> (i // 3)) ** 2  # both convs run at the stage's resolution
            per = block.conv1.weight[0].numel() + block.conv2.weight[:, 0].numel()
            removed_params += len(drop) * (per + 2)
            removed_macs += len(drop) * per * hw
    r = shrink(model, x, return_result=True)
    small = r.model
    assert _max_diff(model, small, torch.randn(3, 3, 16, 16)) < 1e-4
    assert _params(model) - _params(small) == removed_params
    assert _macs(model, x) - _macs(small, x) == removed_macs * len(x)
    assert r.branches == ["layer2.1.bn2"]
    assert "layer2.1.conv1" not in dict(small.named_modules())
    assert isinstance(small, torch.fx.GraphModule)  # a branch gone: the graph was rewritten


def test_constant_channel_into_padded_conv_stays_with_reason():
    torch.manual_seed(0)
    model = _randomize_bn(resnet20())
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[:2] = 0
        block.bn1.bias[0] = 0.5  # relu(const) = 0.5 enters a 3x3 conv with zero padding
        block.bn1.bias[1] = -5.0  # relu(const) = 0: exact to remove
        block.bn1.weight[:2] = 1.0
    r = shrink(model, torch.randn(2, 3, 16, 16), return_result=True)
    assert r.layers["layer1.0.conv1"][1] == (16, 15)
    kept = [k for k in r.kept if k.where == "layer1.0.conv1"]
    assert kept and kept[0].channels == [0] and "zero-padded conv" in kept[0].reason
    assert _max_diff(model, r.model, torch.randn(2, 3, 16, 16)) < 1e-4


def _option_a_net():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.pad = PadShortcut(4)
            self.c = nn.Conv2d(16, 5, 1)

        def forward(self, x):
            return self.c(F.relu(self.pad(F.relu(self.a(x))) + self.b(x)))

    torch.manual_seed(0)
    return Net().eval()


def test_option_a_pad_keeps_the_channel_order():
    model = _option_a_net()
    with torch.no_grad():
        model.a.weight[1] = 0
        model.a.bias[1] = -1.0  # relu(-1) = 0: this channel of the shortcut is zero
        model.b.weight[[0, 15]] = 0  # the padded channels 0 and 15: all zero, unused by c
        model.b.bias[[0, 15]] = 0
        model.c.weight[:, [0, 15]] = 0
    x = torch.randn(2, 3, 8, 8)
    r = shrink(model, x, return_result=True)
    assert r.layers["a"][1] == (3, 7)
    assert r.layers["b"][1] == (3, 14) and r.layers["c"][1] == (14, 5)
    assert _max_diff(model, r.model, torch.randn(4, 3, 8, 8)) < 1e-5
    # stream channel 5 (a's channel 1) stays, fed zero by the new channel map
    assert any(isinstance(m, shrink_mod.ChannelMap) for m in r.model.modules())


def test_option_a_pad_contiguous_stays_a_pad():
    model = _option_a_net()
    with torch.no_grad():
        model.b.weight[[0, 15]] = 0
        model.b.bias[[0, 15]] = 0
        model.c.weight[:, [0, 15]] = 0
    r = shrink(model, torch.randn(2, 3, 8, 8), return_result=True)
    assert r.layers["c"][1] == (14, 5)
    assert not any(isinstance(m, shrink_mod.ChannelMap) for m in r.model.modules())
    assert _max_diff(model, r.model, torch.randn(4, 3, 8, 8)) < 1e-5


def test_densenet_bc_channels_and_a_whole_layer():
    torch.manual_seed(0)
    model = _randomize_bn(densenet_bc(depth=22))
    dead = model.block1.layers[1]
    with torch.no_grad():
        dead.conv2.weight.zero_()  # its 12 new channels are zero: the layer goes
        model.block2.layers[0].conv2.weight[:, 3:7] = 0  # bottleneck channels 3..6 unused
    before = _params(model)
    small = shrink(model, torch.randn(2, 3, 16, 16))
    assert _max_diff(model, small, torch.randn(3, 3, 16, 16)) < 1e-4
    names = dict(small.named_modules())
    assert "block1.layers.1.conv1" not in names
    layer_params = sum(p.numel() for p in dead.parameters())
    # the dead layer, its 12 input channels in the next layer's BN+conv1 and in trans1's
    # BN+conv, and 4 bottleneck channels (conv1 filter 30, BN 2, conv2 column 12*9); the zero
    # channels' BN shift is a constant that the two 1x1 convs take into a new bias
    nxt, trans = model.block1.layers[2].conv1, model.trans1.conv
    expected = (layer_params + 12 * (2 + nxt.out_channels) + 12 * (2 + trans.out_channels)
                + 4 * (30 + 2 + 12 * 9) - nxt.out_channels - trans.out_channels)
    assert before - _params(small) == expected
    assert names["block1.layers.2.conv1"].in_channels == 36


def test_depthwise_separable():
    class DWNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw1 = nn.Conv2d(3, 16, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16, bias=False)  # multiplier 2
            self.bn2 = nn.BatchNorm2d(32)
            self.pw2 = nn.Conv2d(32, 8, 1)

        def forward(self, x):
            x = F.relu(self.bn1(self.pw1(x)))
            return self.pw2(F.relu6(self.bn2(self.dw(x))))

    torch.manual_seed(0)
    model = _randomize_bn(DWNet())
    with torch.no_grad():
        model.pw2.weight[:, [4, 5, 10]] = 0  # dw outputs 4, 5 (input 2) and 10 (input 5)
    r = shrink(model, torch.randn(2, 3, 8, 8), return_result=True)
    # input channel 2 and both of its outputs go; output 10 alone cannot leave its group
    assert r.layers["pw1"][1] == (3, 15)
    assert r.layers["dw"][1] == (15, 30)
    assert r.model.get_submodule("dw").groups == 15
    assert _max_diff(model, r.model, torch.randn(4, 3, 8, 8)) < 1e-4
    assert _params(model) - _params(r.model) == 3 + 2 + 2 * 9 + 2 * 2 + 2 * 8


def test_flatten_into_linear_folds_the_constant():
    torch.manual_seed(0)
    model = _randomize_bn(SmallCNN(width=8))
    with torch.no_grad():
        model.conv3[0].weight[[1, 6]] = 0  # BN shift -> relu -> constant per channel
        model.conv3[1].bias[[1, 6]] = torch.tensor([0.7, 0.2])
    x = torch.randn(5, 1, 8, 8)
    r = shrink(model, x, return_result=True)
    assert r.layers["fc1"] == ((16 * 16, 64), (14 * 16, 64))
    assert "fc1" in r.folded
    assert _max_diff(model, r.model, torch.randn(7, 1, 8, 8)) < 1e-4
    assert _params(model) - _params(r.model) == 2 * (16 * 9 + 2 + 16 * 64)


def test_a_compiled_model_is_refused_with_what_to_shrink_instead():
    torch.manual_seed(0)
    model = _randomize_bn(SmallCNN(width=8)).eval()
    with warnings.catch_warnings():  # importing torch's compiler warns of torch.jit's end
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(model)  # no forward: nothing is compiled here
    with warnings.catch_warnings():  # the default targets find the output through the wrapper
        warnings.simplefilter("error")
        pruner = hp.Magnitude(compiled, "channel", 0.5)
    assert "_orig_mod.fc2.weight" not in pruner.layers and "_orig_mod.fc1.weight" in pruner.layers
    pruner.finalize()  # the pruner reaches the wrapped model
    x = torch.randn(3, 1, 8, 8)
    for deploy in (shrink, hp.fold_batchnorm):  # before any forward pass would compile it
        with pytest.raises(hp.HwpruneError, match=r"torch\.compile's wrapper.*_orig_mod"):
            deploy(compiled, x)
    small = shrink(compiled._orig_mod, x)
    assert _params(small) < _params(model) and _max_diff(model, small, x) < 1e-4


def test_lstm_input_features():
    torch.manual_seed(0)
    model = TinyLSTM().eval()  # emb 20x8, 2-layer LSTM 8->16, head 16->20
    with torch.no_grad():
        model.lstm.weight_ih_l0[:, [0, 3, 7]] = 0
    x = torch.randint(0, 20, (3, 6))
    r = shrink(model, x, return_result=True)
    assert r.layers["emb"][1] == (20, 5) and r.layers["lstm"][1] == (5, 16)
    assert _params(model) - _params(r.model) == 3 * (20 + 4 * 16)
    assert _max_diff(model, r.model, torch.randint(0, 20, (2, 9))) < 1e-5


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean((1, 2, 3), keepdim=True))


def _custom_net(leaf):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = leaf
            self.c2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c2(self.gate(self.c1(x)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.c2.weight[:, :3] = 0
    return net


def test_unsupported_custom_op_keeps_channels_with_a_message():
    model = _custom_net(Gate())
    x = torch.randn(2, 3, 8, 8)
    r = shrink(model, x, leaf_modules=(Gate,), return_result=True)
    assert "c1" not in r.layers  # nothing removed: the gate mixes channels (a mean over them)
    assert any("gate" in k.reason and "does not model" in k.reason for k in r.kept)
    assert _max_diff(model, r.model, x) == 0
    # traced through, the channel mean is an op shrink does not model either
    r2 = shrink(model, x, return_result=True)
    assert "c1" not in r2.layers and any("mean" in k.reason for k in r2.kept)


def test_narrowed_layers_come_back_in_the_models_own_class():
    model = _randomize_bn(SmallCNN(width=8))
    with torch.no_grad():
        model.conv3[0].weight[1] = 0  # its BatchNorm shift is a constant: folded downstream
        model.conv3[1].bias[1] = 0.7
    x = torch.randn(4, 1, 8, 8)
    r = shrink(model, x, return_result=True)
    assert type(r.model) is SmallCNN and r.folded
    assert r.model.conv3[0].out_channels == 15 and r.params_after < r.params_before
    assert _max_diff(model, r.model, torch.randn(5, 1, 8, 8)) < 1e-4
    # nothing to remove: the same class, computing bit for bit what the input model computes
    dense = _randomize_bn(SmallCNN(width=8), seed=1)
    same = shrink(dense, x)
    assert type(same) is SmallCNN and same is not dense
    with torch.no_grad():
        assert torch.equal(same(x), dense(x))


def test_wrong_result_is_refused(monkeypatch):
    model = SmallCNN(width=8).eval()
    _randomize_bn(model)
    with torch.no_grad():
        model.conv3[0].weight[1] = 0
        model.conv3[1].bias[1] = 0.7
    monkeypatch.setattr(layers_mod, "set_bias", lambda *a: None)  # forget the fold
    with pytest.raises(ShrinkError, match="differs from the input model"):
        shrink(model, torch.randn(4, 1, 8, 8))


def test_input_model_untouched_and_bad_input():
    model = SmallCNN(width=8).train()
    with torch.no_grad():
        model.fc1.weight[:, :16] = 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shrink(model, torch.randn(2, 1, 8, 8))
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ShrinkError, match="tensor"):
        shrink(model, [1, 2])

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ShrinkError, match="cannot trace"):
        shrink(Branchy(), torch.randn(2))


def test_magnitude_channel_then_shrink_matches_report():
    torch.manual_seed(0)
    model = _randomize_bn(resnet20())
    pruner = hp.Magnitude(model, "channel", 0.5, targets="layer*.conv2")
    pruned = pruner.finalize().eval()
    x = torch.randn(2, 3, 16, 16)
    small = shrink(pruned, x)
    # every block's conv2 kept 8/16/32 input channels, so conv1 kept as many filters
    for name, m in small.named_modules():
        if name.endswith("conv2"):
            assert m.in_channels == pruned.get_submodule(name).in_channels // 2
    assert _max_diff(pruned, small, torch.randn(2, 3, 16, 16)) < 1e-4


@settings(max_examples=12, deadline=None)
@given(st.lists(st.booleans(), min_size=12, max_size=12), st.integers(1, 3),
       st.sampled_from([0, 1]))
def test_property_channel_counts(zero, batch, padding):
    """Every channel that conv2 does not read goes, every other stays; function unchanged."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 12, 3, padding=padding), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 4, 3, padding=1), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 2, 6, 6))
    _randomize_bn(model)
    with torch.no_grad():
        model[3].weight[:, torch.tensor(zero)] = 0
    small = shrink(model, torch.randn(batch, 2, 6, 6))
    assert small.get_submodule("0").out_channels == max(1, 12 - sum(zero))
    assert small.get_submodule("3").in_channels == max(1, 12 - sum(zero))
    assert _max_diff(model, small, torch.randn(2, 2, 6, 6)) < 1e-4


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.data())
def test_property_grouped_conv_loses_whole_stripes(groups, data):
    """A grouped conv's input channel goes when it is zero in every group (a stripe), and so
    does an output channel whose filter is zero in every group; a zero in one group only
    stays; the groups stay equal and the function unchanged."""
    per = 12 // groups
    zero = data.draw(st.lists(st.booleans(), min_size=per, max_size=per).filter(
        lambda z: not all(z)))
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 12, 3, padding=1, groups=groups), nn.BatchNorm2d(12),
                          nn.ReLU(), nn.Conv2d(12, 4, 1))
    _randomize_bn(model)
    with torch.no_grad():
        model[3].weight[:, torch.tensor(zero)] = 0
        partial = zero.index(False)
        model[3].weight[:12 // groups, partial] = 0  # the first group's rows only
        model[3].weight[0] = 0  # filter 0 of the first group only: it stays
        model[3].weight[1::per] = 0  # filter 1 of every group: a constant stripe, folded
    small = shrink(model, torch.randn(1, 2, 6, 6))
    g = small.get_submodule("3")
    assert g.groups == groups
    assert g.in_channels == groups * (per - sum(zero))
    assert small.get_submodule("0").out_channels == g.in_channels
    assert g.out_channels == 12 - groups and small.get_submodule("6").in_channels == 12 - groups
    assert _max_diff(model, small, torch.randn(2, 2, 6, 6)) < 1e-4
