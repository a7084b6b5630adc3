"""The chooser: every applicable encoding of a tensor, and the smallest exact one."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from ...errors import HwpruneError
from ...structures import Block, Element, KofN, Structure, parse_structure
from ..errors import StorageError
from .base import ZERO_SIGNS, EncodedTensor, TensorView, add_zero_signs
from .quantized import QVALUES, find_scale, quantize_values
from .registry import ENCODINGS

__all__ = ["Hints", "encodings_for", "choose", "choose_view", "normalize_hints"]

#: ``None``, a structure (``"2:4"``, ``"block:4x4"``, a ``Structure``), or explicit sizes:
#: ``{"kofn": (k, n), "block": (bh, bw), "unified": (bh, bw)}``
Hints = None | str | Structure | Mapping[str, tuple[int, int]]


def normalize_hints(hints: Hints) -> dict[str, tuple[int, int]]:
    """Hints as sizes: a ``KofN`` over input-channel elements gives (k, n); a ``Block`` gives
    the tile size for block and unified. Other structures say nothing about storage."""
    if hints is None:
        return {}
    if isinstance(hints, Mapping):
        out = {}
        for key, value in hints.items():
            if key not in ("kofn", "block", "unified"):
                raise StorageError(f"unknown hint {key!r}; allowed: 'kofn', 'block', 'unified'")
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not all(isinstance(v, int) and v >= 1 for v in value)):
                raise StorageError(f"hint {key!r} must be two positive ints; got {value!r}")
            out[key] = (int(value[0]), int(value[1]))
        return out
    try:
        s = parse_structure(hints)
    except HwpruneError as err:
        raise StorageError(f"bad storage hint {hints!r}: {err}") from err
    if isinstance(s, KofN) and isinstance(s.base, Element) and s.base.axis == 1:
        return {"kofn": (s.k, s.n)}
    if isinstance(s, Block):
        return {"block": (s.bh, s.bw), "unified": (s.bh, s.bw)}
    return {}


def encodings_for(t: Tensor, hints: Hints = None) -> list[EncodedTensor]:
    """Every applicable encoding of ``t`` (dense first, then simpler before more complex)."""
    return _encodings_for(TensorView.of(t), hints)


def _encodings_for(view: TensorView, hints: Hints, prune: bool = False) -> list[EncodedTensor]:
    """All applicable encodings; with ``prune``, skip those whose payload alone is already
    larger than the smallest total found so far (they cannot win)."""
    sizes = normalize_hints(hints)
    out: list[EncodedTensor] = []
    best = math.inf
    # a tensor with -0.0 is tried as it is and as +0.0 with a sign bit per zero
    variants = [(view, False)] + ([(view.canonical(), True)] if view.negzero.any() else [])
    # quantized weights: every sparse encoding is also tried with its values as codes
    scales = {signs: find_scale(base) for base, signs in variants}
    for enc in sorted(ENCODINGS.values(), key=lambda e: e.simplicity):
        for base, signs in variants:
            if signs and enc.name == "dense":
                continue
            found = scales[signs] if enc.name not in ("dense", "quantized") else None
            for params in enc.candidates(base, sizes):
                # codes can undercut the payload bound, so it only prunes unquantized tries
                if prune and found is None and enc.min_payload(base, params) > best:
                    continue
                try:
                    e = enc.encode_view(base, **params)
                except StorageError:
                    continue
                tries = [e] + ([q] if found and (q := quantize_values(e, found)) else [])
                for t in tries:
                    out.append(add_zero_signs(t, view) if signs else t)
                    best = min(best, out[-1].total_bytes)
    return out


def _simplicity(enc: EncodedTensor) -> tuple[int, bool, bool, bool]:
    return (ENCODINGS[enc.encoding].simplicity, bool(enc.meta.get(ZERO_SIGNS)),
            QVALUES in enc.meta, enc.meta.get("positions") == "rank")


def choose(t: Tensor, hints: Hints = None) -> EncodedTensor:
    """The smallest exact encoding of ``t`` by total bytes (payload + index); ties go to the
    simpler encoding (dense < bitmask < csr < block < kofn < rowblock < unified < quantized)."""
    return choose_view(TensorView.of(t), hints)


def choose_view(view: TensorView, hints: Hints) -> EncodedTensor:
    """``choose`` of a tensor already analysed."""
    candidates = _encodings_for(view, hints, prune=True)
    return min(candidates, key=lambda e: (e.total_bytes, _simplicity(e)))
