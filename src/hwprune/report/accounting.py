"""Storage accounting: what ``hwprune.save`` stores for each weight (payload, index, the
minimum index, the ratios) and what decoding it costs, per row, over the rows, and for the
whole file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..hardware import stored_selection
from ..storage import EncodedTensor, FilePlan, choose, summarize
from ..storage.encodings import RowBlock

if TYPE_CHECKING:
    from .result import LayerRow

__all__ = ["safe_div", "selection", "storage_fields", "storage_totals"]


def safe_div(a: float, b: float) -> float | None:
    """``a / b``, or ``None`` where ``b`` is 0."""
    return a / b if b else None


def selection(weight: Tensor, enc: EncodedTensor) -> tuple[float, float]:
    """(selection width, selection inputs per kept weight) of decoding ``weight`` as stored:
    ``hwprune.hardware.stored_selection`` of its encoding (docs/storage.md)."""
    row_sizes = (torch.from_numpy(RowBlock.row_sizes(enc)) if enc.encoding == "rowblock"
                 else None)
    return stored_selection(weight != 0, enc.encoding, enc.meta, row_sizes)


def storage_fields(weight: Tensor, structure: str,
                   enc: EncodedTensor | None = None) -> dict[str, Any]:
    """How ``hwprune.save`` stores ``weight`` (``enc``: its encoding, if already chosen): the
    row's storage fields."""
    if enc is None:
        enc = choose(weight, hints=None if structure == "-" else structure)
    info = summarize(enc, weight)
    dense, total, payload = info["dense_bytes"], info["total_bytes"], info["payload_bytes"]
    kept, min_bits = info["kept"], info["min_index_bits"]
    width, inputs = selection(weight, enc) if kept else (None, None)
    return {
        "stored_bytes": total,
        "index_bytes": info["index_bytes"],
        "encoding": info["encoding"],
        "payload_bytes": payload,
        "min_index_bits": min_bits,
        "compression_ratio": safe_div(dense, total),
        "compression_ratio_no_index": safe_div(dense, payload),
        "compression_ratio_min": None if min_bits is None else safe_div(dense,
                                                                         payload + min_bits / 8),
        "index_bits_per_kept": safe_div(8 * info["index_bytes"], kept),
        "stored_bits_per_kept": safe_div(8 * total, kept),
        "selection_width": width,
        "selection_inputs_per_kept": inputs,
    }


def storage_totals(rows: list[LayerRow], kept: int, file: FilePlan,
                   state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Storage totals over the rows (``kept`` weights): sums, ratios, means over kept weights;
    then the file ``hwprune.save`` writes for the whole ``state`` (``file``: its ``plan``)."""
    dense = sum(r.dense_bytes for r in rows)
    stored = sum(r.stored_bytes for r in rows)  # type: ignore[misc]
    payload = sum(r.payload_bytes for r in rows)  # type: ignore[misc]
    index = sum(r.index_bytes for r in rows)  # type: ignore[misc]
    min_bits = sum(r.min_index_bits for r in rows)  # type: ignore[misc]

    def mean(key: str) -> float | None:  # over kept weights; a row with none adds nothing
        return safe_div(sum(getattr(r, key) * r.kept_params for r in rows if r.kept_params),
                        kept)

    return {
        "dense_bytes": dense,
        "stored_bytes": stored,
        "index_bytes": index,
        "payload_bytes": payload,
        "min_index_bits": min_bits,
        "compression_ratio": safe_div(dense, stored),
        "compression_ratio_no_index": safe_div(dense, payload),
        "compression_ratio_min": safe_div(dense, payload + min_bits / 8),
        "index_bits_per_kept": safe_div(8 * index, kept),
        "stored_bits_per_kept": safe_div(8 * stored, kept),
        "selection_width": mean("selection_width"),
        "selection_inputs_per_kept": mean("selection_inputs_per_kept"),
        "file_tensor_bytes": file.data_bytes,
        "file_header_bytes": file.header_bytes,
        "file_bytes": file.size,
        "file_dense_bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }
