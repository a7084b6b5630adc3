"""Plots of pruning results (matplotlib, the optional ``plots`` extra).

Each function writes one PNG and returns its path. They take plain data (a ``Report``,
``pruner.layer_extras()``, histories), so they also work on results loaded back from JSON.
``write_plots`` writes every one that applies: it is what ``hwprune run`` and ``hwprune
report --plots`` both call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import HwpruneError
from .measure import Report

__all__ = ["alpha_histograms", "kept_fraction_bars", "mask_metric_curves", "mask_images",
           "block_size_histograms", "training_curves", "write_plots", "pyplot", "save_figure"]


def _grid(plt, panels: int, width: float, height: float, cols: int = 4):
    """A figure with ``panels`` axes in rows of ``cols``; unused axes are switched off."""
    cols = min(cols, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    return fig, list(axes.flat)[:panels]


def pyplot():
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
    plt = pyplot()
    fig, axes = _grid(plt, len(layers), 3.2, 2.4)
    floor = -6.0
    for ax, (name, e) in zip(axes, layers.items(), strict=True):
        logs = [math.log10(abs(a)) if a else floor for a in e["alpha"]]
        ax.hist([max(v, floor) for v in logs], bins=bins, range=(floor, 1.0), color="tab:blue")
        if e.get("threshold"):
            ax.axvline(math.log10(e["threshold"]), color="tab:red", ls="--", lw=1)
        pruned = e.get("pruned_fraction")
        title = name if pruned is None else f"{name}\n{pruned:.0%} pruned"
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.supxlabel("log10 |alpha|  (red: threshold)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plt, path)


def kept_fraction_bars(rep: Report, path: str | Path) -> Path:
    """Per layer, the kept fraction at each granularity (elements, kernels, channels,
    filters): how much of the pruning a deployment can actually exploit."""
    plt = pyplot()
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
    return save_figure(fig, plt, path)


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
    plt = pyplot()
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
    return save_figure(fig, plt, path)


def mask_images(weights: Mapping[str, Any], path: str | Path,
                structures: Mapping[str, str] | None = None) -> Path:
    """Which weights survived, one panel per layer: the im2col matrix of each weight (rows =
    output units / filters, columns = inputs x kernel positions), kept weights black.

    ``weights``: {name: tensor} (weights or bool masks; nonzero = kept), e.g.
    ``hwprune.report.weights_of(model)``. Whole structures show as shapes: a pruned filter is
    a white row, a pruned input channel a white band of R·S columns, k-of-n a regular
    speckle, blocks white tiles. ``structures``: {name: structure} for the panel titles.
    """
    layers = {n: w for n, w in weights.items() if getattr(w, "dim", lambda: 0)() >= 2}
    if not layers:
        raise HwpruneError("mask_images: no weight with 2 or more dimensions to draw; pass "
                           "{name: tensor}, e.g. hwprune.report.weights_of(model)")
    plt = pyplot()
    fig, axes = _grid(plt, len(layers), 3.0, 2.4)
    for ax, (name, w) in zip(axes, layers.items(), strict=True):
        kept = (w.detach() != 0).reshape(w.shape[0], -1).cpu().numpy()
        ax.imshow(kept, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        structure = (structures or {}).get(name)
        label = f" {structure}" if structure and structure != "-" else ""
        ax.set_title(f"{name}{label}\n{tuple(w.shape)}, {kept.mean():.1%} kept", fontsize=6)
        ax.tick_params(labelsize=5)
    fig.supxlabel("inputs x kernel positions (im2col columns); black: kept", fontsize=8)
    fig.supylabel("output units", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plt, path)


def block_size_histograms(extras: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """DARB: per layer, how many rows got each block size (the density adaptation at a
    glance: dense rows get small blocks, sparse rows large ones).

    ``extras``: ``pruner.layer_extras()`` of a DARB pruner (each layer has ``"block_sizes"``,
    one per row of its im2col matrix), or the ``extras`` of a report's rows.
    """
    layers = {n: e["block_sizes"] for n, e in extras.items() if e.get("block_sizes")}
    if not layers:
        raise HwpruneError("block_size_histograms: no layer has 'block_sizes'; pass the "
                           "layer_extras() of a DARB pruner")
    plt = pyplot()
    sizes = sorted({int(b) for v in layers.values() for b in v})
    fig, axes = _grid(plt, len(layers), 3.0, 2.2)
    for ax, (name, v) in zip(axes, layers.items(), strict=True):
        counts = [sum(1 for b in v if int(b) == s) for s in sizes]
        ax.bar(range(len(sizes)), counts, color="tab:green")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([str(s) for s in sizes], fontsize=6)
        ratio = extras[name].get("pruning_ratio")
        ax.set_title(name if ratio is None else f"{name}\nratio {ratio:.2f}x", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.supxlabel("block size b (rows keep 1 weight per b)", fontsize=8)
    fig.supylabel("rows", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, plt, path)


def training_curves(history: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Test accuracy and sparsity per epoch of one run, phases shaded.

    ``history``: a run's per-epoch records (``metrics.jsonl``: ``epoch``, ``phase``,
    ``test_accuracy``, ``sparsity``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [100 * h["test_accuracy"] for h in history], "o-", ms=3,
            label="test accuracy")
    ax.plot(epochs, [100 * h["sparsity"] for h in history], "s--", ms=3, label="sparsity")
    colours = {"dense": "#eeeeee", "prune": "#fde9d9", "finetune": "#e2efda"}
    for h in history:
        ax.axvspan(h["epoch"] - 0.5, h["epoch"] + 0.5, color=colours.get(h["phase"], "white"),
                   lw=0)
    ax.set_xlabel("epoch (shaded: dense / prune / finetune)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 101)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, plt, path)


def write_plots(rep: Report, weights: Mapping[str, Any], out: str | Path,
                history: Sequence[Mapping[str, Any]] | None = None,
                training: Sequence[Mapping[str, Any]] | None = None,
                extras: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """Every plot that applies to a report, into folder ``out``: ``kept_fractions.png``,
    ``masks.png``, and from the method extras ``alphas.png`` (PSP), ``block_sizes.png``
    (DARB), ``mask_metrics.png`` (DPP, from ``history``, e.g. ``DPP.history``) and
    ``training.png`` (from ``training``, a run's per-epoch records). ``weights``: {row name:
    weight}. ``extras``: {layer: extras} (default: the report rows' extras; pass
    ``pruner.layer_extras()`` when the reported model's layer names are not the pruner's).
    Returns the paths written (both ``hwprune run`` and ``hwprune report`` use this)."""
    out = Path(out)
    if extras is None:
        extras = {r.name: r.extras for r in rep.rows if r.extras}
    paths = [kept_fraction_bars(rep, out / "kept_fractions.png"),
             mask_images(weights, out / "masks.png", {r.name: r.structure for r in rep.rows})]
    if any(e.get("alpha") for e in extras.values()):
        paths.append(alpha_histograms(extras, out / "alphas.png"))
    if any(e.get("block_sizes") for e in extras.values()):
        paths.append(block_size_histograms(extras, out / "block_sizes.png"))
    records = [h for h in history or () if h.get("layers")]
    if records and "confidence" in next(iter(records[0]["layers"].values())):
        paths.append(mask_metric_curves(records, out / "mask_metrics.png"))
    if training:
        paths.append(training_curves(training, out / "training.png", rep.name))
    return paths


def save_figure(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
