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


@pytest.mark.parametrize("fmt,suffix", [("torch.export", "pt2"), ("torchscript", "pt")])
def test_a_program_that_fails_its_check_leaves_no_file(tmp_path, fmt, suffix):
    x = torch.randn(2, 4)
    path = tmp_path / f"m.{suffix}"
    path.write_bytes(b"the old file")  # an earlier program under that name stays as it was
    with pytest.raises(ExportError, match="output scale"):
        hp.export_model(LargeDrifting(), x, path, format=fmt, rtol=1e-9)
    assert path.read_bytes() == b"the old file"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file either
    hp.export_model(LargeDrifting(), x, path, format=fmt)  # a good one replaces it
    assert path.read_bytes() != b"the old file"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
