"""Irregular sparsity: any positions, as a bitmask or as compressed sparse rows."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ...hardware import irregular_min_bits
from ..bits import from_raw_bits, uint_for, unpack_bits
from ..errors import StorageError
from .base import (
    EncodedTensor,
    Encoding,
    Size,
    TensorView,
    matrix_of,
    stored_array,
    stored_values,
    zero_bits,
)

__all__ = ["Bitmask", "CSR"]


class Bitmask(Encoding):
    """One bit per element (numpy.packbits, big-endian bit order) + the nonzero values."""

    name, simplicity = "bitmask", 1

    def encode_view(self, view: TensorView) -> EncodedTensor:
        self.require_sparse_ok(view)
        return view.encoded(self.name, {"values": view.bits[view.nz]},
                            {"mask": np.packbits(view.nz)})

    def decode(self, enc: EncodedTensor) -> Tensor:
        mask = unpack_bits(stored_array(enc.index, "mask", enc), math.prod(enc.shape))
        values = stored_values(enc, int(mask.sum()))
        out = zero_bits(enc)
        out[mask] = values
        return from_raw_bits(out, enc.dtype, enc.shape, owned=True)

    def sizes(self, view: TensorView, params: dict) -> Size:
        self.require_sparse_ok(view)
        return Size({"values": view.nonzero}, -(-view.numel // 8))

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return irregular_min_bits(math.prod(enc.shape), enc.payload["values"].size)


class CSR(Encoding):
    """Compressed sparse rows of the im2col matrix; pointers and column indices in the
    smallest unsigned dtype that holds them."""

    name, simplicity = "csr", 2

    def encode_view(self, view: TensorView) -> EncodedTensor:
        self.require_sparse_ok(view)
        rows, cols = view.matrix
        m = view.nz.reshape(rows, cols)
        nnz = view.nonzero
        indptr = np.zeros(rows + 1, uint_for(nnz))
        np.cumsum(m.sum(axis=1), out=indptr[1:])
        indices = np.nonzero(m)[1].astype(uint_for(max(cols - 1, 0)))
        return view.encoded(self.name, {"values": view.bits[view.nz]},
                            {"indptr": indptr, "indices": indices})

    def decode(self, enc: EncodedTensor) -> Tensor:
        rows, cols = matrix_of(enc)
        indptr = stored_array(enc.index, "indptr", enc).astype(np.int64)
        indices = stored_array(enc.index, "indices", enc).astype(np.int64)
        counts = np.diff(indptr)
        if (indptr.size != rows + 1 or indptr[0] != 0 or (counts < 0).any()
                or indptr[-1] != indices.size or (indices >= cols).any()):
            raise StorageError("csr: row pointers and column indices are inconsistent")
        values = stored_values(enc, indices.size)
        out = zero_bits(enc)
        out[np.repeat(np.arange(rows), counts) * cols + indices] = values
        return from_raw_bits(out, enc.dtype, enc.shape, owned=True)

    def sizes(self, view: TensorView, params: dict) -> Size:
        self.require_sparse_ok(view)
        rows, cols = view.matrix
        nnz = view.nonzero
        index = (rows + 1) * uint_for(nnz).itemsize + nnz * uint_for(max(cols - 1, 0)).itemsize
        return Size({"values": nnz}, index)

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return irregular_min_bits(math.prod(enc.shape), enc.payload["values"].size)
