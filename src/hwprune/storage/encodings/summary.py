"""What storing a tensor costs, as the report prints it."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import ALIAS, ZERO_SIGNS, EncodedTensor, TensorView
from .chooser import Hints, choose_view, saved_encodings
from .quantized import QVALUES, dequantize_values
from .registry import ENCODINGS
from .valuecoding import VCODED, decode_values

__all__ = ["summarize", "stored_bytes"]


def _summary(enc: EncodedTensor, view: TensorView) -> dict[str, Any]:
    numel = math.prod(enc.shape)
    size = torch.empty((), dtype=enc.dtype).element_size()
    kept = int((view.nz & ~view.negzero).sum())
    if enc.encoding == ALIAS:  # a tied tensor: its values are stored under another name
        return {"encoding": enc.encoding, "params": dict(enc.meta), "payload_bytes": 0,
                "index_bytes": 0, "total_bytes": 0, "dense_bytes": numel * size,
                "numel": numel, "kept": kept, "min_index_bits": 0,
                "bits_per_kept_weight": 0.0 if kept else None}
    # the pattern's minimum does not depend on how the values are coded (dense has no
    # pattern: its values are not inflated to say so)
    coded = enc.meta.get(VCODED) is not None and enc.encoding != "dense"
    base = decode_values(enc, numel) if coded else enc
    base = dequantize_values(base) if base.meta.get(QVALUES) is not None else base
    min_bits = ENCODINGS[enc.encoding].min_index_bits(base)
    if min_bits is not None and enc.meta.get(ZERO_SIGNS):
        min_bits += int(((view.bits == 0) | view.negzero).sum())
    return {
        "encoding": enc.encoding,
        "params": dict(enc.meta),
        "payload_bytes": enc.nbytes,
        "index_bytes": enc.index_bytes,
        "total_bytes": enc.total_bytes,
        "dense_bytes": numel * size,
        "numel": numel,
        "kept": kept,
        "min_index_bits": min_bits,
        "bits_per_kept_weight": 8 * enc.total_bytes / kept if kept else None,
    }


def summarize(enc: EncodedTensor, t: Tensor) -> dict[str, Any]:
    """``stored_bytes``'s record for ``enc``, an encoding of ``t`` chosen elsewhere (e.g. by
    ``hwprune.storage.plan``), so a tensor is not encoded twice."""
    return _summary(enc, TensorView.of(t))


def stored_bytes(t: Tensor, hints: Hints = None, code_values: bool = True) -> dict[str, Any]:
    """What storing ``t`` costs, as the report prints it.

    Keys: ``encoding``, ``params`` (k, n, bh, bw, ...), ``payload_bytes``, ``index_bytes``,
    ``total_bytes`` (the bytes ``save`` writes for this tensor, outside the container's
    header), ``dense_bytes``, ``numel``, ``kept`` (elements other than +-0),
    ``min_index_bits`` (information-theoretic minimum of the chosen pattern's index:
    runs·log2 C(n, k) for k-of-n, log2 C(numel, stored values) for bitmask/CSR, log2 C(tiles,
    kept tiles) for blocks, state multinomial + sign bits for unified, plus one bit per zero
    with zero signs; 0 for dense and quantized, which have no index; ``hwprune.hardware``
    holds these formulas) and ``bits_per_kept_weight`` (8·total_bytes / kept; None when
    nothing is kept). ``code_values=False``: the encoding without coded value planes (the
    byte formulas of the encodings' table).
    """
    view = TensorView.of(t)
    return _summary(choose_view(view, hints, code_values, saved_encodings(view, hints)), view)
