"""Irregular sparsity at the information bound: Golomb-coded gaps between positions."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ...hardware import irregular_min_bits
from ..bits import element_size, from_raw_bits
from ..errors import StorageError
from ..golomb import best_parameter_bits, gaps_of, golomb_bits, golomb_decode, golomb_encode
from .base import (
    EncodedTensor,
    Encoding,
    Size,
    TensorView,
    stored_array,
    stored_param,
    zero_bits,
)

__all__ = ["Gaps", "values_around", "FEW_ZEROS"]


class Gaps(Encoding):
    """The nonzero values + the positions of the smaller of the two sets (nonzeros, or zeros
    where more than half the elements are nonzero) as Golomb-coded gaps in flat order
    (``hwprune.storage.golomb``), with the parameter ``m`` chosen per tensor from exact bit
    counts. Within about 1 % of log2 C(N, z) for independent positions."""

    # tried with the one-pass encodings: its lower bound rules it out cheaply where it cannot
    # win (k-of-n and block patterns), and where it can, its size bounds the costlier ones
    name, simplicity = "gaps", 8

    @staticmethod
    def _coded(view: TensorView) -> tuple[np.ndarray, bool]:
        """The gaps of the coded set, and whether that set is the zeros (kept in
        ``view.memo``: the chooser's candidates, size and encoding share them)."""
        if "gaps" not in view.memo:
            zeros = 2 * view.nonzero > view.numel
            view.memo["gaps"] = gaps_of(np.flatnonzero(~view.nz if zeros else view.nz)), zeros
        return view.memo["gaps"]

    def encode_view(self, view: TensorView, m: int | None = None) -> EncodedTensor:
        self.require_sparse_ok(view)
        gaps, zeros = self._coded(view)
        m = _best(view, gaps) if m is None else m
        if not isinstance(m, int) or m < 1:
            raise StorageError(f"gaps: parameter m must be a positive int; got {m!r}")
        return view.encoded(self.name, {"values": view.bits[view.nz]},
                            {"positions": golomb_encode(gaps, m)}, m=m, zeros=zeros)

    def decode(self, enc: EncodedTensor) -> Tensor:
        m, numel = stored_param(enc, "m"), math.prod(enc.shape)
        zeros = enc.meta.get("zeros")
        if not isinstance(zeros, bool):
            raise StorageError("gaps: stored parameter 'zeros' is missing or not a bool")
        values = stored_array(enc.payload, "values", enc)
        width = element_size(enc.dtype)
        if values.ndim != 1 or values.dtype.kind != "u" or values.dtype.itemsize != width \
                or values.size > numel:
            raise StorageError(f"gaps: expected at most {numel} values of {width} bytes; got "
                               f"{values.size} of {values.dtype}")
        count = numel - values.size if zeros else values.size
        # the positions must fit the stream and the shape before the tensor is allocated
        gaps = golomb_decode(stored_array(enc.index, "positions", enc), count, m)
        # gaps in [0, numel): the positions strictly increase and their sum cannot overflow
        if gaps.size and (int(gaps.min()) < 0 or int(gaps.max()) >= numel):
            raise StorageError(f"gaps: a stored gap is outside [0, {numel})")
        pos = np.cumsum(gaps + 1) - 1
        if pos.size and pos[-1] >= numel:
            raise StorageError(f"gaps: a stored position is past the tensor's {numel} elements")
        if zeros:
            out = values_around(values, pos, numel)
        else:
            out = zero_bits(enc)
            out[pos] = values
        return from_raw_bits(out, enc.dtype, enc.shape, owned=True)

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        # m is chosen in ``sizes`` (and again, from the memo, in ``encode_view``): the chooser
        # skips that where ``lower_bound`` already loses
        return [{}] if view.sparse_ok() else []

    def sizes(self, view: TensorView, params: dict) -> Size:
        self.require_sparse_ok(view)
        gaps, _ = self._coded(view)
        m = params.get("m")
        bits = golomb_bits(gaps, m) if m else _best_bits(view, gaps)[1]
        return Size({"values": view.nonzero}, -(-bits // 8))

    def lower_bound(self, view: TensorView, params: dict) -> int:
        """The values + the fewest bits any m can take: m = 1 codes each gap in g + 1 bits,
        i.e. (last coded position + 1) bits in all; m >= 2 takes at least 2 bits a gap (a
        unary stop bit and at least one remainder bit)."""
        nonzero = view.nonzero
        zeros = 2 * nonzero > view.numel
        coded = view.numel - nonzero if zeros else nonzero
        if coded == 0:
            return nonzero * view.itemsize
        in_set = ~view.nz if zeros else view.nz
        last = view.numel - 1 - int(np.argmax(in_set[::-1]))
        return nonzero * view.itemsize + -(-min(2 * coded, last + 1) // 8)

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return irregular_min_bits(math.prod(enc.shape), enc.payload["values"].size)


#: up to this many zeros, ``values_around`` copies the runs of values between them one by one;
#: with more, a mask of the nonzero positions places the values in one pass
FEW_ZEROS = 64


def values_around(values: np.ndarray, zeros: np.ndarray, numel: int) -> np.ndarray:
    """``numel`` raw bits: zero at the strictly increasing positions ``zeros`` (all below
    ``numel``), ``values`` in order everywhere else (``values.size == numel - zeros.size``)."""
    if zeros.size > FEW_ZEROS:
        mask = np.ones(numel, bool)
        mask[zeros] = False
        out = np.zeros(numel, values.dtype)
        out[mask] = values
        return out
    out = np.empty(numel, values.dtype)
    start = 0  # the first element after the previous zero
    for i, z in enumerate(zeros.tolist()):
        out[start:z] = values[start - i: z - i]
        out[z] = 0
        start = z + 1
    out[start:] = values[start - zeros.size:]
    return out


def _best(view: TensorView, gaps: np.ndarray) -> int:
    """``best_parameter`` of the view's coded gaps."""
    return _best_bits(view, gaps)[0]


def _best_bits(view: TensorView, gaps: np.ndarray) -> tuple[int, int]:
    """``best_parameter_bits`` of the view's coded gaps, kept in ``view.memo``."""
    if "gaps m" not in view.memo:
        view.memo["gaps m"] = best_parameter_bits(gaps, view.numel)
    return view.memo["gaps m"]
