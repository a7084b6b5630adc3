"""hp.Magnitude: exact group counts, the smallest norms go, scopes, schedules, errors, and a
small real training run."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hwprune as hp
from hwprune.errors import ConfigError
from hwprune.schedules import Cubic, Linear, OneShot
from hwprune.structures import parse_structure

from conftest import TinyNet

CONV_TARGETS = ["conv2", "conv3"]


def kept_groups(pruner, name):
    layer = pruner.layers[name]
    mask = pruner.masks()[name]
    g = layer.structure.to_groups(mask.float())
    real = layer.structure.to_groups(torch.ones(layer.shape)).bool()  # not block padding
    lo = torch.where(real, g, torch.inf).amin(1)
    hi = torch.where(real, g, -torch.inf).amax(1)
    assert torch.equal(lo, hi), "a group is partly kept"
    return hi.bool()


@settings(max_examples=25, deadline=None)
@given(structure=st.sampled_from(["element", "filter", "channel", "kernel", "column",
                                  "block:2x4", "block:3x3"]),
       sparsity=st.floats(0.0, 0.95), norm=st.sampled_from(["l1", "l2"]),
       seed=st.integers(0, 1000))
def test_layer_scope_removes_exactly_the_smallest_groups(structure, sparsity, norm, seed):
    torch.manual_seed(seed)
    model = TinyNet()
    pruner = hp.Magnitude(model, structure, sparsity, norm=norm, targets=CONV_TARGETS)
    for name, layer in pruner.layers.items():
        keep = kept_groups(pruner, name)
        n = keep.numel()
        # at least ``sparsity`` goes: the kept count is floored
        expected_removed = min(n - math.floor((1 - sparsity) * n + 1e-9), n - 1)
        assert int((~keep).sum()) == expected_removed
        scores = layer.structure.scores(layer.original().detach(), norm)
        if keep.any() and (~keep).any():
            assert scores[keep].min() >= scores[~keep].max()


@pytest.mark.parametrize("spec", ["2:4", "1:4", "2:8", "1:2@kernel", "4:8"])
def test_k_of_n_masks_have_exactly_k_per_run(tiny, spec):
    pruner = hp.Magnitude(tiny, spec, targets=CONV_TARGETS)
    s = parse_structure(spec)
    for name in pruner.layers:
        keep = kept_groups(pruner, name)
        assert (keep.reshape(-1, s.n).sum(1) == s.k).all()
    assert math.isclose(pruner.sparsity(), 1 - s.k / s.n)


def test_global_scope_hits_the_total_and_ranks_per_weight(tiny):
    pruner = hp.Magnitude(tiny, "filter", 0.5, scope="global", norm="l1")
    removed = sum(int((~kept_groups(pruner, n)).sum()) for n in pruner.layers)
    total = sum(p.structure.num_groups(p.shape) for p in pruner.layers.values())
    assert removed == round(0.5 * total)
    per_weight = {n: l.structure.scores(l.original().detach(), "l1") /
                  l.structure.group_sizes(l.shape) for n, l in pruner.layers.items()}
    for w in per_weight.values():
        w[w.argmax()] = torch.inf  # each layer's best group is reserved, whatever its score
    kept = torch.cat([per_weight[n][kept_groups(pruner, n)] for n in pruner.layers])
    gone = torch.cat([per_weight[n][~kept_groups(pruner, n)] for n in pruner.layers])
    assert kept.min() >= gone.max()


def test_global_scope_never_empties_a_layer():
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.conv3.weight.mul_(1e-4)  # every conv3 filter is smaller than all others
    pruner = hp.Magnitude(model, "filter", 0.6, scope="global")
    assert int(kept_groups(pruner, "conv3.weight").sum()) == 1


def test_layer_structure_may_remove_whole_layers():
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.conv3.weight.mul_(1e-3)
    pruner = hp.Magnitude(model, "layer", 0.2, scope="global")
    assert not pruner.masks()["conv3.weight"].any()
    assert pruner.masks()["conv2.weight"].all() and pruner.masks()["fc1.weight"].all()


def test_schedules_follow_their_formulas():
    cubic, linear = Cubic(10, 110, every=10), Linear(0, 100, every=25, initial=0.1)
    assert cubic.sparsity(5, 0.8) == 0.0
    assert math.isclose(cubic.sparsity(60, 0.8), 0.8 * (1 - 0.5 ** 3))
    assert cubic.sparsity(500, 0.8) == 0.8
    assert math.isclose(linear.sparsity(50, 0.9), 0.5)
    assert [t for t in range(0, 120) if cubic.due(t)] == list(range(10, 111, 10))
    assert [t for t in range(0, 101) if linear.due(t)] == [0, 25, 50, 75, 100]
    assert OneShot(at=3).sparsity(3, 0.7) == 0.7 and OneShot(at=3).due(3)


def test_gradual_pruning_follows_the_schedule_and_masks_only_grow(tiny):
    schedule = Cubic(0, 12, every=3)
    pruner = hp.Magnitude(tiny, "element", 0.8, schedule=schedule, targets=CONV_TARGETS)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.1))
    previous = pruner.masks()
    for t in range(1, 16):
        x = torch.randn(4, 3, 8, 8)
        tiny(x).sum().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        masks = pruner.masks()
        for name in masks:
            assert not (masks[name] & ~previous[name]).any(), "a pruned weight came back"
        previous = masks
        if schedule.due(t):
            assert abs(pruner.sparsity() - schedule.sparsity(t, 0.8)) < 1e-3
    assert abs(pruner.sparsity() - 0.8) < 1e-3


def test_epoch_unit_schedule(tiny):
    pruner = hp.Magnitude(tiny, "filter", 0.5, schedule=Linear(0, 2, unit="epoch"),
                          targets=CONV_TARGETS)
    assert pruner.sparsity() == 0.0
    for _ in range(5):
        pruner.step()
    assert pruner.sparsity() == 0.0
    pruner.epoch_end()
    assert math.isclose(pruner.sparsity(), 0.25)
    pruner.epoch_end()
    assert math.isclose(pruner.sparsity(), 0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(structure="filter", sparsity=None), "sparsity is required"),
    (dict(structure="filter", sparsity=-0.1), r"\[0, 1\)"),
    (dict(structure="filter", sparsity="half"), r"\[0, 1\)"),
    (dict(structure="2:4", sparsity=0.7), "implies sparsity 0.5"),
    (dict(structure="2:4", scope="global"), "scope='global'"),
    (dict(structure="2:4", schedule=Cubic(0, 10)), "one-shot"),
    (dict(structure="filter", sparsity=0.5, scope="model"), "scope must be"),
    (dict(structure="filter", sparsity=0.5, norm="l3"), "norm must be"),
    (dict(structure="filter", sparsity=0.5, schedule="cubic"), "schedule must be"),
    (dict(structure="filter", sparsity=0.2, schedule=Cubic(0, 5, initial=0.5)), "initial"),
])
def test_bad_arguments_are_clear_errors(tiny, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        hp.Magnitude(tiny, targets=CONV_TARGETS, **kwargs)


def test_magnitude_on_grouped_and_depthwise_convs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, groups=2),
                          nn.Conv2d(16, 16, 3, groups=16), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    pruner = hp.Magnitude(model, "2:4", targets=["1"])
    assert math.isclose(pruner.sparsity(), 0.5)
    pruner = hp.Magnitude(model, "kernel", 0.5, targets=["2"])  # depthwise: 1 kernel per filter
    assert math.isclose(pruner.sparsity(), 0.5)
