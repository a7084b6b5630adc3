"""Model zoo: shapes, parameter counts, checkpoint loading, fx tracing, digits training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from hwprune.data import load_digits
from hwprune.errors import HwpruneError
from hwprune.models import (
    MLP,
    MODELS,
    LeNet5,
    PadShortcut,
    SmallCNN,
    get_model,
    load_pretrained,
    resnet20,
    resnet56,
    resnet_cifar,
)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------- ResNets


def test_resnet_param_counts_match_akamaster() -> None:
    # akamaster/pytorch_resnet_cifar10 reports 0.27M / 0.85M: exactly these counts.
    assert _n_params(resnet20()) == 269722
    assert _n_params(resnet56()) == 853018


def test_option_a_shapes_and_no_shortcut_params() -> None:
    torch.manual_seed(0)
    m = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    sc = m.layer2[0].shortcut
    assert isinstance(sc, PadShortcut) and sc.pad == 8 and list(sc.parameters()) == []
    y = sc(torch.randn(2, 16, 32, 32))
    assert y.shape == (2, 32, 16, 16)
    assert torch.all(y[:, :8] == 0) and torch.all(y[:, 24:] == 0)
    assert isinstance(m.layer3[0].shortcut, PadShortcut)
    assert not any("shortcut" in k for k in m.state_dict())


def test_option_b_has_conv_bn_shortcut() -> None:
    m = resnet_cifar(20, num_classes=100, shortcut="B").eval()
    keys = m.state_dict().keys()
    assert "layer2.0.shortcut.0.weight" in keys and "layer2.0.shortcut.1.running_var" in keys
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("depth", [0, 7, 21, 52, "20", True])
def test_bad_depth(depth: object) -> None:
    with pytest.raises(HwpruneError, match="6n\\+2"):
        resnet_cifar(depth)  # type: ignore[arg-type]


def test_bad_shortcut_option() -> None:
    with pytest.raises(HwpruneError, match="shortcut"):
        resnet_cifar(20, shortcut="C")


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_fx_traceable(shortcut: str) -> None:
    torch.manual_seed(0)
    m = resnet_cifar(20, shortcut=shortcut).eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm(x), m(x))


def test_pad_shortcut_visible_to_a_tracer() -> None:
    class KeepPad(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, PadShortcut) or super().is_leaf_module(m, qualname)

    graph = KeepPad().trace(resnet20())
    targets = {n.target for n in graph.nodes if n.op == "call_module"}
    assert {"layer2.0.shortcut", "layer3.0.shortcut"} <= targets


def _fake_checkpoint(path: Path, wrap: bool) -> nn.Module:
    torch.manual_seed(1)
    model = resnet20()
    # Give BN non-trivial running statistics so a dropped buffer would show in the outputs.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "best_prec1": 0.0} if wrap else sd, path)
    return model


@pytest.mark.parametrize("wrap", [True, False])
def test_load_pretrained_round_trip(tmp_path: Path, wrap: bool) -> None:
    ref = _fake_checkpoint(tmp_path / "r20.th", wrap)
    loaded = load_pretrained(tmp_path / "r20.th")
    assert not loaded.training
    assert len(loaded.layer1) == 3
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    assert load_pretrained(tmp_path / "r20.th", depth=20) is not None


def test_load_pretrained_errors(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "r20.th", wrap=True)
    with pytest.raises(HwpruneError, match="ResNet-32"):
        load_pretrained(tmp_path / "r20.th", depth=32)
    (tmp_path / "junk.th").write_text("not a checkpoint")
    with pytest.raises(HwpruneError, match="junk.th"):
        load_pretrained(tmp_path / "junk.th")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "odd.th")
    with pytest.raises(HwpruneError, match="state dict"):
        load_pretrained(tmp_path / "odd.th")
    torch.save({"linear.weight": torch.zeros(10, 64)}, tmp_path / "noblocks.th")
    with pytest.raises(HwpruneError, match="blocks"):
        load_pretrained(tmp_path / "noblocks.th")
    with pytest.raises(HwpruneError, match="missing.th"):
        load_pretrained(tmp_path / "missing.th")


# ---------------------------------------------------------------------------------- small models


def test_small_model_shapes() -> None:
    assert SmallCNN()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert LeNet5()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert MLP(64, hidden=(32,), num_classes=5)(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    assert _n_params(LeNet5()) == 61706


def test_small_cnn_has_prunable_middle_layers() -> None:
    m = SmallCNN()
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert len(convs) >= 2 and len(linears) >= 2  # a middle conv and linear besides the ends


def test_get_model_registry() -> None:
    assert isinstance(get_model("resnet32"), nn.Module)
    assert isinstance(get_model("mlp", in_features=64), MLP)
    assert {"small_cnn", "lenet5", "mlp", "resnet20", "resnet110"} <= set(MODELS)
    with pytest.raises(HwpruneError, match="resnet20"):
        get_model("resnet19")


def test_small_cnn_trains_on_digits() -> None:
    torch.manual_seed(0)
    train, test = load_digits()
    x, y = train.tensors
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(len(x), generator=gen)
        for idx in perm.split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    assert acc > 0.9, acc
