"""A pruned filter prunes its feature map: the filter's gate also gates the layer's bias and the
BatchNorm that directly follows it (``hwprune.methods.filter_maps``), so behind a BatchNorm with
a non-zero shift the pruned map is exactly zero in training and eval, and ``finalize()`` +
``hp.shrink`` remove the filter, its BatchNorm entries and the next conv's input channels even
where that conv pads. Checked for every method's filter structure."""

import warnings

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.methods.filter_maps import UngatedNormWarning

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))


class Chain(nn.Module):
    """conv -> BatchNorm (shift 0.5) -> ReLU -> conv (padding=1) -> head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        nn.init.constant_(self.bn1.bias, 0.5)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


def _magnitude(m):
    return hp.Magnitude(m, "filter", 0.5, targets=["conv1"])


def _psp(m):
    return hp.PSP(m, "filter", variant="fixed", sparsity=0.5, targets=["conv1"])


def _dpp(m):
    return hp.DPP(m, "filter", k=4, targets=["conv1"])


def _admm(m):
    return hp.ADMM(m, block="filter", unify=0.0, zero=0.5, rho=0.05, admm_interval=1,
                   retrain_at=3, targets=["conv1"])


METHODS = {"Magnitude": _magnitude, "PSP": _psp, "DPP": _dpp, "ADMM": _admm,
           # k of every run of n consecutive filters: whole filters too
           "Magnitude-2:4@filter": lambda m: hp.Magnitude(m, "2:4@filter", targets=["conv1"]),
           "DPP-2:4@filter": lambda m: hp.DPP(m, "2:4@filter", targets=["conv1"])}


def _train(model, pruner, steps=4):
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    model.train()
    for i in range(steps):
        out = model(X + 0.1 * torch.randn(X.shape, generator=torch.Generator().manual_seed(i)))
        loss = out.pow(2).mean() + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


def _bn_output(model, mode):
    """The BatchNorm's output in ``mode`` ("train" or "eval")."""
    seen = []
    handle = model.bn1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    model.train(mode == "train")
    with torch.no_grad():
        model(X)
    handle.remove()
    return seen[0]


def _pruned_filters(pruner):
    return ~pruner.masks()["conv1.weight"].flatten(1).any(1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_pruned_filter_is_a_zero_map_behind_batchnorm(method, mode):
    torch.manual_seed(0)
    model = Chain()
    pruner = METHODS[method](model)
    _train(model, pruner)
    pruned = _pruned_filters(pruner)
    assert int(pruned.sum()) == 4
    if method.startswith("DPP") and mode == "train":  # a fresh sample: the one this forward drew
        out = _bn_output(model, "train")
        pruned = pruner.layers["conv1.weight"].parametrization.output_gate() == 0
        assert int(pruned.sum()) == 4
    else:
        out = _bn_output(model, mode)
    assert torch.equal(out[:, pruned], torch.zeros_like(out[:, pruned]))
    assert out[:, ~pruned].abs().amax() > 0.1  # the kept maps carry signal


@pytest.mark.parametrize("method", METHODS)
def test_finalize_and_shrink_remove_the_filter_its_batchnorm_entries_and_the_readers(method):
    torch.manual_seed(0)
    model = Chain()
    pruner = METHODS[method](model)
    _train(model, pruner)
    pruned = _pruned_filters(pruner)
    model.eval()
    with torch.no_grad():
        expected = model(X)
    pruner.finalize()
    for name in ("weight", "bias"):  # baked in: the BatchNorm entries of pruned maps are 0
        assert not getattr(model.bn1, name)[pruned].any()
        assert type(getattr(model.bn1, name)) is nn.Parameter
    assert not model.conv1.bias[pruned].any()
    assert sorted(model.state_dict()) == sorted(Chain().state_dict())
    result = hp.shrink(model, X, return_result=True)
    assert result.layers["conv1"] == ((3, 8), (3, 4))
    assert result.layers["bn1"] == ((8, 8), (4, 4))
    assert result.layers["conv2"] == ((8, 6), (4, 6))
    with torch.no_grad():
        got = result.model(X)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_conv_without_batchnorm_takes_its_bias_along():
    class ConvReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
            nn.init.constant_(self.conv1.bias, 0.5)

        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x))).mean((2, 3))

    model = ConvReLU()
    pruner = hp.Magnitude(model, "filter", 0.5, targets=["conv1"])
    assert pruner.ties == {"conv1.weight": [(model.conv1, "bias")]}
    pruned = _pruned_filters(pruner)
    with torch.no_grad():
        out = model.conv1(X)
    assert not out[:, pruned].any()
    pruner.finalize()
    assert hp.shrink(model, X, return_result=True).layers["conv2"] == ((8, 4), (4, 4))


