"""Default targets fit the structure: layers that cannot carry it are skipped with one warning
(``strict=True`` and named targets refuse), and the report lists them."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.errors import StructureError
from hwprune.methods.registry import all_methods


class DepthwiseSeparable(nn.Module):
    """MobileNet-like: a stem, two depthwise-separable blocks, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.pw1 = nn.Conv2d(16, 32, 1, bias=False)
        self.dw2 = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.pw2 = nn.Conv2d(32, 32, 1, bias=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw1(torch.relu(self.dw1(x))))
        x = torch.relu(self.pw2(torch.relu(self.dw2(x))))
        return self.head(x.mean((2, 3)))


DEPTHWISE = {"dw1.weight", "dw2.weight"}
X = torch.randn(2, 3, 8, 8)


def _build(method, **kwargs):
    torch.manual_seed(0)
    model = DepthwiseSeparable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = method(model, **kwargs)
    skips = [w for w in caught if issubclass(w.category, hp.SkippedLayersWarning)]
    return model, pruner, skips


@pytest.mark.parametrize("method, kwargs", [
    (hp.Magnitude, {"structure": "2:4"}),
    (hp.DPP, {"structure": "2:4"}),
])
def test_kn_skips_the_depthwise_convs_and_prunes_the_rest(method, kwargs):
    model, pruner, skips = _build(method, **kwargs)
    assert set(pruner.skipped) == DEPTHWISE
    assert set(pruner.layers) == {"pw1.weight", "pw2.weight"}
    assert all("does not divide" in why for why in pruner.skipped.values())
    assert len(skips) == 1  # one warning for the pruner, naming every skipped layer and why
    message = str(skips[0].message)
    assert "dw1.weight" in message and "dw2.weight" in message and "does not divide" in message
    assert skips[0].message.skipped == pruner.skipped
    model = pruner.finalize()
    for name in ("pw1.weight", "pw2.weight"):  # exactly 2 of every 4 input channels kept
        w = model.get_submodule(name.removesuffix(".weight")).weight
        runs = (w != 0).movedim(1, -1).reshape(-1, 4)
        assert (runs.sum(1) == 2).all()
    assert (model.dw1.weight != 0).all() and (model.dw2.weight != 0).all()


def test_darb_skips_rows_too_short_for_the_ratio():
    # a depthwise row has 9 weights: the largest default block (8) keeps 2, ratio 4.5 at most
    model, pruner, skips = _build(hp.DARB, ratio=8.0)
    assert set(pruner.skipped) == DEPTHWISE
    assert all("outside what block sizes" in why for why in pruner.skipped.values())
    assert len(skips) == 1
    assert set(pruner.block_sizes) == set(pruner.allowed_sizes) == set(pruner.layers)
    pruner.finalize()
    assert (model.dw1.weight != 0).all()
    assert (model.pw1.weight == 0).float().mean() > 0.8


@pytest.mark.parametrize("method, kwargs", [
    (hp.ADMM, {"block": (32, 4), "zero": 0.5}),
    (hp.PSP, {"structure": "block:32x4"}),
    (hp.Magnitude, {"structure": "block:32x4", "sparsity": 0.5}),
])
def test_layers_smaller_than_a_block_are_skipped(method, kwargs):
    model, pruner, skips = _build(method, **kwargs)
    assert set(pruner.skipped) == {"dw1.weight"}  # 16 filters, fewer than 32 rows
    assert all("larger than its im2col matrix" in why for why in pruner.skipped.values())
    assert len(skips) == 1


@pytest.mark.parametrize("method, kwargs", [
    (hp.Magnitude, {"structure": "2:4"}),
    (hp.DPP, {"structure": "2:4"}),
    (hp.DARB, {"ratio": 8.0}),
    (hp.ADMM, {"block": (32, 4), "zero": 0.5}),
    (hp.PSP, {"structure": "block:32x4"}),
])
def test_strict_and_named_targets_refuse(method, kwargs):
    for extra in ({"strict": True}, {"targets": ["dw1", "pw1"]}):
        model = DepthwiseSeparable()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a refusal, not a warning
            with pytest.raises(hp.HwpruneError, match=r"dw1\.weight|pw1\.weight"):
                method(model, **kwargs, **extra)
        assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_every_registered_method_takes_strict():
    for spec in all_methods():
        assert inspect.signature(spec.cls).parameters["strict"].default is False, spec.name


def test_no_layer_that_fits_is_an_error_naming_every_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3),
                          nn.Flatten(), nn.Linear(4, 2))
    # default targets: the two middle convs, with 1 and 4 input channels: runs of 6 fit neither
    with pytest.raises(StructureError, match=r"no default target .* 1\.weight: .*2\.weight"):
        hp.Magnitude(model, "3:6")


def test_without_skips_no_warning_and_an_empty_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = hp.Magnitude(DepthwiseSeparable(), "element", 0.5)
    assert pruner.skipped == {}


def test_the_report_lists_the_skipped_layers():
    model, pruner, _ = _build(hp.Magnitude, structure="2:4")
    pruner.finalize()
    rep = hp.report(model, X, pruner=pruner)
    assert rep.skipped == pruner.skipped
    data = json.loads(rep.to_json())
    assert data["skipped"] == pruner.skipped
    md = rep.to_markdown()
    assert "Skipped" in md
    for name, why in pruner.skipped.items():
        assert f"`{name}`" in md and why in md
    assert "Skipped" not in hp.report(model, X).to_markdown()
