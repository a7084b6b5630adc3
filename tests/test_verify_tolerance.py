"""shrink's, fold's and export's own checks are relative to the output's scale: a wrong model
with tiny outputs is caught, where an absolute tolerance passed it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.deploy.verify import RTOL, compare_outputs

SCALE = 1e-8  # a randomly initialized deep network's outputs can be this small


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_a_broken_weight_under_tiny_outputs_is_caught():
    model, x = _net().eval(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        reference = model(x) * SCALE
        model[5].weight[0, 0] += 1.0  # one wrong weight
        got = model(x) * SCALE
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4)  # the old check passed it
    check = compare_outputs([got], [reference])
    assert check.same_shapes and not check.close
    assert check.scale == float(reference.abs().max())
    # rounding-sized differences at any scale pass
    for scale in (SCALE, 1.0, 1e6):
        ref = torch.randn(3, 5) * scale
        assert compare_outputs([ref * (1 + RTOL / 10)], [ref]).close


def test_zero_nan_and_integer_outputs():
    zeros = torch.zeros(4)
    assert compare_outputs([zeros.clone()], [zeros]).close
    assert not compare_outputs([zeros + 1e-30], [zeros]).close  # no absolute floor by default
    assert compare_outputs([zeros + 1e-30], [zeros], atol=1e-20).close
    assert not compare_outputs([torch.tensor([float("nan")])], [torch.tensor([1.0])]).close
    labels = torch.tensor([1, 2, 3])
    assert compare_outputs([labels.clone()], [labels]).close
    assert not compare_outputs([labels + 1], [labels]).close
    assert not compare_outputs([labels[:2]], [labels]).same_shapes


class Drifts(nn.Module):
    """Tiny outputs that change from one call to the next (a constant baked in when traced):
    a rewritten or exported copy computes something else."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.bn(self.fc(x)) * (SCALE * self.calls)


def test_shrink_fold_and_export_refuse_a_copy_that_differs_at_a_tiny_scale():
    x = torch.randn(2, 4)
    with pytest.raises(hp.ShrinkError, match="output scale"):
        hp.shrink(Drifts(), x)
    with pytest.raises(hp.FoldError, match="output scale"):
        hp.fold_batchnorm(Drifts(), x)
    with pytest.raises(hp.deploy.export.ExportError, match="output scale"):
        hp.export_model(Drifts(), x, format="torchscript")
