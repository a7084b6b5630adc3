"""hp.DPP: exactly k per row in every training pass, sampled masks in training and a fixed
one in eval, logits that find the useful inputs, joint quantization, exact finalize, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwprune as hp
from hwprune.errors import ConfigError, StructureError

from conftest import TinyNet, fit_full_batch

CONVS = ["conv2", "conv3"]
GRANULARITIES = [("weight", 0.25), ("weight", 5), ("kernel", 3), ("filter", 0.5),
                 ("2:4", None), ("1:4", None), ("2:8", None), ("1:2@kernel", None)]


def _rows_of(pruner, name, mask):
    """The mask as (rows, n) over the layer's k-of-n rows."""
    s = pruner.layers[name].structure
    g = s.to_groups(mask.float())
    assert torch.equal(g.amin(1), g.amax(1)), "a group is partly kept"
    return g.amax(1).reshape(-1, s.n), s.k


def _record_masks(pruner):
    """Hooks on each parametrization: its output *is* the weight the layer computed with
    (weights are random, so nonzero = kept). Returns the list every pass appends to."""
    passes: list[dict[str, torch.Tensor]] = []

    def hook(module, inputs, output, name):
        if not passes or name in passes[-1]:
            passes.append({})
        passes[-1][name] = output.detach() != 0

    for name, layer in pruner.layers.items():
        layer.parametrization.register_forward_hook(
            lambda m, i, o, name=name: hook(m, i, o, name))
    return passes


@pytest.mark.parametrize("structure, k", GRANULARITIES)
def test_every_training_pass_keeps_exactly_k_per_row(tiny, x8, structure, k):
    pruner = hp.DPP(tiny, structure, k=k, targets=CONVS)
    passes = _record_masks(pruner)
    tiny.train()
    for _ in range(3):
        tiny(x8)
    assert len(passes) == 3
    for masks in passes:
        for name, mask in masks.items():
            rows, kk = _rows_of(pruner, name, mask)
            assert (rows.sum(1) == kk).all()


def test_masks_are_sampled_in_training_and_fixed_in_eval(tiny, x8):
    pruner = hp.DPP(tiny, "weight", k=0.5, logit_init="zeros", targets=CONVS)
    passes = _record_masks(pruner)
    tiny.train()
    for _ in range(3):
        tiny(x8)
    train = [p["conv3.weight"] for p in passes]
    assert not torch.equal(train[0], train[1]) and not torch.equal(train[1], train[2])
    tiny.eval()
    for _ in range(2):
        tiny(x8)
    evals = [p["conv3.weight"] for p in passes[3:]]
    assert torch.equal(evals[0], evals[1])
    assert torch.equal(evals[0], pruner.masks()["conv3.weight"])


