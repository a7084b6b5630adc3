"""hp.PSP: the alpha gradient, decay finds the known answer, the variants, finalize is exact,
it runs on the CIFAR ResNets (option A and B) and a DenseNet, bad input is refused."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwprune as hp
from hwprune.errors import ConfigError, StructureError
from hwprune.models import densenet_cifar, resnet20
from hwprune.schedules import Linear

from conftest import TinyNet, fit_full_batch


def test_alpha_gradient_is_the_structure_sum_of_dE_dq_times_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    pruner = hp.PSP(model, "channel", targets=["1"])
    scale = pruner.layers["1.weight"].parametrization
    with torch.no_grad():
        scale.alpha.copy_(torch.tensor([0.5, -1.5, 2.0]))
    x = torch.randn(5, 2, 4, 4)
    model(x).pow(2).sum().backward()

    # by hand: q = alpha ⊙ W as a leaf, dE/dalpha_c = sum over W[:, c] of dE/dq * w
    w = pruner.layers["1.weight"].original().detach()
    q = (w * torch.tensor([0.5, -1.5, 2.0]).view(1, 3, 1, 1)).requires_grad_()
    h = model[0](x)
    out = model[3](F.conv2d(h, q, model[1].bias).flatten(1))
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q)
    expected = (dq * w).sum(dim=(0, 2, 3))
    assert torch.allclose(scale.alpha.grad, expected, rtol=1e-5, atol=1e-6)


def _regression_problem(seed=0):
    """y depends on input features 0..2 only; features 3..9 are noise the model should drop."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 10, generator=g)
    y = x[:, :3] @ torch.tensor([[1.5], [-2.0], [1.0]])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
    return x, y, model


@pytest.mark.parametrize("variant", ["decay", "l1"])
def test_alpha_regulariser_drives_unused_channels_to_zero(variant):
    # no normalisation here, so the alphas' absolute size means something: the paper's rule
    x, y, model = _regression_problem()
    pruner = hp.PSP(model, "channel", alpha_decay=0.05 if variant == "decay" else 0.005,
                    threshold=1e-2, variant=variant, threshold_start=200,
                    threshold_mode="absolute")
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    fit_full_batch(model, pruner, opt, x, y, 1500)
    alpha = pruner.alphas()["0.weight"].abs()
    kept = pruner.masks()["0.weight"].any(dim=0)
    assert kept.tolist() == [True] * 3 + [False] * 7, alpha
    assert alpha[:3].min() > 0.1 and alpha[3:].max() < 1e-2
    assert F.mse_loss(model(x), y).item() < 0.05


def test_l1_penalty_is_alpha_decay_times_the_alpha_l1_norm(tiny):
    pruner = hp.PSP(tiny, "filter", alpha_decay=0.01, variant="l1")
    with torch.no_grad():
        for a in pruner.alphas(live=True).values():
            a.uniform_(-2, 2)
    expected = 0.01 * sum(a.abs().sum() for a in pruner.alphas().values())
    assert torch.isclose(pruner.penalty(), expected)
    decay_groups = pruner.param_groups(lr=0.1, weight_decay=5e-4)
    assert decay_groups[0]["weight_decay"] == 5e-4 and decay_groups[1]["weight_decay"] == 0.0
    assert hp.PSP(TinyNet(), "filter", alpha_decay=0.01).penalty().item() == 0.0


def test_alphas_have_their_own_group_with_alpha_decay(tiny):
    pruner = hp.PSP(tiny, "channel", alpha_decay=3e-3, alpha_lr=0.5)
    groups = pruner.param_groups(lr=0.1, momentum=0.9, weight_decay=5e-4)
    alphas = {id(a) for a in pruner.alphas(live=True).values()}
    assert {id(p) for p in groups[1]["params"]} == alphas
    assert groups[1]["weight_decay"] == 3e-3 and groups[1]["lr"] == 0.5
    assert groups[1]["momentum"] == 0.9
    assert not alphas & {id(p) for p in groups[0]["params"]}
    assert alphas <= {id(p) for p in tiny.parameters()}  # model.parameters() sees them too