def test_linear_then_batchnorm1d_is_gated_and_other_structures_are_not():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn = nn.Linear(5, 8), nn.BatchNorm1d(8)
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.bn(self.fc1(x))))

    model = MLP()
    pruner = hp.Magnitude(model, "filter", 0.5, targets=["fc1"])
    assert pruner.ties["fc1.weight"] == [(model.fc1, "bias"), (model.bn, "weight"),
                                         (model.bn, "bias")]
    assert hp.Magnitude(MLP(), "channel", 0.5, targets=["fc2"]).ties == {}
    assert hp.Magnitude(MLP(), "element", 0.5, targets=["fc1"]).ties == {}


class SharedNorm(nn.Module):
    """One BatchNorm normalises two convs' outputs: gating it for one would zero the other."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return (self.bn(self.a(x)) + self.bn(self.b(x))).mean((2, 3))


class PlainNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


class Untraceable(Chain):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)


@pytest.mark.parametrize("model, targets, norm, named, why", [
    (SharedNorm, ["a"], "bn", "bn", "also normalises other tensors"),
    (PlainNorm, ["conv"], "bn", "bn", "no affine scale and shift"),
    (Untraceable, ["conv1"], "bn1", "every BatchNorm", "torch.fx cannot trace Untraceable"),
])
def test_a_batchnorm_that_cannot_be_gated_is_named_in_a_warning(model, targets, norm, named,
                                                                 why):
    with pytest.warns(UngatedNormWarning, match=why) as record:
        pruner = hp.Magnitude(model(), "filter", 0.5, targets=targets)
    assert named in record[0].message.reasons
    bn = pruner.model.get_submodule(norm)
    assert all(m is not bn for tied in pruner.ties.values() for m, _ in tied)
    assert not nn.utils.parametrize.is_parametrized(bn)


def test_a_model_without_batchnorm_is_not_traced():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x if x.sum() > 0 else -x))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = hp.Magnitude(Untraceable(), "filter", 0.5, targets=["fc1"])
    assert pruner.ties == {"fc1.weight": [(pruner.model.fc1, "bias")]}


def test_a_failed_construction_leaves_the_batchnorm_as_it_was():
    class NoGate(nn.Module):
        def forward(self, w):
            return w

    class Gateless(hp.Magnitude):
        def _make_parametrization(self, layer):
            return NoGate()

    model = Chain()
    with pytest.raises(hp.ConfigError, match="output_gate"):
        Gateless(model, "filter", 0.5, targets=["conv1"])
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())


def test_psp_filter_alphas_scale_the_map_so_batchnorm_does_not_cancel_them():
    # the alpha gates the BatchNorm too: the map is alpha * BN(conv(x)), and the task's
    # gradient reaches the alpha in training mode
    torch.manual_seed(0)
    model = Chain()
    pruner = hp.PSP(model, "filter", targets=["conv1"])
    model.train()
    model(X).pow(2).mean().backward()
    assert pruner.alphas(live=True)["conv1.weight"].grad.abs().max() > 1e-4
