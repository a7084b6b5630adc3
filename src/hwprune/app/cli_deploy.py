"""``hwprune shrink CKPT`` and ``hwprune export CKPT``: the deployable model of saved work.

CKPT is a run folder of ``hwprune run`` (or its ``checkpoint.pt``), or a file ``hwprune.save``
wrote together with ``--model NAME``, the zoo model it belongs to (``hwprune.app.rebuild``).
A run is rebuilt from its recipe and checkpoint and ended as the run ends it: the pruner
finalized, BatchNorm re-estimated where the recipe's ``end.recalibrate_bn`` says. Then:

* ``shrink`` removes the channels, filters and layers that are entirely zero
  (``hwprune.shrink``, verified on the example inputs), optionally folds inference BatchNorm
  (``--fold-batchnorm``), prints what changed and writes the tensors with ``hwprune.save``.
  A run whose recipe had ``end.shrink: true`` and the same ``fold_batchnorm`` saved these very
  tensors as its ``model.hwp``.
* ``export`` does the same (``--no-shrink``: not shrunk) and writes a program that carries the
  architecture too (``hwprune.export_model``: torch.export ``.pt2``, TorchScript ``.pt`` or
  ONNX ``.onnx``, by ``--format`` or the file's suffix) for any batch size
  (``--static-batch``: the example's), read back and checked against the model (at two batch
  sizes) before it takes the name ``--out``.

Errors are one line (``hwprune: error:``), and ``--out`` is checked before any work.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from torch import Tensor, nn

from ..errors import ConfigError
from .outputs import output_file
from .rebuild import add_model_arguments, load_saved

__all__ = ["add_deploy_parsers", "deployable_of", "Deployable", "SUFFIX_FORMATS"]

#: the file suffixes ``export`` reads a format from
SUFFIX_FORMATS = {".pt2": "torch.export", ".pt": "torchscript", ".onnx": "onnx"}


def add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    shrink = sub.add_parser("shrink", help="the shrunk model of a run or a saved file, "
                                           "written with hwprune.save")
    _common(shrink, "the file to write (hwprune.save's format, e.g. model.hwp)")
    shrink.set_defaults(func=cmd_shrink)
    export = sub.add_parser("export", help="a run's or a saved file's model, shrunk, as a "
                                           "torch.export, TorchScript or ONNX program")
    _common(export, "the program to write: .pt2 (torch.export), .pt (TorchScript) or .onnx")
    export.add_argument("--format", choices=sorted(set(SUFFIX_FORMATS.values())),
                        help="the program's format (default: from the suffix of --out)")
    export.add_argument("--no-shrink", action="store_true",
                        help="export the finalized model as it is, without shrinking it")
    export.add_argument("--static-batch", action="store_true",
                        help="fix the program's batch size at the example's (default: any "
                             "batch size, checked at two)")
    export.set_defaults(func=cmd_export)


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="a run folder of 'hwprune run', its "
                                                "checkpoint.pt, or a file hwprune.save wrote "
                                                "(with --model)")
    p.add_argument("--out", required=True, metavar="FILE", help=out_help)
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="fold inference BatchNorm into the conv or linear layer before it")
    add_model_arguments(p, "for an .hwp file: the zoo model its tensors belong to")


def cmd_shrink(args: argparse.Namespace) -> int:
    out = output_file("shrink --out", args.out)
    done = deployable_of(args, "shrink", shrink=True)
    from ..storage import save

    size = save(done.model, out)
    changed = done.shrunk.params_after != done.shrunk.params_before
    print("\n".join([*done.lines, f"wrote {out} ({size:,} B, hwprune.save" + (
        "; its tensors have the shrunk model's shapes: 'hwprune export' writes a program "
        "that carries the architecture too)" if changed else "; shrink removed nothing)")]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = output_file("export --out", args.out)
    fmt = args.format or SUFFIX_FORMATS.get(out.suffix)
    if fmt is None:
        raise ConfigError(f"export: cannot tell the format of {out.name!r} from its suffix; "
                          f"allowed: {', '.join(SUFFIX_FORMATS)}, or give --format")
    done = deployable_of(args, "export", shrink=not args.no_shrink)
    from ..deploy import export_model

    export_model(done.model, done.example, out, format=fmt,
                 dynamic_batch=not args.static_batch)
    batch = (f"at batch {done.example.shape[0]}" if args.static_batch
             else "for any batch size (checked at two)")
    print("\n".join([*done.lines, f"wrote {out} ({fmt}, {out.stat().st_size:,} B), {batch}; "
                                   "read back, its outputs match the model's on the example "
                                   "inputs"]))
    return 0


class Deployable(NamedTuple):
    """``deployable_of``'s result: the model, the example inputs it was verified on, the
    ``ShrinkResult`` (None where not shrunk) and the lines that say what was done."""

    model: nn.Module
    example: Tensor
    shrunk: Any
    lines: list[str]


def deployable_of(args: argparse.Namespace, command: str, shrink: bool) -> Deployable:
    """The deployable model of ``args.ckpt``: finalized, shrunk where ``shrink``, BatchNorm
    folded where ``args.fold_batchnorm``."""
    from .finish import final_model, shrunk_and_folded

    saved = load_saved(args.ckpt, command, args.model, args.input_shape)
    if saved.model is None:
        raise ConfigError(f"{command}: {args.ckpt} holds tensors alone; give --model NAME (the "
                          "zoo model they belong to) or a run folder")
    model, lines = saved.model, []
    if saved.run is not None:
        run = saved.run
        model = final_model(run.loop, finalize=True)
        pruner = run.pruner
        lines.append(f"{saved.name}: " + (f"{type(pruner).__name__} {pruner.structure}, "
                                          "finalized" if pruner is not None else "dense run"))
    deployable, result = shrunk_and_folded(model.eval(), saved.example, shrink,
                                           args.fold_batchnorm)
    if result is not None:
        lines += ["shrunk: " + result.summary()]
    if args.fold_batchnorm:
        lines.append("BatchNorm folded into the layers before it")
    return Deployable(deployable, saved.example, result, lines)
