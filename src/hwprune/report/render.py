"""Rendering a ``Report``: the number formats, the per-layer and storage tables, Markdown, the
terminal (rich is imported only when printing) and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .result import Report

__all__ = ["pct", "ratio", "num", "fmt", "bytes_of", "si", "byte_size", "fmt_extra",
           "layer_table", "storage_table", "summary_lines", "storage_lines", "markdown",
           "print_report", "json_text"]


# -- number formats ------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def num(n: int | float | None) -> str:
    return "-" if n is None else f"{n:,}"


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def bytes_of(bits: float | None) -> int | None:
    """Whole bytes holding ``bits`` (rounded up), for display."""
    return None if bits is None else math.ceil(bits / 8)


def si(n: int | float | None) -> str:
    """MACs: exact with thousands separators below 10,000, else K/M/G/T with one decimal."""
    if n is None:
        return "-"
    if abs(n) < 10_000:
        return f"{int(n):,}"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n}"  # pragma: no cover - unreachable


def byte_size(n: int | None) -> str:
    """Bytes in B, KiB, MiB or GiB with one decimal."""
    if n is None:
        return "-"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


def fmt_extra(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- tables and lines shared by Markdown and the terminal ----------------------------------
def layer_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-layer table."""
    header = [
        "layer", "type", "shape", "structure", "elements", "kernels", "channels",
        "filters", "params", "kept", "MACs", "MACs left", "bytes",
    ]  # fmt: skip
    layers = (rep.baseline or {}).get("layers", {})
    if rep.baseline is not None:
        header.append("vs baseline")
    cells = []
    for r in rep.rows:
        row = [
            r.name,
            r.module,
            "x".join(map(str, r.shape)),
            r.structure,
            pct(r.kept_elements),
            pct(r.kept_kernels),
            pct(r.kept_channels),
            pct(r.kept_filters),
            f"{r.params:,}",
            f"{r.kept_params:,}",
            si(r.macs_dense),
            si(r.macs_remaining),
            byte_size(r.dense_bytes),
        ]
        if rep.baseline is not None:
            row.append(ratio(layers.get(r.name, {}).get("param_ratio")))
        cells.append(row)
    return header, cells


