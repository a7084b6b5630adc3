"""hp.fold_batchnorm: inference BatchNorm folded into the layer before it, function kept."""

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.models import SmallCNN, resnet20

from conftest import _max_diff, _params, _randomize_bn


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_every_conv_bn_pair_of_a_resnet_folds_and_the_function_stays():
    torch.manual_seed(0)
    model = _randomize_bn(resnet20())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    folded = hp.fold_batchnorm(model, x)
    assert type(folded) is type(model) and not _bns(folded)
    assert _max_diff(model, folded, torch.randn(3, 3, 16, 16)) < 1e-4  # not only the example
    # each of the 19 BatchNorms' weight and bias (2 C) become its conv's bias (C)
    assert _params(model) - _params(folded) == sum(bn.num_features for bn in _bns(model))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # untouched


def test_a_pruned_pattern_survives_folding_after_shrink():
    torch.manual_seed(0)
    model = _randomize_bn(resnet20())
    with torch.no_grad():
        model.layer2[1].conv2.weight.zero_()  # a whole branch: shrink rewrites the graph
    pruned = hp.Magnitude(model, "2:4", targets="layer1.*.conv1").finalize().eval()
    x = torch.randn(2, 3, 16, 16)
    small = hp.shrink(pruned, x)
    assert isinstance(small, torch.fx.GraphModule)
    folded = hp.fold_batchnorm(small, x)
    assert not _bns(folded)
    assert _max_diff(pruned, folded, torch.randn(2, 3, 16, 16)) < 1e-4
    for i in range(3):  # zeros stay zeros: folding only scales each filter
        w = folded.get_submodule(f"layer1.{i}.conv1").weight
        groups = (w.detach().permute(0, 2, 3, 1).reshape(-1, 4) != 0).sum(1)
        assert (groups <= 2).all()


class _Shared(nn.Module):
    """Pairs that must not fold: a conv whose output also feeds an addition, a BatchNorm
    without running statistics, and a linear layer's 3-d output."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.c3, self.b3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc, self.b4 = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.c1(x)
        y = self.b1(y) + y  # c1's output has two users
        y = self.b3(self.c3(self.b2(self.c2(y))))
        return self.b4(self.fc(y.flatten(2).transpose(1, 2)).transpose(1, 2))


def test_only_exact_pairs_fold():
    model = _Shared().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b3, model.b4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 4)
    folded = hp.fold_batchnorm(model, x)
    assert [type(m) for m in (folded.b1, folded.b2, folded.b3, folded.b4)] == [
        nn.BatchNorm2d, nn.BatchNorm2d, nn.Identity, nn.BatchNorm1d]
    assert _max_diff(model, folded, torch.randn(2, 3, 4, 4)) < 1e-5


def test_a_linear_then_batchnorm1d_on_features_folds():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU())
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 1, 8, 8)
    folded = hp.fold_batchnorm(model.eval(), x)
    assert isinstance(folded[2], nn.Identity)
    assert _max_diff(model, folded, x) < 1e-5


def test_untraceable_models_and_wrong_results_are_refused(monkeypatch):
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(hp.FoldError, match="cannot trace"):
        hp.fold_batchnorm(Branchy(), torch.randn(2))
    with pytest.raises(hp.FoldError, match="tensor or a tuple of tensors"):
        hp.fold_batchnorm(SmallCNN(), [1, 2])
    fold_mod = __import__("sys").modules["hwprune.deploy.fold"]
    monkeypatch.setattr(fold_mod, "fuse_conv_bn_eval", lambda conv, bn: conv)  # forget bn
    with pytest.raises(hp.FoldError, match="refusing"):
        hp.fold_batchnorm(_randomize_bn(SmallCNN(width=8)), torch.randn(2, 1, 8, 8))
