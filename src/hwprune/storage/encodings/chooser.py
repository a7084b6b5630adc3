"""The chooser: every applicable encoding of a tensor, and the smallest exact one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ...errors import HwpruneError
from ...structures import Block, Element, KofN, Structure, parse_structure
from ..bits import raw_bits
from ..errors import StorageError
from .base import EncodedTensor, TensorView, add_zero_signs
from .quantized import find_scale, quantize_values
from .registry import ENCODINGS
from .valuecoding import MIN_CODED
from .valuecoding import code_values as code_value_planes

__all__ = ["Hints", "Candidate", "encodings_for", "choose", "choose_view", "normalize_hints",
           "saved_encodings", "small_vector_choice", "FEW_ZEROS_SHARE", "SMALL_VECTOR_NUMEL",
           "SMALL_VECTOR_ENCODINGS"]

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
    """Every applicable encoding of ``t`` (dense first, then simpler before more complex),
    each actually encoded (``choose`` computes their sizes instead and encodes one)."""
    view = TensorView.of(t)
    out = []
    for c in _candidates(view, hints, shortcut=False):
        try:
            out.append(_build(view, c))
        except StorageError:
            continue
    return out


class Candidate(NamedTuple):
    """One way to store a tensor, with its exact size computed without encoding it (a named
    tuple: the chooser makes a few dozen per tensor)."""

    encoding: str
    params: dict
    signs: bool  # the zero-signs variant
    qvalues: bool  # payload as quantized codes
    total: int
    rank: tuple  # tie-break: simpler first

    def key(self) -> tuple:
        return (self.total, self.rank)


#: a tensor with at most one zero in this many elements is not searched for an encoding that
#: needs zeros (every one but dense, unified and quantized): it could save at most that share
#: of the dense bytes (a few bytes of a large dense layer with a stray zero), and the search
#: costs more time than the rest of that tensor's saving
FEW_ZEROS_SHARE = 1024


def _candidates(view: TensorView, hints: Hints, shortcut: bool = True,
                only: tuple[str, ...] | None = None) -> list[Candidate]:
    """Every applicable (encoding, parameters, variant) with its exact total bytes; with
    ``shortcut``, not those that cannot win (sparse encodings of a tensor without zeros).
    ``only``: these encodings alone, without the variants (zero signs, quantized values)."""
    sizes = normalize_hints(hints)
    # a tensor with -0.0 is tried as it is and as +0.0 with a sign bit per zero
    variants = [(view, False)] + ([(view.canonical(), True)]
                                  if only is None and view.negzero.any() else [])
    out: list[Candidate] = []
    best: Candidate | None = None
    # the cheap closed forms first, so that the bounds of the costly ones have a best to beat
    for enc in _ORDER:
        if only is not None and enc.name not in only:
            continue
        for base, signs in variants:
            if signs and enc.name == "dense":
                continue
            if shortcut and enc.needs_zeros and (
                    base.numel - base.nonzero) * FEW_ZEROS_SHARE <= base.numel:
                continue  # its payload alone is at most its zeros' bytes below dense
            signs_bytes = -(-int(np.count_nonzero(~base.nz)) // 8) if signs else 0
            # the quantized-values variant: found once per analysed tensor, where tried
            found = None if only is not None or enc.name in ("dense", "quantized") else (
                find_scale(base))
            if shortcut and found is None and best is not None and (
                    enc.family_bound(base, sizes), enc.simplicity) > (best.total, best.rank[0]):
                continue
            for params in enc.candidates(base, sizes):
                # a bound at the best total loses the tie too where this one is less simple.
                # The bounds count raw values: not used where the values could be codes
                if shortcut and found is None and best is not None and (
                        enc.lower_bound(base, params), enc.simplicity) > (best.total,
                                                                          best.rank[0]):
                    continue
                try:
                    size = enc.sizes(base, params)
                except StorageError:
                    continue
                mode = params.get("positions")
                rank = (enc.simplicity, signs, False, mode == "rank", mode == "coded")
                out.append(Candidate(enc.name, params, signs, False,
                                     size.total(base.itemsize) + signs_bytes, rank))
                best = out[-1] if best is None else min(best, out[-1], key=Candidate.key)
                if found is not None and size.values:
                    width = (2 * found[0]).bit_length()
                    coded = sum(-(-n * width // 8) for n in size.values.values())
                    out.append(Candidate(enc.name, params, signs, True,
                                         coded + base.itemsize + size.other + size.index
                                         + signs_bytes, rank[:2] + (True,) + rank[3:]))
                    best = min(out[-2], out[-1], best, key=Candidate.key)
    return out


#: the encodings in the order ``_candidates`` tries them
_ORDER = sorted(ENCODINGS.values(), key=lambda e: (e.cost, e.simplicity))


def _build(view: TensorView, c: Candidate) -> EncodedTensor:
    """Encode candidate ``c`` of ``view``."""
    base = view.canonical() if c.signs else view
    enc = ENCODINGS[c.encoding].encode_view(base, **c.params)
    if c.qvalues:
        found = find_scale(base)
        coded = quantize_values(enc, found) if found is not None else None
        if coded is None:
            raise StorageError(f"{c.encoding}: the values are not quantized")
        enc = coded
    return add_zero_signs(enc, view) if c.signs else enc


#: vectors (0-D and 1-D tensors: biases, BatchNorm's parameters and statistics) of fewer
#: elements, without a hint and not constant, are saved dense or as a bitmask, whichever is
#: smaller: other encodings could save a few bytes at most on them, and trying them all costs
#: more time than the rest of such a tensor's saving. A constant one (BatchNorm's ones and
#: zeros at initialisation) tries every encoding: unified or gaps store it in a few bytes
SMALL_VECTOR_NUMEL = MIN_CODED
SMALL_VECTOR_ENCODINGS = ("dense", "bitmask")


def saved_encodings(view: TensorView, hint: Hints) -> tuple[str, ...] | None:
    """The encodings ``save`` (and ``stored_bytes``) try on the analysed tensor ``view`` with
    ``hint`` (``None``: every one): ``SMALL_VECTOR_ENCODINGS`` for a small vector that is not
    constant."""
    if (len(view.shape) <= 1 and view.numel < SMALL_VECTOR_NUMEL and hint is None
            and not (view.bits == view.bits[:1]).all()):
        return SMALL_VECTOR_ENCODINGS
    return None


def small_vector_choice(t: Tensor, hint: Hints) -> EncodedTensor | None:
    """What ``save`` chooses for a small vector with no zero and not constant (BatchNorm's
    trained parameters and statistics, biases), found without analysing it: dense, the only
    one of ``SMALL_VECTOR_ENCODINGS`` a tensor without zeros can take (and too short for its
    values to be coded). ``None`` for any other tensor (the chooser decides)."""
    if (hint is not None or t.dim() > 1 or not 1 < t.numel() < SMALL_VECTOR_NUMEL
            or t.layout != torch.strided or t.device.type != "cpu"):
        return None
    bits = raw_bits(t, copy=False)
    if bits.ndim != 1 or not bits.all() or (bits == bits[0]).all():
        return None
    return EncodedTensor("dense", t.dtype, tuple(t.shape), {"values": bits}, {})


def choose(t: Tensor, hints: Hints = None, code_values: bool = True,
           only: tuple[str, ...] | None = None) -> EncodedTensor:
    """The smallest exact encoding of ``t`` by total bytes (payload + index); ties go to the
    simpler encoding (dense < bitmask < csr < block < kofn < rowblock < unified < quantized
    < gaps). Sizes come from closed forms; only the winner is encoded. ``code_values``: store
    its values as coded byte planes where that is smaller (``valuecoding``). ``only``: the
    smallest of these encodings alone (``"dense"`` among them), without the zero-signs and
    quantized-values variants."""
    return choose_view(TensorView.of(t), hints, code_values, only)


def choose_view(view: TensorView, hints: Hints, code_values: bool = True,
                only: tuple[str, ...] | None = None) -> EncodedTensor:
    """``choose`` of a tensor already analysed."""
    if only is not None and "dense" not in only:
        raise StorageError(f"choose: only= must include 'dense' (always applicable); got {only}")
    best = min(_candidates(view, hints, only=only), key=Candidate.key)
    enc = _build(view, best)
    if enc.total_bytes != best.total:  # the closed forms are the definition of the sizes
        raise StorageError(f"{best.encoding}: encoded {enc.total_bytes} bytes, its size formula "
                           f"says {best.total}")
    if code_values:
        enc = code_value_planes(enc)
    return enc
