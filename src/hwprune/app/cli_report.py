"""``hwprune report CKPT``: the report of a saved model or of a run, as a table, Markdown, JSON
and plots.

CKPT is one of:

* a file ``hwprune.save`` wrote (``model.hwp``): the tensors alone. Without ``--model`` the
  report has every storage field but no MACs (they need the model's forward pass); with
  ``--model NAME`` (a zoo model, e.g. ``resnet20``) the state dict is loaded into that model
  and the report is complete (``--input-shape`` gives one example's shape, default 3,32,32).
* a run folder written by ``hwprune run``, or its ``checkpoint.pt``: the run is rebuilt from
  the folder's ``recipe.yaml`` and the checkpoint (model, pruner, history), so the report has
  the method's extras (PSP alphas, DPP confidence and diversity, DARB block sizes) and their
  plots. A checkpoint holds the live model (pruning parametrizations attached); the report
  reads its effective weights.

``--plots DIR`` writes ``hwprune.report.plots.write_plots``'s images; ``--markdown FILE`` and
``--json FILE`` write the report in those formats. Errors are one line (``hwprune: error:``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import Tensor

from ..report.measure import Report, report, report_state_dict, weights_of
from .outputs import output_file, output_folder
from .rebuild import add_model_arguments, load_saved

__all__ = ["add_report_parser", "load_report"]


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="the report of a saved model or a run: table, Markdown, "
                                      "JSON, plots")
    p.add_argument("ckpt", metavar="CKPT", help="a file hwprune.save wrote, a run folder of "
                                                "'hwprune run', or its checkpoint.pt")
    p.add_argument("--plots", metavar="DIR", help="write the plots (PNG) into this folder")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    add_model_arguments(p, "for an .hwp file: the zoo model its tensors belong to (gives MACs)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    # every output path is checked before the (possibly long) rebuild of a run
    for flag, value in (("--markdown", args.markdown), ("--json", args.json)):
        if value:
            output_file(f"report {flag}", value)
    if args.plots:
        output_folder("report --plots", args.plots)
    rep, weights, history = load_report(args.ckpt, args.model, args.input_shape)
    console = Console()
    if not console.is_terminal:  # a file or a pipe: never squeeze the tables to 80 columns
        console = Console(width=240)
    rep.print(console)
    path = Path(args.ckpt)
    if path.is_file() and path.stat().st_size != rep.total["file_bytes"]:
        # compressed, or written with other hints than the report's: both numbers, no guess
        console.print(f"note: {path} has {path.stat().st_size:,} B on disk; the report counts "
                      f"the uncompressed file hwprune.save writes with the report's hints "
                      f"({rep.total['file_bytes']:,} B)", highlight=False, markup=False)
    if args.markdown:
        Path(args.markdown).write_text(rep.to_markdown())
    if args.json:
        rep.to_json(args.json)
    if args.plots:
        from ..report.plots import write_plots

        for path in write_plots(rep, weights, args.plots, history):
            console.print(f"wrote {path}", highlight=False, markup=False)
    return 0


def load_report(ckpt: str | Path, model: str | None = None, input_shape: str = "3,32,32"
                ) -> tuple[Report, dict[str, Tensor], list[dict[str, Any]] | None]:
    """(report, {row name: weight}, method history or None) of CKPT (see the module doc)."""
    saved = load_saved(ckpt, "report", model, input_shape)
    if saved.run is not None:
        run = saved.run
        rep = report(run.model, run.example, pruner=run.pruner, name=saved.name)
        return rep, weights_of(run.model), getattr(run.pruner, "history", None)
    if saved.model is None:
        rep = report_state_dict(saved.state, name=saved.name)
        return rep, {r.name: saved.state[r.name] for r in rep.rows}, None
    return report(saved.model, saved.example, name=saved.name), weights_of(saved.model), None