def test_fixed_variant_keeps_the_largest_alphas_to_the_scheduled_sparsity(tiny):
    pruner = hp.PSP(tiny, "filter", variant="fixed", sparsity=0.5,
                    schedule=Linear(0, 2), targets=["conv2", "conv3"])
    with torch.no_grad():
        for a in pruner.alphas(live=True).values():
            a.copy_(torch.linspace(2, 0.1, a.numel()))
    pruner.step()
    assert math.isclose(pruner.sparsity(), 0.25)
    pruner.step()
    for name, a in pruner.alphas().items():
        kept = pruner.masks()[name].flatten(1).any(1)
        assert kept.sum() == a.numel() // 2
        assert a[kept].min() > a[~kept].max()


def test_fixed_variant_breaks_alpha_ties_by_weight_norm(tiny):
    pruner = hp.PSP(tiny, "filter", variant="fixed", sparsity=0.25, targets=["conv3"])
    pruner.step()  # alphas are all still 1: the ranking falls back to the filters' norms
    norms = pruner.layers["conv3.weight"].original().detach().flatten(1).norm(dim=1)
    kept = pruner.masks()["conv3.weight"].flatten(1).any(1)
    assert norms[kept].min() > norms[~kept].max()


def test_fixed_variant_ranked_by_scaled_alpha_weighs_alpha_by_the_group_norm(tiny):
    fresh = copy.deepcopy(tiny)
    pruner = hp.PSP(tiny, "filter", variant="fixed", sparsity=0.5, rank_by="scaled",
                    targets=["conv3"])
    layer = pruner.layers["conv3.weight"]
    norms = layer.original().detach().flatten(1).norm(dim=1)
    # alphas that favour the small-norm filters, but not by enough to outweigh the norms
    alpha = 1.0 + 1e-3 * (norms.max() - norms) / (norms.max() - norms.min())
    with torch.no_grad():
        pruner.alphas(live=True)["conv3.weight"].copy_(alpha)
    pruner.step()
    kept = pruner.masks()["conv3.weight"].flatten(1).any(1)
    assert kept.sum() == norms.numel() // 2
    q = alpha * norms  # the filters' size in the layer's product alpha * W
    assert q[kept].min() > q[~kept].max()
    # the paper's rule ranks by |alpha| alone and keeps the opposite half
    plain = hp.PSP(fresh, "filter", variant="fixed", sparsity=0.5,
                   targets=["conv3"])
    with torch.no_grad():
        plain.alphas(live=True)["conv3.weight"].copy_(alpha)
    plain.step()
    assert not (plain.masks()["conv3.weight"].flatten(1).any(1) & kept).any()


def _set_alpha(pruner, name, index, value):
    with torch.no_grad():
        pruner.alphas(live=True)[name][index] = value


@pytest.mark.parametrize("revive", [True, False])
def test_pruned_groups_come_back_only_when_revive_is_on(tiny, revive):
    pruner = hp.PSP(tiny, "filter", threshold=0.05, revive=revive, targets=["conv3"])
    _set_alpha(pruner, "conv3.weight", 2, 0.01)
    pruner.step()
    assert not pruner.masks()["conv3.weight"][2].any()
    _set_alpha(pruner, "conv3.weight", 2, 0.2)  # as if its gradient pushed it back up
    pruner.step()
    assert pruner.masks()["conv3.weight"][2].all() == revive


def test_thresholding_starts_when_asked(tiny):
    pruner = hp.PSP(tiny, "filter", threshold_start=3, targets=["conv3"])
    _set_alpha(pruner, "conv3.weight", 0, 0.0)
    for expected_on in (True, True, False):
        pruner.step()
        assert pruner.masks()["conv3.weight"][0].all() == expected_on


