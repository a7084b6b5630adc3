"""The end of a run: finalize, (recalibrate BatchNorm,) evaluate, (shrink, fold BatchNorm,)
report, save, time, plot; the results go into the output folder and ``summary.json``."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from ..errors import HwpruneError
from ..training import recalibrate_batchnorm
from .build import new_model
from .loop import TrainingLoop
from .outdir import write_json

__all__ = ["finish", "final_model", "shrunk_and_folded", "latencies_ms"]

#: the report's totals that summary.json repeats (its pruning and compression ratios are
#: computed against the dense model instead, see ``finish``)
SUMMARY_TOTALS = ("params", "kept_params", "stored_bytes", "index_bytes", "dense_bytes",
                  "model_macs", "model_macs_remaining", "model_params")


def finish(loop: TrainingLoop, out: Path, info: dict[str, Any], console: Console
           ) -> dict[str, Any]:
    """Finish the trained run in ``loop`` as ``cfg["end"]`` says; write the results into
    ``out`` and return the summary (``info`` is added to it)."""
    cfg, pruner, example = loop.cfg, loop.pruner, loop.parts.example
    end, plan = cfg["end"], loop.plan
    model = final_model(loop, end["finalize"])
    test_loss, accuracy = loop.evaluate(model)
    model.eval()
    deployable = shrunk_and_folded(model, example, end["shrink"], end["fold_batchnorm"])[0]
    dense = new_model(cfg, loop.parts.factory).eval()
    summary: dict[str, Any] = {
        "name": cfg["name"], "model": cfg["model"]["name"], "data": cfg["data"]["name"],
        "method": cfg["method"]["name"] if cfg["method"] else "dense",
        "structure": str(pruner.structure) if pruner is not None else "dense",
        "dense_accuracy": loop.dense_accuracy, "accuracy": accuracy, "test_loss": test_loss,
        "sparsity": pruner.sparsity() if pruner is not None else 0.0,
        "epochs": plan.total_epochs, "steps": plan.total_epochs * plan.steps_per_epoch(),
    }
    if end["report"]:
        from ..report.accounting import safe_div
        from ..report.measure import report

        rep = report(deployable, example, baseline=dense, pruner=pruner, name=cfg["name"])
        (out / "report.md").write_text(rep.to_markdown() + "\n")
        rep.to_json(out / "report.json")
        summary.update({k: rep.total[k] for k in SUMMARY_TOTALS})
        summary["dense_model_macs"] = rep.baseline["model_macs"]
        # the ratios are against the dense model: a shrunk model's own totals count only the
        # weights shrink left, so its own ratio reads about 1 however much was removed
        summary["dense_params"] = rep.baseline["params"]
        summary["pruning_ratio"] = rep.baseline["param_ratio"]
        summary["compression_ratio"] = safe_div(rep.baseline["dense_bytes"],
                                                rep.total["stored_bytes"])
    if end["save"]:
        from ..storage import save

        summary["file_bytes"] = save(deployable, out / "model.hwp")
    if end["latency"]:
        summary["latency_ms"], summary["dense_latency_ms"] = latencies_ms(
            [deployable, dense], example)
    summary.update(info)
    if end["plots"] and end["report"]:
        _plots(out / "plots", rep, deployable, loop, console)
    write_json(out / "summary.json", summary)
    return summary


def final_model(loop: TrainingLoop, finalize: bool) -> nn.Module:
    """The trained model as the run ends it, in place: finalized where ``finalize`` (and there
    is a pruner), its BatchNorm statistics re-estimated where the recipe's
    ``end.recalibrate_bn`` says (on the run's own seeded batches)."""
    end, plan, model = loop.cfg["end"], loop.plan, loop.model
    if loop.pruner is not None and finalize:
        loop.pruner.finalize()
    if end["recalibrate_bn"]:
        batches = ((x, y) for _, x, y in plan.batches(plan.total_epochs, 0))
        recalibrate_batchnorm(model, batches, end["recalibrate_bn"])
    return model


def shrunk_and_folded(model: nn.Module, example: Tensor, shrink: bool, fold: bool
                      ) -> tuple[nn.Module, Any]:
    """``model`` shrunk (``hwprune.shrink``) and/or with its inference BatchNorm folded into
    the layer before it (``hwprune.fold_batchnorm``), and the ``ShrinkResult`` (None where
    not shrunk)."""
    from ..deploy import fold_batchnorm
    from ..deploy import shrink as shrink_model

    deployable, result = model, None
    if shrink:
        result = shrink_model(model, example, return_result=True)
        deployable = result.model
    if fold:
        deployable = fold_batchnorm(deployable, example)
    return deployable, result


def _plots(folder: Path, rep: Any, deployable: nn.Module, loop: TrainingLoop,
           console: Console) -> None:
    """The plots ``hwprune report --plots`` writes, plus the training curves."""
    from ..report import plots
    from ..report.measure import weights_of

    pruner = loop.pruner
    try:
        plots.write_plots(rep, weights_of(deployable), folder,
                          history=getattr(pruner, "history", None), training=loop.history,
                          extras=pruner.layer_extras() if pruner is not None else {})
    except HwpruneError as e:  # matplotlib missing: the rest of the results stand
        console.print(f"plots skipped: {e}", markup=False)


@torch.no_grad()
def latencies_ms(models: list[nn.Module], example: Tensor, repeats: int = 50) -> list[float]:
    """Median wall time of one forward pass of ``example`` (batch 1) per model, in ms.

    The models are timed in turns within each repeat, so load from other processes on a
    shared machine falls on all of them alike and their ratio stays meaningful."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
        for _ in range(3):  # warm-up
            m(example)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, t in zip(models, times, strict=True):
            t0 = time.perf_counter()
            m(example)
            t.append(time.perf_counter() - t0)
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    return [round(statistics.median(t) * 1e3, 4) for t in times]
