"""hp.export_model's check is relative to the output's scale: rounding-sized drift of large
outputs passes (an absolute 1e-5 failed it), the same drift under a tighter rtol does not."""

import pytest
import torch
from torch import nn

import hwprune as hp
from hwprune.deploy.export import ExportError

SCALE = 1e6  # outputs this large differ by far more than 1e-5 through float32 rounding alone


class LargeDrifting(nn.Module):
    """Large outputs that drift by a relative 1e-6 per call (a constant baked in when traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) * (SCALE * (1 + 1e-6 * self.calls))


@pytest.mark.parametrize("fmt", ["torch.export", "torchscript"])
def test_export_check_is_relative_to_the_output_scale(fmt):
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    model = LargeDrifting()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert float((first - second).abs().max()) > 1e-5  # an absolute 1e-5 would refuse it
    hp.export_model(LargeDrifting(), x, format=fmt)  # relative drift 1e-6 < RTOL: passes
    with pytest.raises(ExportError, match="output scale"):
        hp.export_model(LargeDrifting(), x, format=fmt, rtol=1e-9)
