"""The ``hwprune`` command line.

``hwprune demo``: the main job on bundled data (scikit-learn's digits): a small CNN trained
once, pruned by each registered method, finalized, shrunk, saved, timed; one table.
``hwprune run RECIPE``: a recipe (model, data, method, schedule, budget) with progress bars,
checkpoints and results in an output folder (see ``hwprune.app.runner``, docs/cli.md).
``hwprune compare RUN_DIR ...``: one table and one plot from several run folders.
``hwprune methods``: the registered methods, their structures, recipes and docs pages.
``hwprune report CKPT``, ``hwprune shrink CKPT``, ``hwprune export CKPT``: the report, the
shrunk tensors and a deployable program of a run folder or a saved file.
Bad arguments get one clear line naming the field and the allowed values, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from .. import __version__
from ..errors import HwpruneError
from .outputs import os_error_line, output_file, output_folder


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    overrides = [f"seed={args.seed}"] + (["train.steps_per_epoch=2"] if args.quick else [])
    run_demo(output_folder("demo --out", args.out), overrides)
    print(f"results in {args.out} (demo.md, demo.png, one run folder per method)")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import all_methods

    for spec in all_methods():
        print(f"{spec.name}: structures {', '.join(spec.structures)}; recipe "
              f"{spec.recipe or '-'}; docs/{spec.doc or '-'}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr (exit 2), like every other error, not a usage
    block: the line names the command and points to its --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} "
                     "--help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hwprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hwprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from ..methods import all_methods

    methods = ", ".join(spec.name for spec in all_methods())
    demo = sub.add_parser("demo", help=f"every method ({methods}) on bundled digits: one table")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="two steps per epoch: a smoke run, not a result")
    demo.set_defaults(func=_cmd_demo)
    listing = sub.add_parser("methods", help="list the methods: structures, recipe, docs page")
    listing.set_defaults(func=_cmd_methods)
    _add_run_parsers(sub)
    from .cli_deploy import add_deploy_parsers  # hwprune shrink / export CKPT
    from .cli_report import add_report_parser  # hwprune report CKPT

    add_report_parser(sub)
    add_deploy_parsers(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .plugins import load_plugin
    from .recipe import dump, load_recipe, shipped_recipes
    from .runner import Interrupted, Run

    if args.list:
        print("\n".join(shipped_recipes()))
        return 0
    if args.recipe is None:
        raise HwpruneError("run: give a RECIPE (a YAML file or a shipped name; --list shows "
                           "them)")
    for plugin in args.plugin:  # before the recipe: it may name what they register
        load_plugin(plugin)
    cfg = load_recipe(args.recipe, args.set)
    console = Console()
    run = Run(cfg, console=console)  # builds everything: every error is raised before writing
    try:
        if args.dry_run:
            print(dump(run.cfg), end="")
            return 0
        out = Path(args.out or Path("runs") / cfg["name"])
        command = " ".join(["hwprune", *(args.argv or sys.argv[1:])])
        summary = run.execute(out, resume=args.resume, force=args.force, command=command)
    except Interrupted as e:
        print(f"hwprune: {e}", file=sys.stderr)
        return 130
    finally:
        run.close()  # under torchrun: end the process group before the interpreter exits
    console.print(f"{cfg['name']}: accuracy {summary['accuracy']:.2%}, sparsity "
                  f"{summary['sparsity']:.1%}; results in {out}", markup=False)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_markdown, compare_plot, compare_table, load_runs

    markdown = args.markdown and output_file("compare --markdown", args.markdown)
    plot = args.plot and output_file("compare --plot", args.plot)
    runs = load_runs(args.runs)
    console = Console()
    if not console.is_terminal:  # a file or a pipe: never squeeze the table to 80 columns
        console = Console(width=220)
    console.print(compare_table(runs))
    if markdown:
        Path(markdown).write_text(compare_markdown(runs))
    if plot:
        compare_plot(runs, plot)
    return 0


def _add_run_parsers(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a recipe: train, prune, checkpoint, report")
    run.add_argument("recipe", nargs="?", help="a recipe YAML file, or a shipped recipe's name")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field (dotted key, YAML value); repeatable")
    run.add_argument("--out", help="output folder (default: runs/NAME)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint")
    run.add_argument("--force", action="store_true",
                     help="overwrite a run (finished or not) in --out")
    run.add_argument("--dry-run", action="store_true",
                     help="validate and print the resolved recipe; write nothing")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE",
                     help="a Python file to run first, which registers your models, data "
                          "sets or methods (hwprune.models.register_model, ...); repeatable. "
                          "Recipes themselves never run code")
    run.add_argument("--list", action="store_true", help="list the shipped recipes")
    run.set_defaults(func=_cmd_run, argv=None)
    compare = sub.add_parser("compare", help="one table and plot from several run folders")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    compare.add_argument("--plot", metavar="FILE",
                         help="write the accuracy-against-compression plot (PNG)")
    compare.set_defaults(func=_cmd_compare)


def _error(message: str) -> int:
    """Print ``message`` as the one line of a failed command; returns the exit status."""
    print(f"hwprune: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except HwpruneError as e:
        return _error(str(e))
    except OSError as e:  # no permission, a read-only or full disk, a missing file
        return _error(os_error_line(e))
    except KeyboardInterrupt:
        print("hwprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
