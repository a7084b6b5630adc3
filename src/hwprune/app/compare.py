"""Compare finished runs: one table and one accuracy-against-compression plot.

``hwprune compare RUN_DIR ...`` reads each folder's ``summary.json`` (written by
``hwprune run``) and shows, per run: method, structure, accuracy (and the change from the
dense model the run started from), sparsity of the targeted weights, pruning ratio (weights
dense / kept), stored bytes with the index overhead and the compression ratio, MACs, and the
CPU latency measured on the machine the run was made on, with the speed-up against the dense
model timed in the same run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError

__all__ = ["load_runs", "compare_table", "compare_markdown", "compare_plot"]

#: (header, summary key, format) of the comparison's columns
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "name", "{}"),
    ("method", "method", "{}"),
    ("structure", "structure", "{}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("vs dense", "delta", "{:+.2%}"),
    ("sparsity", "sparsity", "{:.1%}"),
    ("pruning ratio", "pruning_ratio", "{:.2f}x"),
    ("stored bytes", "stored_bytes", "{:,}"),
    ("compression", "compression_ratio", "{:.2f}x"),
    ("MACs", "model_macs_remaining", "{:,}"),
    ("latency ms", "latency_ms", "{:.3f}"),
    ("speed-up", "speedup", "{:.2f}x"),
)


def load_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The ``summary.json`` of each finished run folder, with ``dir`` and ``delta`` added."""
    if not dirs:
        raise ConfigError("compare: give at least one run folder")
    runs = []
    for d in dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise ConfigError(f"compare: {d} holds no finished run (no summary.json); allowed: "
                              "output folders of a finished 'hwprune run'")
        try:
            s = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"compare: {path} is not valid JSON: {e}") from None
        _check_summary(path, s)
        s["dir"] = str(d)
        dense = s.get("dense_accuracy")
        s["delta"] = None if dense is None else s["accuracy"] - dense
        # both latencies are timed in the same run, so their ratio is the honest one
        lat, dense_lat = s.get("latency_ms"), s.get("dense_latency_ms")
        s["speedup"] = dense_lat / lat if lat and dense_lat else None
        runs.append(s)
    return runs


#: summary fields compare computes with: numbers (or null where a run has none)
NUMBERS = ("accuracy", "dense_accuracy", "sparsity", "pruning_ratio", "stored_bytes",
           "compression_ratio", "model_macs_remaining", "latency_ms", "dense_latency_ms")


def _check_summary(path: Path, s: Any) -> None:
    """``ConfigError`` naming the first field of a summary that compare cannot use."""
    if not isinstance(s, dict):
        raise ConfigError(f"compare: {path} holds {type(s).__name__}; allowed: the summary "
                          "mapping 'hwprune run' writes")
    for key in ("name", "accuracy"):
        if s.get(key) is None:
            raise ConfigError(f"compare: {path} has no {key}; allowed: the summary "
                              "'hwprune run' writes")
    for key in NUMBERS:
        v = s.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"compare: {path} field {key} is {v!r} "
                              f"({type(v).__name__}); allowed: a number")


def _cells(run: dict[str, Any]) -> list[str]:
    out = []
    for _, key, fmt in COLUMNS:
        v = run.get(key)
        out.append("-" if v is None else fmt.format(v))
    return out


def compare_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="hwprune compare")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("run", "method", "structure")
                         else "right")
    for run in runs:  # cells are text, not markup: a run named "a[1]" keeps its brackets
        table.add_row(*(escape(c) for c in _cells(run)))
    return table


def compare_markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "| " + " | ".join("---" if h in ("run", "method", "structure") else "---:"
                               for h, _, _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in runs]
    machines = sorted({r.get("machine", "?") for r in runs})
    lines += ["", "Machine(s): " + "; ".join(machines), "",
              "Commands:", ""] + [f"- {r['name']}: `{r.get('command', '?')}`" for r in runs]
    return "\n".join(lines) + "\n"


def compare_plot(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against pruning ratio (log scale), one labelled point per run."""
    from ..report.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for r in runs:
        x = r.get("pruning_ratio") or 1.0
        ax.scatter([x], [100 * r["accuracy"]], s=30)
        ax.annotate(r["name"], (x, 100 * r["accuracy"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    dense = [r["dense_accuracy"] for r in runs if r.get("dense_accuracy") is not None]
    if dense:
        ax.axhline(100 * max(dense), color="grey", ls="--", lw=1, label="dense")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("pruning ratio (dense weights / kept weights)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("accuracy against compression", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, plt, path)
