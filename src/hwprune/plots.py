"""Plots of pruning results (matplotlib, the optional ``plots`` extra).

Each function writes one PNG and returns its path. They take plain data (a ``Report``, or
``pruner.layer_extras()``), so they also work on results loaded back from JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import HwpruneError
from .report import Report

__all__ = ["alpha_histograms", "kept_fraction_bars", "mask_metric_curves"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise HwpruneError("plots need matplotlib: pip install 'hwprune[plots]'") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def alpha_histograms(extras: Mapping[str, Mapping[str, Any]], path: str | Path,
                     bins: int = 40) -> Path:
    """PSP: one histogram of log10 |alpha| per layer, with the threshold marked.

    ``extras``: ``pruner.layer_extras()`` of a PSP pruner (each layer has an ``"alpha"`` list).
    Zero alphas are drawn at the left edge. The gap between a cluster near the threshold and
    one near 1 is what PSP's weight decay is meant to open.
    """
    layers = {n: e for n, e in extras.items() if e.get("alpha")}
    if not layers:
        raise HwpruneError("alpha_histograms: no layer has an 'alpha' list; pass the "
                           "layer_extras() of a PSP pruner")
    plt = _pyplot()
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    floor = -6.0
    for ax, (name, e) in zip(axes.flat, layers.items(), strict=False):
        logs = [math.log10(abs(a)) if a else floor for a in e["alpha"]]
        ax.hist([max(v, floor) for v in logs], bins=bins, range=(floor, 1.0), color="tab:blue")
        if e.get("threshold"):
            ax.axvline(math.log10(e["threshold"]), color="tab:red", ls="--", lw=1)
        pruned = e.get("pruned_fraction")
        title = name if pruned is None else f"{name}\n{pruned:.0%} pruned"
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.supxlabel("log10 |alpha|  (red: threshold)", fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def kept_fraction_bars(rep: Report, path: str | Path) -> Path:
    """Per layer, the kept fraction at each granularity (elements, kernels, channels,
    filters): how much of the pruning a deployment can actually exploit."""
    plt = _pyplot()
    kinds = ("kept_elements", "kept_kernels", "kept_channels", "kept_filters")
    names = [r.name for r in rep.rows]
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 3.6))
    for i, kind in enumerate(kinds):
        values = [getattr(r, kind) if getattr(r, kind) is not None else 0.0 for r in rep.rows]
        ax.bar([x + i * width for x in range(len(names))], values, width,
               label=kind.removeprefix("kept_"))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))])
    ax.set_xticklabels(names, rotation=75, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction")
    ax.set_title(rep.name, fontsize=9)
    ax.legend(fontsize=7, ncols=4, loc="lower left")
    fig.tight_layout()
    return _save(fig, plt, path)


def mask_metric_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                       metrics: Sequence[str] = ("confidence", "diversity"),
                       x: str = "epoch") -> Path:
    """DPP: each layer's mask confidence and diversity over training, one panel per metric.

    ``history``: records ``{x: number, "layers": {layer: {metric: value}}}``, as in
    ``DPP.history`` (one per ``epoch_end()``, ``x="epoch"``) or logged per step (``x="step"``).
    The mean over layers is drawn in black.
    """
    records = [h for h in history if h.get("layers")]
    if not records:
        raise HwpruneError("mask_metric_curves: the history has no records with 'layers'; "
                           "pass DPP.history or records of layer_extras() over training")
    missing = [m for m in metrics if m not in next(iter(records[0]["layers"].values()))]
    if missing:
        raise HwpruneError(f"mask_metric_curves: metric(s) {missing} not in the history; "
                           f"it has {sorted(next(iter(records[0]['layers'].values())))}")
    plt = _pyplot()
    xs = [h[x] for h in records]
    names = list(records[0]["layers"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=True):
        series = [[h["layers"][n][metric] for h in records] for n in names]
        for name, ys in zip(names, series, strict=True):
            ax.plot(xs, ys, lw=0.8, alpha=0.5, label=name if len(names) <= 8 else None)
        ax.plot(xs, [sum(v) / len(v) for v in zip(*series, strict=True)], color="black", lw=2,
                label="mean")
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
