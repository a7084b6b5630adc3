"""Export a (shrunk) model to a deployable program: ``torch.export``, TorchScript or ONNX.

``export_model(model, example_inputs, path, format=...)`` traces the model in eval mode, writes
it beside ``path`` when given, loads the written file back and checks its outputs against the
model's on ``example_inputs``, and renames it to ``path`` only when they match, so a file that
would compute something else is never left behind. ONNX needs the optional extra
``pip install "hwprune[onnx]"`` (the ``onnx`` and ``onnxscript`` packages that
``torch.onnx.export`` uses); the check of an ONNX file runs it with ``onnxruntime`` where that
is installed, and otherwise validates it with ``onnx.checker``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, HwpruneError
from ..files import atomic_path
from .verify import ATOL, RTOL, compare_outputs, flat_outputs

__all__ = ["EXPORT_FORMATS", "ExportError", "export_model"]

EXPORT_FORMATS = ("torch.export", "torchscript", "onnx")


class ExportError(HwpruneError):
    """The model cannot be exported, or the exported program computes something else."""


def _check(got: Any, ref: list[Tensor], what: str, rtol: float, atol: float) -> None:
    check = compare_outputs(flat_outputs(got), ref, rtol=rtol, atol=atol)
    if not check.close:
        found = (f"max |diff| {check.max_abs_diff:.3g} at output scale {check.scale:.3g}, "
                 f"rtol={rtol}, atol={atol}" if check.same_shapes else "other output shapes")
        raise ExportError(f"the {what} differs from the model ({found})")


def export_model(model: nn.Module, example_inputs: Any, path: str | os.PathLike | None = None,
                 *, format: str = "torch.export", rtol: float = RTOL,
                 atol: float = ATOL) -> Any:
    """Export ``model`` (eval mode) and check the result on ``example_inputs``.

    Args:
        model: any traceable model, e.g. the output of ``hp.shrink``; not modified.
        example_inputs: a tensor or a tuple of positional inputs.
        path: where to write the program (``.pt2`` for torch.export, ``.pt`` for TorchScript,
            ``.onnx``); required for ONNX. The program is written beside it, loaded back and
            checked, and only then renamed to ``path``: a failed check leaves no file.
        format: ``"torch.export"`` (default; an ``ExportedProgram``), ``"torchscript"`` (a
            traced ``ScriptModule``) or ``"onnx"``.
        rtol, atol: tolerance of the check on every output: max |difference| <= rtol * the
            output's largest magnitude + atol (``hwprune.deploy.verify``).

    Returns:
        the ``ExportedProgram``, the ``ScriptModule``, or the ONNX path.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = flat_outputs(model(*args))
    if path is None:
        return _export(model, args, ref, None, format, rtol, atol)
    if format == "onnx":
        _onnx_packages()  # before a temporary file is made
    # written beside ``path``, read back and checked there, then renamed: a program whose
    # check fails is never left under the name asked for
    with atomic_path(Path(path), keep_suffix=True) as tmp:
        result = _export(model, args, ref, tmp, format, rtol, atol)
    return os.fspath(path) if format == "onnx" else result


def _export(model: nn.Module, args: tuple, ref: list[Tensor], path: Path | None, format: str,
            rtol: float, atol: float) -> Any:
    """``export_model``'s program, written to ``path`` (where given), loaded back and checked."""
    try:
        if format == "torch.export":
            program = torch.export.export(model, args)
            if path is not None:
                torch.export.save(program, os.fspath(path))
                program = torch.export.load(os.fspath(path))
            with torch.no_grad():
                _check(program.module()(*args), ref, "exported program", rtol, atol)
            return program
        if format == "torchscript":
            with torch.no_grad():
                script = torch.jit.trace(model, args, check_trace=False)
            if path is not None:
                script.save(os.fspath(path))
                script = torch.jit.load(os.fspath(path))
            with torch.no_grad():
                _check(script(*args), ref, "TorchScript module", rtol, atol)
            return script
        return _onnx(model, args, ref, path, rtol, atol)
    except (ConfigError, ExportError):
        raise
    except Exception as e:  # the exporters raise many types; name the cause, keep the chain
        raise ExportError(f"{format} export of {type(model).__name__} failed: {e}") from e


def _onnx_packages() -> None:
    """``ConfigError`` naming the optional packages ONNX export needs, where one is missing."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"ONNX export needs the optional packages {missing}: "
                          'pip install "hwprune[onnx]"')


def _onnx(model: nn.Module, args: tuple, ref: list[Tensor], path: Any, rtol: float,
          atol: float) -> str:
    _onnx_packages()
    if path is None:
        raise ConfigError("ONNX export writes a file: give path=")
    path = os.fspath(path)
    torch.onnx.export(model, args, path)
    import onnx

    onnx.checker.check_model(onnx.load(path))
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
        _check([torch.from_numpy(o) for o in session.run(None, feeds)], ref, "ONNX model",
               rtol, atol)
    return path
