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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, HwpruneError
from ..files import atomic_path
from .verify import ATOL, RTOL, compare_outputs, flat_outputs, outputs_of

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
                 *, format: str = "torch.export", dynamic_batch: bool = False,
                 rtol: float = RTOL, atol: float = ATOL) -> Any:
    """Export ``model`` (eval mode) and check the result on ``example_inputs``.

    Args:
        model: any traceable model, e.g. the output of ``hp.shrink``; not modified.
        example_inputs: a tensor or a tuple of positional inputs.
        path: where to write the program (``.pt2`` for torch.export, ``.pt`` for TorchScript,
            ``.onnx``); required for ONNX. The program is written beside it, loaded back and
            checked, and only then renamed to ``path``: a failed check leaves no file.
        format: ``"torch.export"`` (default; an ``ExportedProgram``), ``"torchscript"`` (a
            traced ``ScriptModule``) or ``"onnx"``.
        dynamic_batch: the program takes any batch size (dimension 0 of every tensor input,
            one size for all), checked at two batch sizes; else it is fixed at the example's.
            An example of batch 1 is exported at batch 2 (its rows repeated): torch.export
            fixes a dimension of size 1.
        rtol, atol: tolerance of the check on every output: max |difference| <= rtol * the
            output's largest magnitude + atol (``hwprune.deploy.verify``).

    Returns:
        the ``ExportedProgram``, the ``ScriptModule``, or the ONNX path.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if dynamic_batch:
        args = _rows_repeated(args, max(0, 2 - _batch_size(args)))
    # a program that takes any batch size is checked at a second one too
    checks = [args, _rows_repeated(args, 1)] if dynamic_batch else [args]
    model = copy.deepcopy(model).eval()
    refs = [outputs_of(model, a) for a in checks]
    spec = _Spec(format, dynamic_batch, checks, refs, rtol, atol)
    if path is None:
        return _export(model, None, spec)
    if format == "onnx":
        _onnx_packages()  # before a temporary file is made
    # written beside ``path``, read back and checked there, then renamed: a program whose
    # check fails is never left under the name asked for
    with atomic_path(Path(path), keep_suffix=True) as tmp:
        result = _export(model, tmp, spec)
    return os.fspath(path) if format == "onnx" else result


@dataclass(frozen=True)
class _Spec:
    """What one export makes and how it is checked: ``checks[0]`` is what it is traced with,
    ``refs[i]`` the model's outputs on ``checks[i]``."""

    format: str
    dynamic_batch: bool
    checks: list[tuple]
    refs: list[list[Tensor]]
    rtol: float
    atol: float

    def check(self, run: Any, what: str) -> None:
        """``run(*args)`` against the model on every checked input."""
        with torch.no_grad():
            for args, ref in zip(self.checks, self.refs, strict=True):
                _check(run(*args), ref, what, self.rtol, self.atol)

    def batch_dims(self) -> tuple | None:
        """torch.export's ``dynamic_shapes``: dimension 0 of every tensor input, one size."""
        if not self.dynamic_batch:
            return None
        batch = torch.export.Dim("batch", min=1)
        return tuple({0: batch} if isinstance(a, Tensor) and a.dim() else None
                     for a in self.checks[0])


def _export(model: nn.Module, path: Path | None, spec: _Spec) -> Any:
    """``export_model``'s program, written to ``path`` (where given), loaded back and checked."""
    args = spec.checks[0]
    try:
        if spec.format == "torch.export":
            program = torch.export.export(model, args, dynamic_shapes=spec.batch_dims())
            if path is not None:
                torch.export.save(program, os.fspath(path))
                program = torch.export.load(os.fspath(path))
            spec.check(program.module(), "exported program")
            return program
        if spec.format == "torchscript":
            with torch.no_grad():
                script = torch.jit.trace(model, args, check_trace=False)
            if path is not None:
                script.save(os.fspath(path))
                script = torch.jit.load(os.fspath(path))
            spec.check(script, "TorchScript module")
            return script
        return _onnx(model, path, spec)
    except (ConfigError, ExportError):
        raise
    except Exception as e:  # the exporters raise many types; name the cause, keep the chain
        hint = (" (with a dynamic batch: the model's code may fix the batch size; export it "
                "at the example's)" if spec.dynamic_batch else "")
        raise ExportError(f"{spec.format} export of {type(model).__name__} failed{hint}: "
                          f"{e}") from e


def _batch_size(args: tuple) -> int:
    """The one size of dimension 0 of the tensor inputs (``ConfigError`` where they differ)."""
    sizes = {a.shape[0] for a in args if isinstance(a, Tensor) and a.dim()}
    if len(sizes) != 1:
        raise ConfigError(f"dynamic_batch needs tensor inputs with one batch size (dimension "
                          f"0); got {sorted(sizes) or 'none'}")
    return sizes.pop()


def _rows_repeated(args: tuple, extra: int) -> tuple:
    """``args`` with their first ``extra`` rows (cycled) appended along dimension 0."""
    if extra == 0:
        return args
    n = _batch_size(args)
    rows = torch.arange(n + extra) % n
    return tuple(a[rows] if isinstance(a, Tensor) and a.dim() else a for a in args)


def _onnx_packages() -> None:
    """``ConfigError`` naming the optional packages ONNX export needs, where one is missing."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"ONNX export needs the optional packages {missing}: "
                          'pip install "hwprune[onnx]"')


def _onnx(model: nn.Module, path: Any, spec: _Spec) -> str:
    _onnx_packages()
    if path is None:
        raise ConfigError("ONNX export writes a file: give path=")
    path = os.fspath(path)
    torch.onnx.export(model, spec.checks[0], path, dynamic_shapes=spec.batch_dims(),
                      verbose=False)
    import onnx

    onnx.checker.check_model(onnx.load(path))
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(*args: Tensor) -> list[Tensor]:
            feeds = {n: a.numpy() for n, a in zip(names, args, strict=True)}
            return [torch.from_numpy(o) for o in session.run(None, feeds)]

        spec.check(run, "ONNX model")
    return path
