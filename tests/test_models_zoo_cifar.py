"""CIFAR DenseNet / DenseNet-BC and VGG-16: shapes, parameter counts, fx tracing, errors."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.models import (
    MODELS,
    VGG,
    DenseBlock,
    DenseLayer,
    DenseNet,
    densenet40,
    densenet_bc,
    densenet_bc100,
    densenet_cifar,
    get_model,
    vgg16_cifar,
)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _n_cats(gm: torch.fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes if node.target is torch.cat)


# --------------------------------------------------------------------------------- DenseNet


@pytest.mark.parametrize(
    ("factory", "paper", "exact"),
    [(densenet40, 1.0e6, 1_019_722), (densenet_bc100, 0.8e6, 769_162)],
)
def test_densenet_param_counts_match_paper_table2(factory, paper, exact) -> None:
    # Huang et al. (2017) Table 2 gives 1.0M (L=40, k=12) and 0.8M (BC, L=100, k=12), rounded.
    m = factory()
    n = _n_params(m)
    assert n == exact
    assert abs(n - paper) / paper < 0.05
    with torch.no_grad():
        assert m.eval()(_x()).shape == (2, 10)


def test_densenet_layout_plain_and_bc() -> None:
    plain = densenet40()
    assert isinstance(plain, DenseNet) and plain.conv1.out_channels == 16
    assert len(plain.block1.layers) == 12 and plain.linear.in_features == 16 + 3 * 12 * 12
    assert not hasattr(plain.block1.layers[0], "conv2")
    assert plain.block1.layers[0].conv1.kernel_size == (3, 3)
    bc = densenet_bc100(num_classes=100)
    assert bc.conv1.out_channels == 24 and len(bc.block1.layers) == 16
    layer = bc.block1.layers[0]
    assert (layer.conv1.kernel_size, layer.conv1.out_channels) == ((1, 1), 48)
    assert (layer.conv2.kernel_size, layer.conv2.out_channels) == ((3, 3), 12)
    assert bc.trans1.conv.in_channels == 24 + 16 * 12 and bc.trans1.conv.out_channels == 108
    assert bc.linear.out_features == 100


def test_compression_floors_odd_widths() -> None:
    # stem 16, +3 -> 19 -> floor(9.5) = 9, +3 -> 12 -> 6, +3 -> 9.
    m = densenet_cifar(7, growth_rate=3, compression=0.5)
    assert m.trans1.conv.out_channels == 9 and m.trans2.conv.out_channels == 6
    assert m.linear.in_features == 9
    assert m(_x()).shape == (2, 10)


@pytest.mark.parametrize("bottleneck", [False, True])
def test_tiny_densenet_shapes_and_fx_trace(bottleneck: bool) -> None:
    torch.manual_seed(0)
    m = densenet_cifar(10, growth_rate=4, bottleneck=bottleneck, num_classes=7).eval()
    x = _x()
    gm = torch.fx.symbolic_trace(m)
    # One visible cat per dense layer: 3 blocks of n layers (n = 2 plain, 1 bottleneck).
    assert _n_cats(gm) == 3 * (1 if bottleneck else 2)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 7)
        torch.testing.assert_close(gm(x), y)


def test_full_densenet_traces() -> None:
    gm = torch.fx.symbolic_trace(densenet40())
    assert _n_cats(gm) == 36


def test_dense_layer_returns_only_new_features_and_block_concatenates() -> None:
    layer = DenseLayer(10, 4, bottleneck=True)
    x = torch.randn(2, 10, 8, 8)
    assert layer(x).shape == (2, 4, 8, 8)
    block = DenseBlock(3, 10, 4).eval()
    out = block(x)
    assert out.shape == (2, 22, 8, 8) and block.out_channels == 22
    assert torch.equal(out[:, :10], x)  # the input passes through unchanged, first


def test_densenet_backward_and_dropout_modes() -> None:
    torch.manual_seed(0)
    m = densenet_bc(10, growth_rate=4, dropout=0.5).train()
    loss = m(_x()).sum()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert any(isinstance(mod, nn.Dropout) for mod in m.modules())
    assert not any(isinstance(mod, nn.Dropout) for mod in densenet_bc(10, 4).modules())
    # The traced graph calls the Dropout modules, so eval() still switches dropout off.
    gm = torch.fx.symbolic_trace(m).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(_x()), gm(_x()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 41}, r"depth must be 3n\+4"),
        ({"depth": 4}, r"depth must be 3n\+4 with n >= 1"),
        ({"depth": 43, "bottleneck": True}, r"DenseNet-BC depth must be 6n\+4"),
        ({"depth": 40.0}, "depth"),
        ({"depth": True}, "depth"),
        ({"growth_rate": 0}, "growth_rate"),
        ({"num_classes": 0}, "num_classes"),
        ({"compression": 0.0}, r"compression must be in \(0, 1\]"),
        ({"compression": 1.5}, "compression"),
        ({"compression": "half"}, "compression"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"bottleneck": "yes"}, "bottleneck"),
        ({"depth": 7, "growth_rate": 1, "compression": 0.01}, "no output channels"),
    ],
)
def test_densenet_bad_arguments(kwargs, match) -> None:
    with pytest.raises(HwpruneError, match=match):
        densenet_cifar(**kwargs)


def test_densenet_bc_bad_depth_names_6n_plus_4() -> None:
    with pytest.raises(HwpruneError, match=r"6n\+4 .*10, 16, 22, 40, 100"):
        densenet_bc(depth=99)


# -------------------------------------------------------------------------------------- VGG


def test_vgg16_param_count_shapes_and_trace() -> None:
    m = vgg16_cifar()
    # 13 bias-free convs + BN + Linear(512, 10); kuangliu's (conv bias kept) has 14,728,266.
    assert _n_params(m) == 14_724_042
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is None for c in convs)
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == 13
    assert sum(isinstance(mod, nn.MaxPool2d) for mod in m.modules()) == 5
    assert isinstance(m.classifier, nn.Linear) and m.classifier.in_features == 512
    with torch.no_grad():
        assert m.eval()(_x()).shape == (2, 10)


def test_vgg16_mlp_head_matches_li_et_al() -> None:
    # Li et al. (2017), Table 1: VGG-16 on CIFAR-10 has 1.5e7 parameters.
    m = vgg16_cifar(classifier="mlp", width_mult=0.125)
    assert [type(mod) for mod in m.classifier] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert m.classifier[0].out_features == 64
    assert m(_x()).shape == (2, 10)
    # Counted from shapes (no 15M-parameter build needed): only the head differs.
    head = 512 * 512 + 512 + 2 * 512 + 512 * 10 + 10
    n = 14_724_042 - (512 * 10 + 10) + head
    assert n == 14_987_722 and abs(n - 1.5e7) / 1.5e7 < 0.01


def test_vgg16_width_mult_scales_cfg_and_traces() -> None:
    torch.manual_seed(0)
    m = vgg16_cifar(num_classes=100, width_mult=0.125).eval()
    assert isinstance(m, VGG)
    assert m.cfg == [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]
    assert m.classifier.in_features == 64
    x = _x()
    gm = torch.fx.symbolic_trace(m)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 100)
        torch.testing.assert_close(gm(x), y)


def test_vgg16_without_batch_norm_and_backward() -> None:
    m = vgg16_cifar(batch_norm=False, width_mult=0.125)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert all(mod.bias is not None for mod in m.modules() if isinstance(mod, nn.Conv2d))
    m(_x()).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width_mult": 0}, "width_mult must be a finite number > 0"),
        ({"width_mult": float("inf")}, "width_mult"),
        ({"width_mult": "x"}, "width_mult"),
        ({"num_classes": 0}, "num_classes"),
        ({"batch_norm": 1}, "batch_norm"),
        ({"classifier": "conv"}, r"classifier must be one of \('linear', 'mlp'\)"),
    ],
)
def test_vgg16_bad_arguments(kwargs, match) -> None:
    with pytest.raises(HwpruneError, match=match):
        vgg16_cifar(**kwargs)


def test_vgg_bad_cfg() -> None:
    with pytest.raises(HwpruneError, match="VGG cfg"):
        VGG([8, "X", 16])
    with pytest.raises(HwpruneError, match="VGG cfg"):
        VGG(["M"])


# --------------------------------------------------------------------------------- registry


def test_registry_builds_new_models() -> None:
    assert {"densenet40", "densenet_bc100", "vgg16"} <= set(MODELS)
    assert MODELS["densenet40"] is densenet40 and MODELS["densenet_bc100"] is densenet_bc100
    m = get_model("vgg16", num_classes=5, width_mult=0.125)
    assert isinstance(m, VGG) and m(_x()).shape == (2, 5)