def storage_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-layer storage table (docs/storage.md defines them)."""
    header = ["layer", "encoding", "dense", "stored", "index", "min index", "ratio",
              "w/o index", "at min", "index bits/kept", "selection width"]
    cells = [[r.name, r.encoding or "-", f"{r.dense_bytes:,}", num(r.stored_bytes),
              num(r.index_bytes), num(bytes_of(r.min_index_bits)),
              ratio(r.compression_ratio), ratio(r.compression_ratio_no_index),
              ratio(r.compression_ratio_min), fmt(r.index_bits_per_kept),
              fmt(r.selection_width)] for r in rep.rows]
    return header, cells


def storage_lines(rep: Report) -> list[str]:
    t = rep.total
    return [
        f"stored {t['stored_bytes']:,} B of {t['dense_bytes']:,} B dense (index "
        f"{t['index_bytes']:,} B, minimum {num(bytes_of(t['min_index_bits']))} B): "
        f"compression {ratio(t['compression_ratio'])}, "
        f"{ratio(t['compression_ratio_no_index'])} without index, "
        f"{ratio(t['compression_ratio_min'])} at the minimum; "
        f"{fmt(t['index_bits_per_kept'])} index bits and "
        f"{fmt(t['stored_bits_per_kept'])} stored bits per kept weight; selection width "
        f"{fmt(t['selection_width'])}",
        f"hwprune.save file: {t['file_bytes']:,} B = {t['file_tensor_bytes']:,} B tensors + "
        f"{t['file_header_bytes']:,} B header (whole state dict, {t['file_dense_bytes']:,} B "
        "dense)",
    ]


def summary_lines(rep: Report) -> list[str]:
    t = rep.total
    lines = [
        f"params {t['params']:,} -> kept {t['kept_params']:,} "
        f"({pct(t['kept_elements'])}, pruning ratio {ratio(t['pruning_ratio'])}); "
        f"MACs {si(t['macs_dense'])} -> {si(t['macs_remaining'])} "
        f"(reduction {ratio(t['mac_reduction'])}); model MACs {si(t['model_macs'])}; "
        f"dense {byte_size(t['dense_bytes'])}"
    ]
    if rep.baseline is not None:
        b = rep.baseline
        lines.append(
            f"baseline {b['name']}: params {b['params']:,}, MACs {si(b['macs'])} "
            f"(model MACs {si(b['model_macs'])}); param ratio {ratio(b['param_ratio'])}, "
            f"MAC ratio {ratio(b['mac_ratio'])}"
        )
    return lines


# -- the two outputs ---------------------------------------------------------------------------
def markdown(rep: Report) -> str:
    """A GitHub table, one row per weight, then a totals line (and a baseline line), the
    storage table and lines, and the method's scalar extras."""
    header, cells = layer_table(rep)

    def line(items: list[str]) -> str:
        return "| " + " | ".join(s.replace("|", "\\|") for s in items) + " |"

    out = [f"### {rep.name}", ""]
    if rep.macs_per is not None:
        out += [f"MACs per {rep.macs_per} (example batch of {rep.total.get('batch_size')} "
                "divided out).", ""]
    out += [line(header), line(["---"] * len(header))]
    out += [line(c) for c in cells]
    out.append("")
    summary = summary_lines(rep)
    out.append(f"**Total**: {summary[0]}")
    out += [f"**Baseline**: {s.removeprefix('baseline ')}" for s in summary[1:]]
    header, cells = storage_table(rep)
    out += ["", "Storage (bytes as hwprune.save stores each weight; docs/storage.md):", "",
            line(header), line(["---"] * len(header))]
    out += [line(c) for c in cells]
    out += [""] + [f"**Storage**: {s}" for s in storage_lines(rep)]
    keys = sorted({k for r in rep.rows for k, v in r.extras.items()
                   if isinstance(v, (int, float))})
    if keys:  # the method's scalar per-layer facts (lists such as alphas: JSON and plots)
        out += ["", "Method extras:", "", line(["layer", *keys]),
                line(["---"] * (len(keys) + 1))]
        out += [line([r.name, *(fmt_extra(r.extras.get(k)) for k in keys)])
                for r in rep.rows if r.extras]
    if rep.skipped:
        out += ["", "Skipped (default targets left dense: they cannot carry the structure):", ""]
        out += [f"- `{name}`: {why}" for name, why in rep.skipped.items()]
    return "\n".join(out) + "\n"


def print_report(rep: Report, console: Any = None) -> None:
    """Print rich tables (to ``console``, or a new ``rich.console.Console``)."""
    from rich.console import Console  # rich is a dependency of printing only

    console = console if console is not None else Console()
    console.print(_rich_table(rep.name, *layer_table(rep), left=4))
    for s in summary_lines(rep):
        console.print(s, highlight=False)
    console.print(_rich_table(f"{rep.name}: storage", *storage_table(rep), left=2))
    for s in storage_lines(rep):
        console.print(s, highlight=False)
    for name, why in rep.skipped.items():
        console.print(f"skipped {name}: {why}", highlight=False, markup=False)


def _rich_table(title: str, header: list[str], cells: list[list[str]], left: int) -> Any:
    """A rich table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):  # names fold rather than being cut off with an ellipsis
        table.add_column(h, justify="left" if i < left else "right", overflow="fold")
    for c in cells:
        table.add_row(*c)
    return table

def json_text(data: dict[str, Any], path: str | Path | None = None,
              indent: int | None = 2) -> str:
    """``data`` (a report's ``to_dict()``) as JSON text; also written to ``path`` if given."""
    text = json.dumps(data, indent=indent, allow_nan=False)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text