def test_logits_find_the_inputs_that_matter():
    """Only inputs 1 and 6 of 8 carry the target; DPP with k=2 must learn to keep them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = 2.0 * x[:, 1:2] - 1.5 * x[:, 6:7]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1))
    pruner = hp.DPP(model, "weight", k=2, logit_init="zeros", noise_scale=1.0,
                    temperature=(1.0, 1.0), entropy_weight=0.0, targets=["0"])
    opt = torch.optim.Adam(pruner.param_groups(lr=0.05))
    fit_full_batch(model, pruner, opt, x, y, 400)
    logits = pruner.layers["0.weight"].parametrization.logits.detach()[0]
    assert set(logits.topk(2).indices.tolist()) == {1, 6}, logits
    assert pruner.masks()["0.weight"][0].nonzero().flatten().tolist() == [1, 6]
    model.eval()
    assert F.mse_loss(model(x), y).item() < 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_joint_quantization_leaves_at_most_2_to_the_bits_values(tiny, x8, bits):
    pruner = hp.DPP(tiny, "2:4", quantize_bits=bits, targets=CONVS)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.01))
    tiny(x8).sum().backward()
    opt.step()
    tiny.eval()
    y = tiny(x8)
    model = pruner.finalize()
    assert torch.equal(model(x8), y)
    for name in CONVS:
        w = model.get_submodule(name).weight
        assert w.unique().numel() <= 2 ** bits
        assert ((w != 0).movedim(1, -1).reshape(-1, 4).sum(1) <= 2).all()


@pytest.mark.parametrize("structure, k", GRANULARITIES)
def test_finalize_is_exact_in_eval_mode(tiny, x8, structure, k):
    pruner = hp.DPP(tiny, structure, k=k, targets=CONVS)
    with torch.no_grad():
        for layer in pruner.layers.values():
            layer.parametrization.logits.normal_()
    tiny.eval()
    y = tiny(x8)
    masks = pruner.masks()
    extras = pruner.layer_extras()
    pruner.finalize()
    assert torch.equal(tiny(x8), y)
    for name, mask in masks.items():
        assert torch.equal(tiny.get_parameter(name) != 0, mask)
        assert 0.0 <= extras[name]["confidence"] <= 1.0
        assert -1e-6 <= extras[name]["diversity"] <= 1.0


def test_temperature_anneals_linearly_per_epoch_and_stops_at_its_end(tiny):
    pruner = hp.DPP(tiny, "2:4", temperature=(5.0, 0.5), anneal_epochs=10, targets=CONVS)
    taus = []
    for _ in range(15):
        pruner.epoch_end()
        taus.append(pruner.layers["conv2.weight"].parametrization.tau)
    assert taus[:3] == pytest.approx([4.55, 4.1, 3.65])
    assert taus[9:] == [0.5] * 6
    assert [h["epoch"] for h in pruner.history] == list(range(1, 16))


def test_metrics_on_known_distributions(tiny):
    pruner = hp.DPP(tiny, "2:4", targets=["conv3"])
    logits = pruner.layers["conv3.weight"].parametrization.logits
    with torch.no_grad():
        logits.zero_()  # uniform rows: no confidence, no diversity
    m = pruner.layer_extras()["conv3.weight"]
    assert m["confidence"] == pytest.approx(0.0, abs=1e-6)
    assert m["diversity"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # every row sure, rows spread evenly over the 4 entries
        logits.fill_(-50.0)
        logits[torch.arange(logits.shape[0]), torch.arange(logits.shape[0]) % 4] = 50.0
    m = pruner.layer_extras()["conv3.weight"]
    assert m["confidence"] == pytest.approx(1.0, abs=1e-4)
    assert m["diversity"] == pytest.approx(1.0, abs=1e-4)


def test_logits_get_no_weight_decay_and_the_penalty_is_the_mean_normalised_row_entropy(tiny):
    pruner = hp.DPP(tiny, "2:4", entropy_weight=0.1, logit_lr=0.3, targets=CONVS)
    groups = pruner.param_groups(lr=0.1, weight_decay=5e-4)
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.3
    logits = [layer.parametrization.logits for layer in pruner.layers.values()]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in logits}
    p = [torch.softmax(lg, 1) for lg in logits]
    rows = sum(q.shape[0] for q in p)
    expected = 0.1 * sum(-(q * q.log()).sum() for q in p) / (rows * math.log(4))
    assert torch.isclose(pruner.penalty(), expected)
    with torch.no_grad():  # uniform rows: the penalty is its weight, whatever the model size
        for lg in logits:
            lg.zero_()
    assert pruner.penalty().item() == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(structure="weight", k=500), StructureError, "exceeds the row length"),
    (dict(structure="weight", k=0), ConfigError, "k must be"),
    (dict(structure="weight", k=-2), ConfigError, "k must be"),
    (dict(structure="weight"), ConfigError, "needs k="),
    (dict(structure="5:4"), StructureError, "1 <= k <= n"),
    (dict(structure="2:4", k=3), ConfigError, "implies k=2"),
    (dict(structure="2:3"), StructureError, "does not divide"),
    (dict(structure="2:4", temperature=(5.0, 0.0)), ConfigError, "temperature"),
    (dict(structure="2:4", temperature=(-1.0, 0.5)), ConfigError, "temperature"),
    (dict(structure="2:4", quantize_bits=1), ConfigError, "quantize_bits"),
    (dict(structure="2:4", quantize_bits=0), ConfigError, "quantize_bits"),
    (dict(structure="2:4", quantize_bits=17), ConfigError, "quantize_bits"),
    (dict(structure="channel"), ConfigError, "DPP structure"),
    (dict(structure="2:4", noise_scale=-0.1), ConfigError, "noise_scale"),
    (dict(structure="2:4", noise_scale={"conv": -1.0}), ConfigError, "noise_scale"),
    (dict(structure="2:4", noise_scale={"lstm": 0.1}), ConfigError, "unknown layer kinds"),
    (dict(structure="2:4", logit_init="ones"), ConfigError, "logit_init"),
    (dict(structure="2:4", normalize_logit_grad=1), ConfigError, "normalize_logit_grad"),
])
def test_bad_input_is_refused_at_construction(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        hp.DPP(tiny, targets=CONVS, **kwargs)


def test_noise_scale_defaults_per_layer_kind_and_can_be_set_per_kind():
    def noise(**kw):
        pruner = hp.DPP(TinyNet(), "2:4", targets=["conv2", "fc1"], **kw)
        return {name: layer.parametrization.noise_scale for name, layer in pruner.layers.items()}

    assert noise() == {"conv2.weight": 0.1, "fc1.weight": 1.0}
    assert noise(noise_scale={"conv": 0.5}) == {"conv2.weight": 0.5, "fc1.weight": 1.0}
    assert noise(noise_scale=0.2) == {"conv2.weight": 0.2, "fc1.weight": 0.2}


def test_logit_inits_zeros_by_default_random_with_the_seed_and_magnitude():
    def logits(**kw):
        torch.manual_seed(0)
        pruner = hp.DPP(TinyNet(), "2:4", targets=["conv3"], **kw)
        return pruner.layers["conv3.weight"].parametrization.logits.detach()

    assert torch.equal(logits(), torch.zeros_like(logits()))
    a, b, c = logits(logit_init="random"), logits(logit_init="random"), logits(
        logit_init="random", seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.3 < a.std().item() < 0.7
    m = logits(logit_init="magnitude")  # standardised within each row
    assert torch.allclose(m.mean(1), torch.zeros(m.shape[0]), atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_the_logit_gradient_is_rescaled_per_layer_and_logit_lr_still_applies(tiny, x8, normalize):
    pruner = hp.DPP(tiny, "2:4", targets=CONVS, normalize_logit_grad=normalize, logit_lr=0.3)
    assert pruner.param_groups(lr=0.1)[1]["lr"] == 0.3
    noise = pruner.generator.get_state()

    def rms_after_backward():
        pruner.generator.set_state(noise)  # the same mask sample, so the same raw gradient
        tiny.zero_grad()
        (tiny(x8).square().mean() + pruner.penalty()).backward()
        return [l.parametrization.logits.grad.square().mean().sqrt().item()
                for l in pruner.layers.values()]

    raw = rms_after_backward()  # the first step: nothing learned yet, the raw gradient
    assert all(0 < r < 0.05 for r in raw)  # the straight-through gradient is small
    pruner.step()  # learns the gradient's scale from the step taken
    scaled = rms_after_backward()
    assert scaled == (pytest.approx([0.1] * len(raw), rel=1e-4) if normalize else raw)


def test_the_runner_anneals_over_the_pruning_phase_unless_the_recipe_says_otherwise():
    from hwprune.app.build import run_method_kwargs
    from hwprune.app.recipe import resolve

    def kwargs(method):
        return run_method_kwargs(resolve({"model": {"name": "x"}, "method": method,
                                          "train": {"prune_epochs": 7}}))

    assert kwargs({"name": "DPP", "structure": "2:4"})["anneal_epochs"] == 7
    assert kwargs({"name": "DPP", "structure": "2:4", "anneal_epochs": 3})["anneal_epochs"] == 3
    assert "anneal_epochs" not in kwargs({"name": "Magnitude", "structure": "2:4",
                                          "sparsity": 0.5})
