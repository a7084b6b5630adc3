"""The ``hwprune`` command line.

``hwprune demo``: the main job on bundled data (scikit-learn's digits): train a small CNN,
prune it with Magnitude at three structures, fine-tune, and print one comparison table.
``hwprune run RECIPE``: a recipe (model, data, method, schedule, budget) with progress bars,
checkpoints and results in an output folder (see ``hwprune.runner``, docs/cli.md).
``hwprune compare RUN_DIR ...``: one table and one plot from several run folders.
Bad arguments get one clear line naming the field and the allowed values, never a traceback.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import __version__
from .data import load_digits
from .errors import HwpruneError
from .methods.magnitude import Magnitude
from .models import SmallCNN
from .report import report
from .training import evaluate, make_loader, train_epoch

#: the structures the demo compares, with the sparsity each is pruned to
DEMO_STRUCTURES = (("element", 0.8), ("channel", 0.5), ("2:4", None))


@dataclass
class DemoRow:
    model: str
    structure: str
    sparsity: float  # fraction of the targeted weights removed
    accuracy: float
    params: int  # nonzero parameters of the whole model
    macs: int  # MACs of one forward pass with the zeros skipped
    seconds: float


def _row(name: str, structure: str, sparsity: float, model: torch.nn.Module, test_loader,
         example: torch.Tensor, seconds: float) -> DemoRow:
    rep = report(model, example)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return DemoRow(name, structure, sparsity, evaluate(model, test_loader), nonzero,
                   rep.total["model_macs_remaining"], seconds)


def run_demo(epochs: int = 15, finetune_epochs: int = 5, seed: int = 0,
             console: Console | None = None) -> list[DemoRow]:
    """Train, prune, fine-tune, measure. Returns one row for dense and one per structure."""
    console = console or Console()
    torch.manual_seed(seed)
    train_set, test_set = load_digits(seed=seed)
    train_loader = make_loader(train_set, 64, shuffle=True, seed=seed)
    test_loader = make_loader(test_set, 512, shuffle=False)
    example = test_set[:1][0]

    start = time.perf_counter()
    dense = SmallCNN()
    opt = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        train_epoch(dense, train_loader, opt)
        sched.step()
    rows = [_row("SmallCNN", "dense", 0.0, dense, test_loader, example,
                 time.perf_counter() - start)]
    console.print(f"dense SmallCNN trained: {rows[0].accuracy:.2%} test accuracy")

    for structure, sparsity in DEMO_STRUCTURES:
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        pruner = Magnitude(model, structure, sparsity)
        pruned_now = pruner.sparsity()
        opt = torch.optim.SGD(pruner.param_groups(lr=0.01, momentum=0.9, weight_decay=5e-4))
        for _ in range(finetune_epochs):
            train_epoch(model, train_loader, opt, pruner)
        pruner.finalize()
        rows.append(_row("SmallCNN", structure, pruned_now, model, test_loader, example,
                         time.perf_counter() - start))
        console.print(f"magnitude {structure}: {rows[-1].accuracy:.2%}")
    return rows


def demo_table(rows: list[DemoRow]) -> Table:
    dense = rows[0]
    table = Table(title="hwprune demo: Magnitude pruning of a small CNN on digits "
                        "(one-shot, then fine-tuned)")
    for col in ("structure", "pruned", "accuracy", "nonzero params", "MACs", "MACs vs dense",
                "time"):
        table.add_column(col, justify="left" if col == "structure" else "right")
    for r in rows:
        table.add_row(r.structure, f"{r.sparsity:.0%}", f"{r.accuracy:.2%}", f"{r.params:,}",
                      f"{r.macs:,}", f"{dense.macs / max(r.macs, 1):.2f}x", f"{r.seconds:.1f}s")
    return table


def _cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    rows = run_demo(epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=args.seed,
                    console=console)
    console.print(demo_table(rows))
    console.print("pruned: fraction of the targeted weights (every conv/linear but the first "
                  "conv and the last linear) set to zero; MACs count one image with the zeros "
                  "skipped (torch.utils.flop_counter)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        console.print(f"results written to {out / 'demo.json'}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hwprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train, prune and compare a small CNN on bundled digits")
    demo.add_argument("--epochs", type=_positive_int, default=15, help="dense training epochs")
    demo.add_argument("--finetune-epochs", type=_positive_int, default=5,
                      help="fine-tuning epochs after pruning")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder to write demo.json into")
    demo.set_defaults(func=_cmd_demo)
    _add_run_parsers(sub)
    from .cli_report import add_report_parser  # hwprune report CKPT

    add_report_parser(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .recipe import dump, load_recipe, shipped_recipes
    from .runner import Interrupted, Run

    if args.list:
        print("\n".join(shipped_recipes()))
        return 0
    if args.recipe is None:
        raise HwpruneError("run: give a RECIPE (a YAML file or a shipped name; --list shows "
                           "them)")
    cfg = load_recipe(args.recipe, args.set)
    console = Console()
    run = Run(cfg, console=console)  # builds everything: every error is raised before writing
    if args.dry_run:
        print(dump(run.cfg), end="")
        return 0
    out = Path(args.out or Path("runs") / cfg["name"])
    command = " ".join(["hwprune", *(args.argv or sys.argv[1:])])
    try:
        summary = run.execute(out, resume=args.resume, force=args.force, command=command)
    except Interrupted as e:
        print(f"hwprune: {e}", file=sys.stderr)
        return 130
    console.print(f"{cfg['name']}: accuracy {summary['accuracy']:.2%}, sparsity "
                  f"{summary['sparsity']:.1%}; results in {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_markdown, compare_plot, compare_table, load_runs

    runs = load_runs(args.runs)
    console = Console()
    if not console.is_terminal:  # a file or a pipe: never squeeze the table to 80 columns
        console = Console(width=220)
    console.print(compare_table(runs))
    if args.markdown:
        Path(args.markdown).write_text(compare_markdown(runs))
    if args.plot:
        compare_plot(runs, args.plot)
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
    run.add_argument("--list", action="store_true", help="list the shipped recipes")
    run.set_defaults(func=_cmd_run, argv=None)
    compare = sub.add_parser("compare", help="one table and plot from several run folders")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    compare.add_argument("--plot", metavar="FILE",
                         help="write the accuracy-against-compression plot (PNG)")
    compare.set_defaults(func=_cmd_compare)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except HwpruneError as e:
        print(f"hwprune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
