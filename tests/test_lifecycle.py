"""The lifecycle every method shares: targets, parametrization, param groups, finalize,
state_dict resume, the model's own state_dict while pruning, errors before anything changes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import hwprune as hp
from hwprune.errors import ConfigError, LifecycleError, StructureError, TargetError
from hwprune.schedules import Cubic, Linear
from hwprune.targets import resolve_targets

from conftest import TinyLSTM, TinyNet

# -- targets -------------------------------------------------------------------------------


def test_default_targets_skip_first_conv_and_last_linear(tiny):
    names = [t.name for t in resolve_targets(tiny)]
    assert names == ["conv2.weight", "conv3.weight", "fc1.weight"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("conv*", ["conv1.weight", "conv2.weight", "conv3.weight"]),
        (["fc1.weight", "conv1"], ["conv1.weight", "fc1.weight"]),
        (nn.Linear, ["fc1.weight", "fc2.weight"]),
        ((nn.Linear, nn.Conv2d), ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight",
                                  "fc2.weight"]),
        (lambda name, m: name.endswith("3"), ["conv3.weight"]),
    ],
)
def test_targets_by_glob_type_and_predicate(tiny, spec, expected):
    assert [t.name for t in resolve_targets(tiny, spec)] == expected


def test_rnn_targets_are_its_weight_matrices():
    names = [t.name for t in resolve_targets(TinyLSTM(), nn.LSTM)]
    assert names == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
                     "lstm.weight_hh_l1"]


def test_target_errors_name_what_exists(tiny):
    with pytest.raises(TargetError, match="match no prunable weight.*conv2.weight"):
        resolve_targets(tiny, ["conv9"])
    with pytest.raises(TargetError, match="selects no weight"):
        resolve_targets(tiny, nn.Conv1d)
    with pytest.raises(TargetError, match="no Conv, Linear, RNN or attention"):
        resolve_targets(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(TargetError, match="targets must be"):
        resolve_targets(tiny, [3])


def test_bad_input_raises_before_the_model_is_touched(tiny):
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(StructureError, match="fc1.weight"):  # conv2/conv3 fit; fc1 cannot
        hp.Magnitude(tiny, "column", 0.5, strict=True)      # have columns
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        hp.Magnitude(tiny, "filter", 1.0)
    assert not any(parametrize.is_parametrized(m) for m in tiny.modules())
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


def test_ddp_wrapped_model_is_refused_with_advice(tiny):
    with pytest.raises(ConfigError, match="then wrap"):
        hp.Magnitude(nn.DataParallel(tiny), "filter", 0.5)


def test_a_second_pruner_on_the_same_weights_is_refused(tiny):
    hp.Magnitude(tiny, "filter", 0.5)
    with pytest.raises(StructureError, match="already parametrized"):
        hp.Magnitude(tiny, "element", 0.5)


# -- param groups, penalty -----------------------------------------------------------------


def test_param_groups_cover_every_parameter_once(tiny):
    pruner = hp.Magnitude(tiny, "channel", 0.5)
    groups = pruner.param_groups(lr=0.1, momentum=0.9, weight_decay=5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in tiny.parameters()}
    assert groups[0]["lr"] == 0.1 and groups[0]["weight_decay"] == 5e-4
    assert pruner.penalty().item() == 0.0


# -- finalize ----------------------------------------------------------------------------


@pytest.mark.parametrize("structure, sparsity", [("element", 0.6), ("channel", 0.5),
                                                 ("filter", 0.5), ("2:4", None),
                                                 ("block:4x4", 0.5)])
def test_finalize_gives_plain_modules_with_the_same_function(tiny, x8, structure, sparsity):
    reference_keys = set(TinyNet().state_dict())
    pruner = hp.Magnitude(tiny, structure, sparsity, targets=["conv2", "conv3", "fc1"])
    tiny.eval()
    y = tiny(x8)
    masks = pruner.masks()
    model = pruner.finalize()
    assert model is tiny
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(type(m).__module__.startswith("torch.") for m in model.modules()
               if m is not model)
    assert set(model.state_dict()) == reference_keys
    assert torch.equal(model(x8), y)
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert torch.equal(w != 0, mask)  # randn weights: no accidental zeros
    assert pruner.masks().keys() == masks.keys()
    with pytest.raises(LifecycleError, match="after finalize"):
        pruner.step()


def test_finalize_lstm_keeps_a_working_plain_lstm():
    torch.manual_seed(0)
    model = TinyLSTM()
    tokens = torch.randint(0, 20, (2, 5))
    pruner = hp.Magnitude(model, "element", 0.75, targets=nn.LSTM)
    y = model(tokens)
    pruner.finalize()
    assert torch.allclose(model(tokens), y, atol=1e-6)
    assert abs((model.lstm.weight_hh_l1 == 0).float().mean().item() - 0.75) < 1e-3


# -- resume and the model's own state_dict --------------------------------------------------


def _train(model, pruner, opt, steps, seed_base=100):
    for i in range(steps):
        g = torch.Generator().manual_seed(seed_base + pruner.steps)
        x = torch.randn(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if (i + 1) % 5 == 0:
            pruner.epoch_end()


METHODS = {
    "magnitude-gradual": lambda m: hp.Magnitude(m, "channel", 0.75, schedule=Cubic(0, 20, every=4)),
    # strong decay and a high threshold, so that 30 steps on random data prune something
    "psp-decay": lambda m: hp.PSP(m, "channel", alpha_decay=0.05, alpha_lr=0.5, threshold=0.5,
                                  threshold_mode="absolute"),
    "psp-layer-gates": lambda m: hp.PSP(m, "layer", alpha_decay=0.05, alpha_lr=0.5,
                                        threshold=0.5, threshold_mode="absolute",
                                        targets=["conv3", "bn2", "fc1"]),
    # sampled masks: resuming must restore the noise generator too
    "dpp-2:4-quantized": lambda m: hp.DPP(m, "2:4", quantize_bits=8, anneal_epochs=3),
    # gradual: masks and per-row block sizes are recomputed at steps 0, 4, ..., 20
    "darb-gradual": lambda m: hp.DARB(m, 6.0, schedule=Linear(0, 20, every=4)),
    # resumes across ADMM rounds (Z, U, rho) and into the tied-magnitude retraining phase
    "admm-unify-zero": lambda m: hp.ADMM(m, block=(1, 4), unify=0.25, zero=0.25, rho=0.05,
                                         admm_interval=4, retrain_at=14),
}


def _make(method="magnitude-gradual", seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    pruner = METHODS[method](model)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    return model, pruner, opt


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_dicts_resume_a_run_exactly(tmp_path, method):
    model, pruner, opt = _make(method)
    _train(model, pruner, opt, 30)
    assert pruner.sparsity() > 0, "the run must prune something for the test to mean anything"
    straight = copy.deepcopy(pruner.finalize().state_dict())

    model, pruner, opt = _make(method)
    _train(model, pruner, opt, 10)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "pruner": pruner.state_dict()}, path)

    model, pruner, opt = _make(method, seed=123)  # everything must come from the file
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    pruner.load_state_dict(ckpt["pruner"])
    assert pruner.steps == 10 and pruner.epochs == 2
    _train(model, pruner, opt, 20)
    resumed = pruner.finalize().state_dict()
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_gradual_magnitude_reaches_its_channel_sparsity():
    model, pruner, opt = _make()
    _train(model, pruner, opt, 30)
    weights = pruner.finalize().state_dict()
    channels_kept = (weights["conv3.weight"].abs().sum((0, 2, 3)) != 0).float().mean()
    assert channels_kept.item() == 0.25


@pytest.mark.parametrize("method", sorted(METHODS))
def test_model_state_dict_round_trips_while_pruning(x8, method):
    model, pruner, opt = _make(method)
    _train(model, pruner, opt, 12)
    state = model.state_dict()
    assert any(".parametrizations.weight." in k for k in state)
    other, other_pruner, _ = _make(method, seed=7)
    other.load_state_dict(state)
    model.eval(), other.eval()
    assert torch.equal(model(x8), other(x8))
    for k, m in pruner.masks().items():
        assert torch.equal(m, other_pruner.masks()[k])


def test_load_state_dict_refuses_a_different_run(tiny):
    pruner = hp.Magnitude(tiny, "filter", 0.5)
    other = hp.Magnitude(TinyNet(), "channel", 0.5)
    with pytest.raises(ConfigError, match="structure"):
        other.load_state_dict(pruner.state_dict())
    narrower = hp.Magnitude(TinyNet(), "filter", 0.5, targets=["conv2"])
    with pytest.raises(ConfigError, match="targets differ"):
        narrower.load_state_dict(pruner.state_dict())
