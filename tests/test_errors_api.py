"""API misuse gives a ``HwpruneError`` naming the layer or field (issue 17, item 14), and a
failed construction or ``load_state_dict`` leaves the model and the pruner as they were
(item 15), for every registered method."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import hwprune as hp
from hwprune.errors import ConfigError, TargetError
from hwprune.methods import all_methods

from conftest import TinyNet

SPECS = {spec.name: spec for spec in all_methods()}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def magnitude(model):
    return hp.Magnitude(model, "element", sparsity=0.5, targets=["0", "2", "4"])


def build(name, model=None):
    """The method's first registry configuration on TinyNet (every structure fits it)."""
    spec = SPECS[name]
    torch.manual_seed(0)
    model = model if model is not None else TinyNet()
    return model, spec.cls(model, **spec.config(spec.structures[0]))


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- item 14: one HwpruneError naming the field or layer ----------------------------------------


def test_targets_of_a_wrong_type_is_a_target_error():
    with pytest.raises(TargetError, match="targets must be .* got 5"):
        hp.Magnitude(mlp(), "element", sparsity=0.5, targets=5)
    with pytest.raises(TargetError, match=r"targets must be .* got \[<class 'torch\.nn"):
        hp.Magnitude(mlp(), "element", sparsity=0.5, targets=[nn.Linear, "0"])


@pytest.mark.parametrize("types", [nn.Linear, (nn.Linear,), [nn.Linear, nn.Conv2d]])
def test_targets_by_module_type_take_a_type_a_tuple_or_a_list(types):
    pruner = hp.Magnitude(mlp(), "element", sparsity=0.5, targets=types)
    assert list(pruner.layers) == ["0.weight", "2.weight", "4.weight"]


@pytest.mark.parametrize("damage, field", [
    (lambda s: {**s, "layers": {**s["layers"], "4.weight": {"mask": torch.ones(3, 3,
                                                                                 dtype=bool)}}},
     r"layer 4\.weight: mask is \(3, 3\); allowed: a tensor of shape \(2, 8\)"),
    (lambda s: None, "must be a mapping .* got NoneType"),
    (lambda s: {k: v for k, v in s.items() if k != "layers"}, "has no layers"),
    (lambda s: {**s, "steps": "abc"}, "field steps: got 'abc'"),
    (lambda s: {**s, "layers": {**s["layers"], "4.weight": None}}, r"layer 4\.weight: got None"),
    (lambda s: {**s, "layers": {**s["layers"], "4.weight": {"other": torch.ones(2, 8)}}},
     r"layer 4\.weight: keys \['other'\]"),
], ids=["other shapes", "None", "no layers", "steps abc", "layer None", "other keys"])
def test_load_state_dict_of_a_bad_state_names_the_field(damage, field):
    pruner = magnitude(mlp())
    with pytest.raises(ConfigError, match=field):
        pruner.load_state_dict(damage(pruner.state_dict()))


def test_a_weight_that_is_not_a_parameter_is_a_target_error():
    model = mlp()
    w = model[2].weight
    del model[2].weight
    model[2].weight = w * 2  # a computed tensor (not a leaf), not a parameter
    with pytest.raises(TargetError, match=r"2\.weight: a Tensor, not an nn\.Parameter"):
        magnitude(model)
    assert not parametrize.is_parametrized(model[0])  # refused before anything is attached


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
@pytest.mark.parametrize("name", SPECS)
def test_an_empty_layer_is_a_target_error_for_every_method(name, shape):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(*shape))
    spec = SPECS[name]
    config = {**spec.config(spec.structures[0]), "targets": ["0", "1"]}
    with pytest.raises(TargetError, match=r"1\.weight: empty"):
        spec.cls(model, **config)
    assert not parametrize.is_parametrized(model[0])


# -- item 15: a failure leaves the model and the pruner as they were ----------------------------


