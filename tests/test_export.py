"""hp.export_model: torch.export / TorchScript / ONNX programs of shrunk models, checked."""

import importlib.util

import pytest
import torch

import hwprune as hp
from hwprune.deploy.export import export_model
from hwprune.errors import ConfigError
from hwprune.models import resnet20


@pytest.fixture(scope="module")
def shrunk():
    torch.manual_seed(0)
    model = resnet20().eval()  # option A: the channel-padding shortcut is in the program
    with torch.no_grad():
        for block in [*model.layer1, *model.layer2, *model.layer3]:
            block.conv2.weight[:, ::3] = 0
    x = torch.randn(2, 3, 16, 16)
    small = hp.shrink(model, x)
    assert small.get_submodule("layer1.0.conv1").out_channels == 10  # 6 of 16 are unused
    return model, small, x


@pytest.mark.parametrize("fmt,suffix", [("torch.export", "pt2"), ("torchscript", "pt")])
def test_roundtrip_through_a_file(shrunk, tmp_path, fmt, suffix):
    model, small, x = shrunk
    path = tmp_path / f"model.{suffix}"
    program = export_model(small, x, path, format=fmt)
    assert path.stat().st_size > 0
    run = program.module() if fmt == "torch.export" else program
    x2 = torch.randn(2, 3, 16, 16)  # the batch size it was traced with, new values
    with torch.no_grad():
        assert torch.allclose(run(x2), model(x2), atol=1e-4)
    params = sum(p.numel() for p in small.parameters())
    assert params < sum(p.numel() for p in model.parameters())


def test_in_memory_torch_export(shrunk):
    _, small, x = shrunk
    program = export_model(small, x)
    assert isinstance(program, torch.export.ExportedProgram)


def test_bad_format_and_missing_onnx(shrunk, tmp_path):
    _, small, x = shrunk
    with pytest.raises(ConfigError, match="format must be one of"):
        export_model(small, x, format="tflite")
    if importlib.util.find_spec("onnx") is None:
        with pytest.raises(ConfigError, match=r"hwprune\[onnx\]"):
            export_model(small, x, tmp_path / "m.onnx", format="onnx")
    else:
        # checked at two batch sizes with onnxruntime where that is installed
        path = export_model(small, x, tmp_path / "m.onnx", format="onnx", dynamic_batch=True)
        assert (tmp_path / "m.onnx").stat().st_size > 0 and str(path).endswith(".onnx")


@pytest.mark.parametrize("fmt,suffix", [("torch.export", "pt2"), ("torchscript", "pt")])
def test_a_dynamic_batch_program_takes_any_batch_size(shrunk, tmp_path, fmt, suffix):
    model, small, x = shrunk
    path = tmp_path / f"model.{suffix}"
    # an example of batch 1 (torch.export would fix a dimension of size 1: exported at two)
    program = export_model(small, x[:1], path, format=fmt, dynamic_batch=True)
    run = program.module() if fmt == "torch.export" else program
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(run(xb), model(xb), atol=1e-4)
    if fmt == "torch.export":  # without it, the program holds to the example's batch size
        static = export_model(small, x, format=fmt).module()
        with pytest.raises(Exception, match="batch|size|shape|Expected"):
            static(torch.randn(5, 3, 16, 16))


class TwoInputs(torch.nn.Module):
    def forward(self, a, b):
        return a.sum(1) + b.sum(1)


def test_a_dynamic_batch_needs_one_batch_size():
    with pytest.raises(ConfigError, match=r"one batch size .*\[2, 3\]"):
        export_model(TwoInputs(), (torch.zeros(2, 4), torch.zeros(3, 4)), dynamic_batch=True)
    program = export_model(TwoInputs(), (torch.ones(2, 4), torch.ones(2, 4)), dynamic_batch=True)
    assert torch.equal(program.module()(torch.ones(7, 4), torch.ones(7, 4)), torch.full((7,), 8.))
