"""DPP on structure="map": one k-of-n row per family of coupled feature maps, drawn once per
forward pass and read by every member (producer filters, biases, BatchNorm entries, consumer
input channels), so a pruned map is zero wherever it is used and shrink removes it whole."""

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.errors import ConfigError
from hwprune.methods.checks import map_violations
from test_map_structure import Dense, Residual

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _trained(model_cls, steps=6, **kw):
    torch.manual_seed(0)
    model = model_cls()
    pruner = hp.DPP(model, "map", **{"k": 0.5, "noise_scale": 0.5, **kw}, example_inputs=X)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.1, momentum=0.9))
    for i in range(steps):
        loss = model(X).pow(2).mean() + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if i % 2:
            pruner.epoch_end()
    return model, pruner


@pytest.mark.parametrize("model_cls", [Residual, Dense])
def test_exactly_k_maps_per_family_and_whole_maps(model_cls):
    model, pruner = _trained(model_cls)
    keep = pruner.map_sample.kept()
    families = pruner.maps.families()
    assert len(pruner.map_families) == len(families)
    for ids, k in pruner.map_families.values():
        assert k == max(1, round(0.5 * len(ids)))
        assert int(keep[ids].sum()) == k
    assert map_violations(pruner.maps, pruner.masks()) == []


@pytest.mark.parametrize("model_cls", [Residual, Dense])
def test_finalize_and_shrink_keep_the_function_and_remove_the_pruned_maps(model_cls):
    model, pruner = _trained(model_cls)
    model.eval()
    with torch.no_grad():
        expected = model(X)
    before = sum(p.numel() for p in model.parameters())
    pruner.finalize()
    result = hp.shrink(model, X, return_result=True)
    with torch.no_grad():
        got = result.model(X)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    kept = int(pruner.map_sample.kept().sum())
    assert kept < len(pruner.maps.groups)
    assert result.params_after < before
    assert not result.kept  # every pruned map went


def test_one_sample_per_forward_pass_is_shared_by_every_member():
    model, pruner = _trained(Residual, steps=2)
    seen = {}
    model.bn0.register_forward_hook(lambda m, i, o: seen.update(bn0=o))
    model.bn2.register_forward_hook(lambda m, i, o: seen.update(bn2=o))
    model.train()
    masks = []
    for _ in range(4):
        model(X)
        drawn = pruner.map_sample.drawn.detach()
        masks.append(drawn)
        stream = [i for i in pruner.map_families["conv0"][0] if drawn[i] == 0]
        channels = [pruner.maps.groups[i].where[1] for i in stream]
        assert channels and not seen["bn0"][:, channels].any()  # both writers of the
        assert not seen["bn2"][:, channels].any()  # residual stream see the same sample
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # the noise explores


def test_the_logits_get_gradients_through_every_member():
    torch.manual_seed(0)
    model = Residual()
    pruner = hp.DPP(model, "map", k=0.5, example_inputs=X)
    model(X).pow(2).mean().backward()
    for row in pruner.map_sample.rows:
        assert row.logits.grad is not None and row.logits.grad.abs().max() > 0


def test_an_int_k_larger_than_a_family_is_refused_naming_it():
    with pytest.raises(ConfigError, match="k=7 exceeds the 6 feature maps of the family"):
        hp.DPP(Residual(), "map", k=7, example_inputs=X)
    model = Residual()
    with pytest.raises(ConfigError, match="example_inputs"):
        hp.DPP(model, "map", k=2)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())


def test_quantization_applies_to_the_weights_not_the_norm_entries():
    model, pruner = _trained(Residual, steps=1, quantize_bits=4)
    model.eval()
    conv = pruner.layers["conv1.weight"].effective_weight()
    assert conv.unique().numel() <= 2 ** 4 - 1
    bn = pruner.layers["bn1.weight"]
    mask = pruner.masks()["bn1.weight"]
    assert torch.equal(bn.effective_weight(), bn.original().masked_fill(~mask, 0.0))


def test_the_report_names_each_layers_rows():
    model, pruner = _trained(Residual, steps=2)
    extras = pruner.layer_extras()
    assert extras["conv1.weight"]["rows"] == ["conv0", "conv1"]  # reads the stream, writes
    assert extras["conv1.weight"]["k"] == [4, 3]
    assert 0.0 <= extras["conv1.weight"]["confidence"] <= 1.0
    assert pruner.history[-1]["layers"].keys() == pruner.map_families.keys()


@pytest.mark.parametrize("init", ["magnitude", "zeros"])
def test_logits_start_per_row_from_the_maps_norms_or_uniform(init):
    pruner = hp.DPP(Residual(), "map", k=0.5, logit_init=init, example_inputs=X)
    for row in pruner.map_sample.rows:
        logits = row.logits.detach()
        if init == "zeros":
            assert not logits.any()
        else:  # standardised within the row
            assert abs(float(logits.mean())) < 1e-5 and abs(float(logits.std(1, False)) - 1) < 1e-3