@pytest.mark.parametrize("name", SPECS)
def test_a_construction_failing_on_the_last_layer_leaves_the_model_untouched(name, monkeypatch):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make = spec.cls._make_parametrization
    calls = []

    def failing_on_the_last(self, layer):
        calls.append(layer.name)
        if len(calls) == len(self.layers):
            raise ConfigError(f"{layer.name}: injected failure")
        return make(self, layer)

    monkeypatch.setattr(spec.cls, "_make_parametrization", failing_on_the_last)
    with pytest.raises(ConfigError, match="injected failure"):
        spec.cls(model, **spec.config(spec.structures[0]))
    assert len(calls) > 1  # earlier layers were parametrized before the failure
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert same_state(model.state_dict(), before)
    monkeypatch.undo()
    build(name, model)  # the next pruner is not refused as "already parametrized"


@pytest.mark.parametrize("name", SPECS)
def test_a_failure_after_attaching_leaves_the_model_untouched(name, monkeypatch):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fail(self):
        raise ConfigError("injected failure in _on_attach")

    monkeypatch.setattr(spec.cls, "_on_attach", fail)
    with pytest.raises(ConfigError, match="injected"):
        spec.cls(model, **spec.config(spec.structures[0]))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert same_state(model.state_dict(), before)


def _advanced(name):
    """A pruner a few steps in (its state differs from a fresh one's)."""
    model, pruner = build(name)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = model(x).square().mean() + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    pruner.epoch_end()
    return pruner


def _flat(state):
    """state_dict() as comparable items (tensors exactly)."""
    layers = {f"{n}.{k}": v for n, d in state["layers"].items() for k, v in d.items()}
    return ({k: v for k, v in state.items() if k not in ("layers", "extra")}, layers,
            repr(state["extra"]))


def _same(a, b):
    (pa, la, ea), (pb, lb, eb) = _flat(a), _flat(b)
    return pa == pb and same_state(la, lb) and ea == eb


@pytest.mark.parametrize("name", SPECS)
def test_a_load_failing_on_the_last_layer_leaves_the_pruner_unchanged(name):
    pruner = _advanced(name)
    before = pruner.state_dict()
    other = build(name)[1].state_dict()  # a fresh pruner's state: every layer differs
    last = list(other["layers"])[-1]
    key = next(iter(other["layers"][last]))
    other["layers"][last][key] = torch.zeros(7, 7)
    with pytest.raises(ConfigError, match=rf"layer {last}: {key} is \(7, 7\)"):
        pruner.load_state_dict(other)
    assert _same(pruner.state_dict(), before)


@pytest.mark.parametrize("name", SPECS)
def test_a_load_failing_after_the_layers_puts_the_pruner_back(name, monkeypatch):
    pruner = _advanced(name)
    before = pruner.state_dict()
    other = build(name)[1].state_dict()
    original = type(pruner)._load_extra_state
    calls = []

    def fail_once(self, state):
        calls.append(1)
        if len(calls) == 1:
            raise ConfigError("injected failure in the extra state")
        original(self, state)

    monkeypatch.setattr(type(pruner), "_load_extra_state", fail_once)
    with pytest.raises(ConfigError, match="injected"):
        pruner.load_state_dict(other)
    assert _same(pruner.state_dict(), before)



@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "legacy weight_norm"])
def test_a_weight_under_another_parametrization_is_skipped_by_default_and_refused_by_name(wrap):
    def model():
        m = mlp()
        if wrap == "legacy weight_norm":  # the weight becomes a computed tensor
            with pytest.warns(FutureWarning):
                nn.utils.weight_norm(m[2])
        else:
            getattr(nn.utils.parametrizations, wrap)(m[2])
        return m

    with pytest.warns(hp.SkippedLayersWarning, match=r"2\.weight"):
        pruner = hp.Magnitude(model(), "element", sparsity=0.5)
    assert "2.weight" in pruner.skipped and "2.weight" not in pruner.layers
    assert "2.weight" not in pruner.skipped["2.weight"]  # the reason, without the name again
    with pytest.raises(hp.HwpruneError, match=r"2\.weight.*(remove_parametrizations|"
                                              r"not an nn\.Parameter)"):
        hp.Magnitude(model(), "element", sparsity=0.5, targets=["0", "2"])
