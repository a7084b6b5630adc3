"""structure="map": coupled feature maps found from the traced graph, pruned whole by Magnitude
and removed whole by shrink. The groups are checked against hand counts on small models written
here; the pruned models must keep their function through shrink, lose exactly the removed
maps' weights, and (on CIFAR ResNets with projection shortcuts) lose more MACs than "channel"."""

import copy

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.deploy import feature_maps
from hwprune.errors import ConfigError, StructureError, TargetError
from hwprune.models import resnet_cifar
from hwprune.structures import FeatureMap, parse_structure

pytestmark = pytest.mark.usefixtures("one_thread")


def _head(x, fc):
    return fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class Residual(nn.Module):
    """stem (8 maps) -> a block with an identity add (6 inner maps) -> fc: the stem's maps, the
    block's conv2/bn2 and the fc's columns are one residual stream."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return _head(torch.relu(x + y), self.fc)


class Dense(nn.Module):
    """DenseNet-like: each layer's maps are concatenated after its input's."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_a = nn.Conv2d(4, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(7, 3, 3, padding=1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x0 = self.conv0(x)
        c1 = torch.cat([x0, self.conv_a(torch.relu(x0))], 1)
        c2 = torch.cat([c1, self.conv_b(torch.relu(c1))], 1)
        return _head(c2, self.fc)


class Separable(nn.Module):
    """conv -> depthwise -> pointwise: the depthwise conv's maps are its input's."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        return _head(torch.relu(self.bn2(self.pw(x))), self.fc)


class FlatHead(nn.Module):
    """A conv's 4 maps flattened (16 positions each) into a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv0(x)).flatten(1))))


