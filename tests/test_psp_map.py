"""PSP on structure="map": one alpha per coupled feature map, shared by every member. Under
strong decay some maps fall below the threshold; every member of such a map is zero in train
and eval; finalize + shrink keep the function and remove exactly those maps; resume is exact."""

import copy

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.errors import ConfigError

# an identity-add block on a stem, and a DenseNet-like chain of concatenations
from test_map_structure import Dense, Residual

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 3, 8, 8)


MODELS = {"residual": Residual, "concat": Dense}
FAST = {"alpha_decay": 0.1, "alpha_lr": 0.5, "alpha_momentum": 0.0, "threshold": 0.7,
        "threshold_mode": "absolute"}


def _train(pruner, steps=6, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    y = torch.randint(0, 4, (X.shape[0],))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(pruner.model(X), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


def _trained(name, **kw):
    torch.manual_seed(0)
    pruner = hp.PSP(MODELS[name](), "map", example_inputs=X, **{**FAST, **kw})
    _train(pruner)
    return pruner


def _off_members(pruner):
    keep = pruner.map_scale.keep
    return [m for i, g in enumerate(pruner.maps.groups) if not keep[i] for m in g.members]


def _entry(model, member):
    module_name, _, param = member.param.rpartition(".")
    return getattr(model.get_submodule(module_name), param).select(member.axis, member.index)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_strong_decay_turns_off_some_maps_and_every_member_of_them_is_zero(name):
    pruner = _trained(name)
    keep = pruner.map_scale.keep
    assert 0 < int((~keep).sum()) < keep.numel()
    assert (pruner.alphas()["map"].abs()[~keep] < FAST["threshold"]).all()
    for training in (True, False):
        pruner.model.train(training)
        with torch.no_grad():
            assert all(bool((_entry(pruner.model, m) == 0).all()) for m in _off_members(pruner))
    # a map's members share one alpha: a kept map's writers are scaled by exactly it
    on = int(keep.nonzero()[0])
    writer = pruner.maps.groups[on].writers[0]
    module_name, _, param = writer.param.rpartition(".")
    module = pruner.model.get_submodule(module_name)
    raw = module.parametrizations[param].original.select(writer.axis, writer.index)
    alpha = pruner.map_scale.alpha[on]
    assert torch.allclose(_entry(pruner.model, writer), raw * alpha)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_finalize_then_shrink_keeps_the_function_and_removes_exactly_the_off_maps(name):
    pruner = _trained(name)
    off = [i for i, k in enumerate(pruner.map_scale.keep.tolist()) if not k]
    members = _off_members(pruner)
    masks = pruner.masks()
    pruned = pruner.finalize().eval()
    assert all(bool((_entry(pruned, m) == 0).all()) for m in members)
    result = hp.shrink(pruned, X, return_result=True)
    with torch.no_grad():
        ref, got = pruned(X), result.model(X)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert result.kept == []
    assert result.params_before - result.params_after == sum(int((~m).sum())
                                                             for m in masks.values())
    # each producer loses exactly its off maps
    for conv in ("conv0", "conv1", "conv_a", "conv_b"):
        if not hasattr(pruned, conv):
            continue
        mine = {m.index for i in off for m in pruner.maps.groups[i].members
                if m.param == f"{conv}.weight" and m.axis == 0}
        before = getattr(pruned, conv).out_channels
        assert getattr(result.model, conv).out_channels == before - len(mine)


def test_resume_is_exact():
    first = _trained("residual")
    torch.manual_seed(1)
    second = hp.PSP(Residual(), "map", example_inputs=X, **FAST)
    second.model.load_state_dict(first.model.state_dict())
    second.load_state_dict(first.state_dict())
    assert torch.equal(first.alphas()["map"], second.alphas()["map"])
    assert all(torch.equal(m, second.masks()[n]) for n, m in first.masks().items())
    _train(first, steps=2, seed=3)
    _train(second, steps=2, seed=3)
    assert torch.equal(first.alphas()["map"], second.alphas()["map"])
    with torch.no_grad():
        assert torch.equal(first.model(X), second.model(X))


def test_fixed_variant_turns_off_the_fraction_of_each_family():
    pruner = hp.PSP(Residual(), "map", variant="fixed", sparsity=0.5, example_inputs=X)
    _train(pruner, steps=1)
    keep = pruner.map_scale.keep
    assert {fam: int((~keep[ids]).sum()) for fam, ids in pruner.maps.families().items()} \
        == {fam: len(ids) // 2 for fam, ids in pruner.maps.families().items()}


def test_the_alphas_are_one_optimizer_parameter_and_map_needs_example_inputs():
    pruner = hp.PSP(Residual(), "map", example_inputs=X)
    groups = pruner.param_groups(lr=0.1)
    assert groups[1]["params"] == [pruner.map_scale.alpha]
    assert all(p is not pruner.map_scale.alpha for p in groups[0]["params"])
    with pytest.raises(ConfigError, match="example_inputs"):
        hp.PSP(Residual(), "map")
    state = copy.deepcopy(pruner.state_dict())
    assert sum("scale.alpha" in k for layer in state["layers"].values() for k in layer) == 1