def test_a_layer_keeps_its_best_group_and_stays_finite(tiny, x8):
    pruner = hp.PSP(tiny, "channel", targets=["conv3"], threshold_mode="absolute")
    with torch.no_grad():
        pruner.alphas(live=True)["conv3.weight"].copy_(torch.linspace(1e-3, 5e-3, 16))
    pruner.step()
    kept = pruner.masks()["conv3.weight"].any(dim=(0, 2, 3))
    assert kept.tolist() == [False] * 15 + [True]
    tiny.train()
    assert torch.isfinite(tiny(x8)).all()


def test_layer_structure_can_remove_a_whole_layer(tiny):
    # one alpha per layer: the relative rule compares the gates of all the layers
    pruner = hp.PSP(tiny, "layer", targets=["conv2", "conv3"])
    _set_alpha(pruner, "conv3.weight", 0, 1e-3)
    pruner.step()
    assert not pruner.masks()["conv3.weight"].any()
    assert pruner.masks()["conv2.weight"].all()
    _set_alpha(pruner, "conv2.weight", 0, 0.1)  # both shrank: conv3 is still under 5 % of conv2
    pruner.step()
    assert pruner.masks()["conv2.weight"].all() and not pruner.masks()["conv3.weight"].any()


@pytest.mark.parametrize("structure", ["channel", "column", "filter", "kernel", "layer"])
def test_finalize_folds_alpha_exactly(tiny, x8, structure):
    pruner = hp.PSP(tiny, structure, targets=["conv2", "conv3"])
    with torch.no_grad():
        for a in pruner.alphas(live=True).values():
            a.uniform_(-1.5, 1.5)
            a[0] = 0.001  # below threshold: off
    pruner.step()
    tiny.eval()
    y = tiny(x8)
    masks = pruner.masks()
    extras = pruner.layer_extras()
    model = pruner.finalize()
    assert torch.equal(model(x8), y)
    for name, mask in masks.items():
        assert torch.equal(model.get_parameter(name) != 0, mask)
    assert pruner.layer_extras() == extras and "alpha" in extras["conv2.weight"]


def _train_a_few_steps(model, pruner, steps=3):
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9, weight_decay=5e-4))
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        assert torch.isfinite(loss)


VARIANTS = [
    ("decay", lambda m, s: hp.PSP(m, s, alpha_decay=1e-3)),
    ("l1", lambda m, s: hp.PSP(m, s, alpha_decay=1e-4, variant="l1")),
    ("fixed", lambda m, s: hp.PSP(m, s, variant="fixed", sparsity=0.5)),
    ("magnitude-l1", lambda m, s: hp.Magnitude(m, s, 0.5, norm="l1")),
]


def _zoo():
    return {"resnet20-A": lambda: resnet20(), "resnet20-B": lambda: resnet20(shortcut="B"),
            "densenet": lambda: densenet_cifar(depth=10, growth_rate=4)}


@pytest.mark.parametrize("arch", sorted(_zoo()))
@pytest.mark.parametrize("structure", ["channel", "column"])
@pytest.mark.parametrize("variant", [v for v, _ in VARIANTS])
def test_variants_run_on_the_cifar_zoo(arch, structure, variant):
    torch.manual_seed(0)
    model = _zoo()[arch]()
    pruner = dict(VARIANTS)[variant](model, structure)
    _train_a_few_steps(model, pruner)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    y = model(x)
    pruner.finalize()
    assert torch.allclose(model(x), y, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha_decay=-1e-3), ConfigError, "alpha_decay"),
    (dict(threshold=0.0), ConfigError, "threshold"),
    (dict(threshold=-1), ConfigError, "threshold"),
    (dict(variant="fixed"), ConfigError, "needs sparsity"),
    (dict(variant="fixed", sparsity=1.0), ConfigError, "sparsity"),
    (dict(sparsity=0.5), ConfigError, "only to variant='fixed'"),
    (dict(variant="l2"), ConfigError, "variant must be"),
    (dict(structure="2:4"), ConfigError, "DPP"),
    (dict(structure="column", targets=["fc1"]), StructureError, "fc1.weight"),
    (dict(threshold_start=-1), ConfigError, "threshold_start"),
    (dict(variant="fixed", sparsity=0.5, rank_by="norm"), ConfigError, "rank_by must be"),
    (dict(rank_by="scaled"), ConfigError, "only to variant='fixed'"),
])
def test_bad_input_is_refused_at_construction(tiny, kwargs, error, match):
    kwargs.setdefault("structure", "channel")
    with pytest.raises(error, match=match):
        hp.PSP(tiny, **kwargs)


