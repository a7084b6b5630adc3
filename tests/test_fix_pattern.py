"""``fix_pattern()``: fine-tuning keeps the pattern the method would keep at ``finalize()``.

Before it, DPP samples a new mask every step and PSP re-tests its groups; after it the model
computes, in training too, with the deterministic pattern, the method's own parameters stop,
and only the weights train."""

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.errors import LifecycleError
from hwprune.schedules import Cubic

from conftest import TinyNet


def _train(model, pruner, steps, seed=0):
    """``steps`` SGD steps on random data through the pruner's lifecycle."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.5, momentum=0.9))
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    pruner.epoch_end()


def _pruners():
    """(name, factory) of pruners whose pattern moves while they learn."""
    x = torch.randn(2, 3, 8, 8)
    return [
        ("DPP 2:4", lambda m: hp.DPP(m, "2:4", noise_scale=1.0, seed=0)),
        ("DPP filter", lambda m: hp.DPP(m, "filter", k=0.5, noise_scale=1.0, seed=0)),
        ("DPP map", lambda m: hp.DPP(m, "map", k=0.5, noise_scale=1.0, seed=0,
                                     example_inputs=x)),
        ("PSP fixed", lambda m: hp.PSP(m, "channel", variant="fixed", sparsity=0.5)),
        ("PSP map", lambda m: hp.PSP(m, "map", variant="fixed", sparsity=0.5,
                                     example_inputs=x)),
        ("Magnitude cubic", lambda m: hp.Magnitude(m, "element", 0.8,
                                                   schedule=Cubic(0, 40, every=2))),
    ]


@pytest.mark.parametrize("name, make", _pruners(), ids=[n for n, _ in _pruners()])
def test_after_fix_pattern_training_keeps_the_pattern_and_trains_only_weights(name, make):
    torch.manual_seed(0)
    model = TinyNet()
    pruner = make(model)
    _train(model, pruner, 5)
    pruner.fix_pattern()
    assert pruner.pattern_fixed
    before = pruner.masks()
    own = [p for g in pruner.param_groups()[1:] for p in g["params"]]
    # the groups stay (an optimizer's must not change mid-run), their parameters are frozen
    assert all(not p.requires_grad for p in own)
    frozen = [p.detach().clone() for p in own]
    assert float(pruner.penalty()) == 0.0
    # the weights a training forward multiplies are those of eval mode (DPP: no sample)
    model.eval()
    weights = {n: l.effective_weight().detach().clone() for n, l in pruner.layers.items()}
    model.train()
    assert all(torch.equal(l.effective_weight(), weights[n])
               for n, l in pruner.layers.items())
    _train(model, pruner, 12, seed=1)
    after = pruner.masks()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, q) for p, q in zip(own, frozen, strict=True))
    pruner.finalize()
    assert all(torch.equal(pruner.masks()[n], before[n]) for n in before)


def test_dpp_training_forward_is_the_eval_forward_once_fixed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = hp.DPP(model, "2:4", noise_scale=5.0, seed=0)
    x = torch.randn(8, 16)
    model.train()
    sampled = [model(x) for _ in range(3)]
    assert not all(torch.equal(sampled[0], s) for s in sampled[1:])  # noise moves the mask
    pruner.fix_pattern()
    model.eval()
    expected = model(x)
    model.train()
    assert all(torch.equal(model(x), expected) for _ in range(3))
    assert all(not r.logits.requires_grad for r in pruner._rows().values())


def test_psp_without_revival_keeps_exactly_its_count_while_ranking():
    # an off group cannot come back, so it must not take a kept group's place in the ranking
    torch.manual_seed(0)
    model = TinyNet()
    pruner = hp.PSP(model, "channel", variant="fixed", sparsity=0.5, revive=False,
                    rank_by="scaled", schedule=Cubic(0, 10, every=1))
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        for layer in pruner.layers.values():  # alphas and weights moved at random
            layer.parametrization.alpha.data.uniform_(0.0, 2.0, generator=g)
        pruner.step()
    for layer in pruner.layers.values():
        keep = layer.parametrization.keep
        assert int(keep.sum()) == keep.numel() - round(0.5 * keep.numel())


def test_fix_pattern_twice_and_after_finalize_are_errors():
    pruner = hp.DPP(TinyNet(), "2:4")
    pruner.fix_pattern()
    with pytest.raises(LifecycleError, match="already called"):
        pruner.fix_pattern()
    pruner.finalize()
    with pytest.raises(LifecycleError, match="after finalize"):
        pruner.fix_pattern()


def test_a_fixed_state_loads_fixed_and_an_unfixed_one_is_refused_by_a_fixed_pruner():
    torch.manual_seed(0)
    a = TinyNet()
    pa = hp.DPP(a, "2:4", noise_scale=1.0, seed=0)
    _train(a, pa, 3)
    unfixed = pa.state_dict()
    pa.fix_pattern()
    fixed = pa.state_dict()
    b = TinyNet()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "parametrizations" not in k},
                      strict=False)
    pb = hp.DPP(b, "2:4", noise_scale=1.0, seed=0)
    pb.load_state_dict(fixed)
    assert pb.pattern_fixed
    assert all(not p.requires_grad for g in pb.param_groups()[1:] for p in g["params"])
    assert all(torch.equal(pa.masks()[n], pb.masks()[n]) for n in pa.masks())
    with pytest.raises(LifecycleError, match="before fix_pattern"):
        pb.load_state_dict(unfixed)
