"""Block-max rows (BMWM, DARB): one block size per row, at most one nonzero per block."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ...hardware import ROW_BLOCK_SIZES, ceil_log2, row_block_min_bits
from ..bits import from_raw_bits, pack_uint, unpack_uint
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

__all__ = ["RowBlock", "row_block_sizes"]

#: bits of a row's size code: an index into ``ROW_BLOCK_SIZES``
_SIZE_BITS = ceil_log2(len(ROW_BLOCK_SIZES))


class RowBlock(Encoding):
    """Block-max rows (BMWM; DARB's per-row block sizes): row r of the im2col matrix is cut
    into blocks of b_r consecutive weights (b_r from ``hwprune.hardware.ROW_BLOCK_SIZES``),
    each holding at most one nonzero. Stored: every row's size (``ceil(log2 7)`` = 3 bits),
    per block the position of its weight (``ceil(log2 b_r)`` bits, grouped by size: array
    ``positions<b>``) and one value (zero where the block is empty). Each row takes the
    largest size that fits."""

    name, simplicity = "rowblock", 5
    cost = 2

    def encode_view(self, view: TensorView) -> EncodedTensor:
        self.require_sparse_ok(view)
        rows, cols = view.matrix
        sizes = row_block_sizes(view.nz.reshape(rows, cols))
        bits = view.bits.reshape(rows, cols)
        nz = view.nz.reshape(rows, cols)
        values = []
        index = {"sizes": pack_uint(np.searchsorted(ROW_BLOCK_SIZES, sizes), _SIZE_BITS)}
        for b in np.unique(sizes).tolist():
            r = np.flatnonzero(sizes == b)
            nb = -(-cols // b)
            pad = ((0, 0), (0, nb * b - cols))
            blocks_nz = np.pad(nz[r], pad).reshape(len(r), nb, b)
            pos = blocks_nz.argmax(axis=2)  # 0 where the block is empty
            blocks = np.pad(bits[r], pad).reshape(len(r), nb, b)
            values.append(np.take_along_axis(blocks, pos[..., None], axis=2).reshape(-1))
            index[f"positions{b}"] = pack_uint(pos.reshape(-1), ceil_log2(b))
        return view.encoded(self.name, {"values": np.concatenate(values)}, index)

    @staticmethod
    def row_sizes(enc: EncodedTensor) -> np.ndarray:
        """The block size of every row of a ``rowblock`` encoding."""
        codes = unpack_uint(stored_array(enc.index, "sizes", enc), _SIZE_BITS, matrix_of(enc)[0])
        if (codes >= len(ROW_BLOCK_SIZES)).any():
            raise StorageError("rowblock: a stored row block size code is not a size")
        return np.asarray(ROW_BLOCK_SIZES)[codes.astype(np.int64)]

    def decode(self, enc: EncodedTensor) -> Tensor:
        rows, cols = matrix_of(enc)
        sizes = self.row_sizes(enc)
        present = np.unique(sizes).tolist()
        if set(enc.index) != {"sizes"} | {f"positions{b}" for b in present}:
            raise StorageError("rowblock: position arrays do not match the row sizes")
        counts = [int((sizes == b).sum()) * -(-cols // b) for b in present]
        values = stored_values(enc, sum(counts))
        out = zero_bits(enc).reshape(rows, cols)
        start = 0
        for b, count in zip(present, counts, strict=True):
            r = np.flatnonzero(sizes == b)
            nb = -(-cols // b)
            pos = unpack_uint(stored_array(enc.index, f"positions{b}", enc), ceil_log2(b), count)
            col = (np.arange(nb) * b)[None, :] + pos.astype(np.int64).reshape(len(r), nb)
            if (pos >= b).any() or (col >= cols).any():
                raise StorageError("rowblock: a stored position is outside its block")
            out[r[:, None], col] = values[start:start + count].reshape(len(r), nb)
            start += count
        return from_raw_bits(out.reshape(-1), enc.dtype, enc.shape, owned=True)

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        return [{}] if view.sparse_ok() and view.matrix[1] >= 2 else []

    def lower_bound(self, view: TensorView, params: dict) -> int:
        """A row with two nonzeros in one aligned pair takes size 1 (cols values); any other
        row at least ceil(cols / 64) values."""
        rows, cols = view.matrix
        nz = view.nz.reshape(rows, cols)
        even = cols // 2 * 2
        pairs = (nz[:, 0:even:2] & nz[:, 1:even:2]).any(axis=1)
        values = int(pairs.sum()) * cols + int((~pairs).sum()) * -(-cols // 64)
        return values * view.itemsize

    def sizes(self, view: TensorView, params: dict) -> Size:
        self.require_sparse_ok(view)
        rows, cols = view.matrix
        sizes = row_block_sizes(view.nz.reshape(rows, cols))
        values, index = 0, -(-rows * _SIZE_BITS // 8)
        for b, count in zip(*np.unique(sizes, return_counts=True), strict=True):
            blocks = int(count) * -(-cols // int(b))
            values += blocks
            index += -(-blocks * ceil_log2(int(b)) // 8)
        return Size({"values": values}, index)

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        """Per block log2 of its real width (where its weight can be), + log2 7 per row."""
        return row_block_min_bits(matrix_of(enc)[1], self.row_sizes(enc).tolist())


def row_block_sizes(nz: np.ndarray) -> np.ndarray:
    """Per row of a (rows, cols) nonzero mask, the largest size in ``ROW_BLOCK_SIZES`` whose
    blocks each hold at most one nonzero (1 always fits)."""
    rows, cols = nz.shape
    sizes = np.ones(rows, np.int64)
    for b in ROW_BLOCK_SIZES[1:]:
        if b > cols:
            break
        nb = -(-cols // b)
        fits = (np.pad(nz, ((0, 0), (0, nb * b - cols))).reshape(rows, nb, b).sum(2) <= 1)
        sizes[fits.all(axis=1)] = b
    return sizes