def test_layer_structure_gates_whole_residual_branches():
    torch.manual_seed(0)
    model = resnet20()
    x = torch.randn(2, 3, 32, 32)
    pruner = hp.PSP(model, "layer", targets="layer*.*.bn2")
    assert len(pruner.layers) == 9 and "layer2.1.bn2.weight" in pruner.masks()
    _set_alpha(pruner, "layer2.1.bn2.weight", 0, 1e-3)
    pruner.step()
    model.eval()
    y = model(x)

    pruner.finalize()
    assert not model.layer2[1].bn2.weight.any() and not model.layer2[1].bn2.bias.any()
    assert torch.equal(model(x), y)  # finalize folded the gate exactly

    # the branch is gone: the block's output is relu(shortcut(input))
    seen = {}
    model.layer2[1].register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    model(x)
    assert torch.allclose(seen["out"], torch.relu(model.layer2[1].shortcut(seen["inp"])))
    assert not pruner.masks()["layer2.1.bn2.weight"].any()
    assert pruner.masks()["layer2.0.bn2.weight"].all()


def test_layer_structure_gates_a_densenet_layer():
    torch.manual_seed(0)
    model = densenet_cifar(depth=10, growth_rate=4)
    pruner = hp.PSP(model, "layer", targets="block1.layers.0.conv1")
    _set_alpha(pruner, "block1.layers.0.conv1.weight", 0, 0.0)
    pruner.step()
    seen = {}
    model.block1.layers[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model(torch.randn(2, 3, 32, 32))
    assert seen["out"].shape[1] == 4 and not seen["out"].any()


def test_norm_layers_are_targets_only_for_psp_layer_gates(tiny):
    with pytest.raises(hp.TargetError, match="match no prunable weight"):
        hp.PSP(tiny, "channel", targets="bn2")
    with pytest.raises(hp.TargetError, match="match no prunable weight"):
        hp.Magnitude(tiny, "layer", 0.5, targets="bn2")
    assert [t for t in hp.PSP(TinyNet(), "layer").layers] == ["conv2.weight", "conv3.weight",
                                                               "fc1.weight"]


def test_the_default_threshold_is_relative(tiny):
    pruner = hp.PSP(tiny, "filter", targets=["conv3"])
    assert (pruner.threshold_mode, pruner.threshold) == ("relative", 0.05)
    assert hp.PSP(TinyNet(), "filter", threshold_mode="absolute").threshold == 0.01
    with torch.no_grad():  # decay shrank the layer 100x: nothing is off until one falls behind
        pruner.alphas(live=True)["conv3.weight"].fill_(1e-2)
    pruner.step()
    assert pruner.masks()["conv3.weight"].all()
    _set_alpha(pruner, "conv3.weight", 5, 1e-4)
    pruner.step()
    kept = pruner.masks()["conv3.weight"].flatten(1).any(1)
    assert kept.tolist() == [True] * 5 + [False] + [True] * 10


def test_relative_threshold_is_scale_free(tiny):
    pruner = hp.PSP(tiny, "filter", threshold=0.1, threshold_mode="relative", targets=["conv3"])
    with torch.no_grad():  # the whole layer shrank 1000x: relative sizes decide, not the scale
        pruner.alphas(live=True)["conv3.weight"].copy_(torch.linspace(0.05, 1.0, 16) * 1e-3)
    pruner.step()
    kept = pruner.masks()["conv3.weight"].flatten(1).any(1)
    assert kept.tolist() == [False] + [True] * 15  # only 0.05e-3 < 0.1 * max (1e-3)
    with pytest.raises(ConfigError, match="threshold_mode"):
        hp.PSP(TinyNet(), "filter", threshold_mode="percent")
