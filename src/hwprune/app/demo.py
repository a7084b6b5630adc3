"""``hwprune demo``: the tour of the product on bundled data (scikit-learn's digits).

A small CNN trains dense once; then each registered method (``hwprune.methods.all_methods``)
prunes a copy of it with its shipped digits recipe (``hwprune run <method>-digits``, started
from the dense weights), and every result is finalized, shrunk (channels that are entirely zero
are removed), saved with ``hwprune.save`` and timed on this CPU. One table compares them:
accuracy, pruning ratio, stored bytes with the index overhead, MACs and the measured batch-1
latency against the dense model's, timed in the same run.

Everything is an ordinary run folder under ``out`` (``hwprune compare`` reads them again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from ..errors import HwpruneError
from .compare import compare_markdown, compare_plot, compare_table, load_runs
from .recipe import load_recipe
from .runner import Run

__all__ = ["demo_recipes", "run_demo"]


def demo_recipes() -> tuple[str, ...]:
    """The shipped recipes the demo runs: each registered method's own, in registry order,
    each from the same dense model (a method registered without a recipe is not in it)."""
    from ..methods import all_methods

    return tuple(spec.recipe for spec in all_methods() if spec.recipe is not None)


#: per-recipe changes: DPP's recipe trains from scratch; from the dense model it needs less
#: the anneal follows the phase; from the dense model, DPP's logits start from its magnitudes
#: (a uniform start is for learning from scratch: docs/dpp.md)
_ADJUST = {"dpp-digits": ["train.prune_epochs=8", "method.logit_init=magnitude"]}
#: the dense reference: the magnitude recipe's dense phase, without pruning
_DENSE = ("magnitude-digits", ["name=dense-digits", "method=null", "train.prune_epochs=0",
                               "train.finetune_epochs=0"])


def run_demo(out: str | Path, overrides: list[str] | None = None,
             console: Console | None = None) -> list[dict[str, Any]]:
    """Run the dense reference and every method's recipe into ``out``; returns the summaries.

    ``overrides``: ``--set``-style items applied to every run (e.g. ``train.steps_per_epoch=2``
    for a quick smoke run).
    """
    console = console or Console()
    out = Path(out)
    overrides = list(overrides or [])
    recipe, dense_sets = _DENSE
    dense = Run(load_recipe(recipe, dense_sets + overrides), console=console)
    dense.execute(out / "dense", force=True, command="hwprune demo")
    weights = out / "dense" / "dense_weights.pt"
    torch.save(dense.model.state_dict(), weights)
    recipes = demo_recipes()
    for name in recipes:
        cfg = load_recipe(name, [f"model.pretrained={weights.resolve()}",
                                 "train.dense_epochs=0", "end.shrink=true",
                                 *_ADJUST.get(name, []), *overrides])
        # a recipe without pruning phases would only re-evaluate the dense model
        if cfg["train"]["prune_epochs"] + cfg["train"]["finetune_epochs"] < 1:
            raise HwpruneError(f"demo: recipe {name} has no pruning or fine-tuning epochs")
        console.rule(escape(name))
        Run(cfg, console=console).execute(out / name, force=True, command="hwprune demo")
    runs = load_runs([out / "dense", *(out / n for n in recipes)])
    (out / "demo.md").write_text(
        "# hwprune demo\n\nEvery method starts from the same dense model (the first row). "
        "Latency: median batch-1 forward pass of the deployable (finalized, shrunk) model on "
        "this CPU; speed-up against the dense model timed in the same run.\n\n"
        + compare_markdown(runs))
    try:
        compare_plot(runs, out / "demo.png")
    except HwpruneError as e:  # matplotlib missing: the table stands
        console.print(f"plot skipped: {e}", markup=False)
    wide = console if console.is_terminal else Console(width=220)
    wide.print(compare_table(runs))
    return runs
