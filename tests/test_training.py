"""The shared training helpers: BatchNorm recalibration measures the model, not the lag."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from hwprune.training import make_loader, recalibrate_batchnorm


def test_recalibrated_batchnorm_matches_the_data_it_normalises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    data = TensorDataset(torch.randn(64, 3, 8, 8) * 3 + 1, torch.zeros(64, dtype=torch.long))
    model.train()
    model(data.tensors[0])  # statistics of the original weights
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # what decaying scales do: the conv output shrinks 100x
    bn = model[1]
    stale_var = bn.running_var.clone()
    used = recalibrate_batchnorm(model, make_loader(data, 16, shuffle=False), batches=3)
    assert used == 3 and bn.momentum == 0.1 and model.training  # settings restored
    with torch.no_grad():
        h = model[0](data.tensors[0][:48])
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    # cumulative average of the three batches' unbiased variances
    batch_vars = torch.stack([h[i:i + 16].var((0, 2, 3), unbiased=True) for i in (0, 16, 32)])
    assert torch.allclose(bn.running_var, batch_vars.mean(0), rtol=1e-4)
    assert (bn.running_var < stale_var / 100).all()