class Grouped(nn.Module):
    """A grouped conv (groups=2): a map is one channel of each group (a stripe)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.g, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.g(torch.relu(self.bn0(self.conv0(x))))))
        return _head(torch.relu(self.conv2(x)), self.fc)


X8, X4 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
MODELS = {"residual": (Residual, X8), "dense": (Dense, X8), "separable": (Separable, X8),
          "flat": (FlatHead, X4), "grouped": (Grouped, X8)}


def _by_family(maps):
    return {fam: len(ids) for fam, ids in maps.families().items()}


def _members(maps, where):
    g = next(g for g in maps.groups if g.where == where)
    return {(m.param, m.axis, m.index, m.writes) for m in g.members}


def test_residual_groups_are_the_stream_and_the_inner_maps():
    maps = feature_maps(Residual(), X8)
    stream = ("bn0.bias", "bn0.weight", "bn2.bias", "bn2.weight", "conv0.weight",
              "conv1.weight", "conv2.weight", "fc.weight")
    inner = ("bn1.bias", "bn1.weight", "conv1.weight", "conv2.weight")
    assert _by_family(maps) == {stream: 8, inner: 6}
    assert _members(maps, ("conv0", 3)) == {
        ("conv0.weight", 0, 3, True), ("bn0.weight", 0, 3, True), ("bn0.bias", 0, 3, True),
        ("conv1.weight", 1, 3, False), ("conv2.weight", 0, 3, True),
        ("bn2.weight", 0, 3, True), ("bn2.bias", 0, 3, True), ("fc.weight", 1, 3, False)}
    # the logits are the model's output
    assert len(maps.excluded) == 4
    assert {e.reason for e in maps.excluded} == {"reaches the model's output"}


def test_concatenated_maps_are_read_at_their_offsets():
    maps = feature_maps(Dense(), X8)
    assert len(maps.groups) == 4 + 3 + 3
    assert _members(maps, ("conv_a", 1)) == {
        ("conv_a.weight", 0, 1, True), ("conv_a.bias", 0, 1, True),
        ("conv_b.weight", 1, 4 + 1, False), ("fc.weight", 1, 4 + 1, False)}
    assert _members(maps, ("conv_b", 2)) == {
        ("conv_b.weight", 0, 2, True), ("conv_b.bias", 0, 2, True),
        ("fc.weight", 1, 7 + 2, False)}
    assert {("conv_a.weight", 1, 0, False), ("conv_b.weight", 1, 0, False)} <= \
        _members(maps, ("conv0", 0))


def test_a_depthwise_conv_ties_its_outputs_to_its_inputs():
    maps = feature_maps(Separable(), X8)
    first = ("bn0.bias", "bn0.weight", "bn1.bias", "bn1.weight", "conv0.weight", "dw.weight",
             "pw.weight")
    assert _by_family(maps) == {first: 8, ("bn2.bias", "bn2.weight", "fc.weight", "pw.weight"): 6}
    assert ("dw.weight", 0, 5, True) in _members(maps, ("conv0", 5))


def test_a_flattened_map_is_its_run_of_linear_columns():
    maps = feature_maps(FlatHead(), X4)
    assert len(maps.groups) == 4 + 5 and len(maps.excluded) == 3
    cols = {m.index for m in maps.groups[2].members if m.param == "fc1.weight"}
    assert cols == set(range(2 * 16, 3 * 16))


def test_a_grouped_conv_makes_one_map_of_the_same_channel_in_every_group():
    maps = feature_maps(Grouped(), X8)
    first = ("bn0.bias", "bn0.weight", "conv0.weight", "g.weight")
    second = ("bn1.bias", "bn1.weight", "conv2.weight", "g.weight")
    # 8 channels in 2 groups of 4: 4 stripes before and 4 after the grouped conv
    assert _by_family(maps) == {first: 4, second: 4,
                                ("conv2.bias", "conv2.weight", "fc.weight"): 6}
    # channel 1 and 5 (the second of each group) are one map, read by column 1 of g's weight
    assert _members(maps, ("conv0", 1)) == {
        ("conv0.weight", 0, 1, True), ("conv0.weight", 0, 5, True),
        ("bn0.weight", 0, 1, True), ("bn0.weight", 0, 5, True),
        ("bn0.bias", 0, 1, True), ("bn0.bias", 0, 5, True), ("g.weight", 1, 1, False)}
    assert ("g.weight", 0, 6, True) in _members(maps, ("g", 2))
    assert len(maps.excluded) == 4  # only the logits


def _shrunk(factory, x, **kw):
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # random BatchNorm statistics, so that BN is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    dense = copy.deepcopy(model)
    pruner = hp.Magnitude(model, "map", 0.5, example_inputs=x, **kw)
    masks = pruner.masks()
    pruned = pruner.finalize()
    result = hp.shrink(pruned, x, return_result=True)
    return dense, pruned, result, masks


@pytest.mark.parametrize("name", sorted(MODELS))
def test_magnitude_map_then_shrink_keeps_the_function_and_removes_exactly_the_maps(name):
    factory, x = MODELS[name]
    dense, pruned, result, masks = _shrunk(factory, x)
    with torch.no_grad():
        ref, got = pruned(x), result.model(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    zeroed = sum(int((~m).sum()) for m in masks.values())
    assert zeroed > 0
    assert result.params_before - result.params_after == zeroed
    assert result.kept == []  # every zeroed map went
    before = hp.report(dense, x).total["model_macs"]
    assert hp.report(result.model, x).total["model_macs"] < before


def test_every_member_of_a_removed_map_is_zero_and_bn_bias_too():
    _, pruned, _, masks = _shrunk(Residual, X8)
    removed = ~masks["bn2.bias"]
    assert int(removed.sum()) == 4  # half of the stream's 8 maps
    assert bool((pruned.bn2.bias[removed] == 0).all())
    assert bool((pruned.fc.weight[:, removed] == 0).all())
    assert bool((pruned.conv1.weight[:, removed] == 0).all())


@pytest.mark.parametrize("kw", [{"scope": "global"}, {"norm": "l2"}])
def test_global_scope_and_l2_also_remove_whole_maps(kw):
    _, pruned, result, masks = _shrunk(Dense, X8, **kw)
    assert result.kept == []
    assert result.params_before - result.params_after == sum(int((~m).sum())
                                                             for m in masks.values())


def test_targets_restrict_the_maps_to_the_selected_weights():
    pruner = hp.Magnitude(Residual(), "map", 0.5, example_inputs=X8, targets=["conv1", "conv2"])
    # only the inner maps touch no other conv/linear weight
    assert set(pruner.layers) == {"conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight"}
    assert any("targets=" in e.reason for e in pruner.maps.excluded)


def _zero_rows_or_columns(model):
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            w = m.weight.detach().flatten(2)
            if not w.any(-1).any(1).all() or not w.any(-1).any(0).all():
                bad.append(name)
    return bad


@pytest.mark.parametrize("depth", [20, 56])
def test_on_cifar_resnets_map_removes_more_macs_than_channel(depth):
    x = torch.randn(1, 3, 32, 32)
    macs = {}
    for structure in ("map", "channel"):
        torch.manual_seed(0)
        model = resnet_cifar(depth, shortcut="B").eval()
        kw = {"example_inputs": x} if structure == "map" else {}
        pruned = hp.Magnitude(model, structure, 0.5, **kw).finalize()
        shrunk = hp.shrink(pruned, x)
        macs[structure] = hp.report(shrunk, x).total["model_macs"]
        if structure == "map":
            assert _zero_rows_or_columns(shrunk) == []
    assert macs["map"] < macs["channel"]


def test_methods_that_do_not_prune_maps_refuse_them_by_name():
    model = Residual()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"(?s)ADMM does not prune structure 'map'.*DPP"):
        hp.ADMM(model, block="map", unify=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_map_needs_example_inputs():
    with pytest.raises(ConfigError, match="example_inputs"):
        hp.Magnitude(Residual(), "map", 0.5)


def test_a_model_without_removable_maps_is_refused():
    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(TargetError, match="no feature map"):
        hp.Magnitude(OneLayer(), "map", 0.5, example_inputs=torch.randn(2, 4))


def test_the_structure_parses_and_refuses_a_kofn_base():
    assert parse_structure("map") == FeatureMap(0)
    assert str(parse_structure("map@1")) == "map@1"
    with pytest.raises(StructureError):
        parse_structure("2:4@map")


def test_a_map_pruner_resumes_exactly_and_reports_its_weights_as_maps():
    pruner = hp.Magnitude(Residual(), "map", 0.5, example_inputs=X8)
    other = hp.Magnitude(Residual(), "map", 0.25, example_inputs=X8)
    other.load_state_dict(pruner.state_dict())
    assert pruner.masks().keys() == other.masks().keys()
    assert all(torch.equal(m, other.masks()[n]) for n, m in pruner.masks().items())
    rows = {r.name: r.structure for r in hp.report(pruner.model, X8, pruner=pruner).rows}
    assert rows == {"conv0.weight": "map", "conv1.weight": "map", "conv2.weight": "map",
                    "fc.weight": "map@1"}
