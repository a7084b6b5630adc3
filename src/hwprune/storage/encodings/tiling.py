"""The tiling block and unified encodings share: bh x bw tiles of the im2col matrix."""

from __future__ import annotations

import numpy as np

from ...hardware import im2col_shape
from ..errors import StorageError
from .base import EncodedTensor, TensorView

__all__ = ["tiles", "untile", "valid_tiles", "check_tile", "tile_candidates", "tile_grid",
           "real_elements"]


def tiles(flat: np.ndarray, rows: int, cols: int, bh: int, bw: int) -> np.ndarray:
    """(tiles, bh*bw) view of the (rows, cols) matrix, zero-padded at ragged edges, row-major
    tile order (the group order of ``hwprune.structures.Block``)."""
    pr, pc = -(-rows // bh) * bh, -(-cols // bw) * bw
    m = flat.reshape(rows, cols)
    if (pr, pc) != (rows, cols):
        padded = np.zeros((pr, pc), flat.dtype)
        padded[:rows, :cols] = m
        m = padded
    return m.reshape(pr // bh, bh, pc // bw, bw).transpose(0, 2, 1, 3).reshape(-1, bh * bw)


def untile(g: np.ndarray, rows: int, cols: int, bh: int, bw: int) -> np.ndarray:
    """Inverse of ``tiles``: the flat (rows, cols) matrix, padding dropped."""
    pr, pc = -(-rows // bh) * bh, -(-cols // bw) * bw
    m = g.reshape(pr // bh, pc // bw, bh, bw).transpose(0, 2, 1, 3).reshape(pr, pc)
    return np.ascontiguousarray(m[:rows, :cols]).reshape(-1)


def valid_tiles(rows: int, cols: int, bh: int, bw: int) -> np.ndarray:
    """``tiles`` of an all-True matrix: which tile slots hold real elements (not padding)."""
    return tiles(np.ones(rows * cols, bool), rows, cols, bh, bw)


def check_tile(t: TensorView | EncodedTensor, bh: int, bw: int) -> tuple[int, int]:
    """The matrix (rows, cols) of ``t`` (to encode, or as stored), or a ``StorageError`` if
    bh x bw does not fit: checked before decoding, so padding never outgrows the matrix."""
    rows, cols = im2col_shape(t.shape)
    if not (isinstance(bh, int) and isinstance(bw, int)) or not (1 <= bh <= rows and
                                                                  1 <= bw <= cols):
        raise StorageError(
            f"block {bh}x{bw} does not fit the {rows}x{cols} matrix of shape {t.shape}"
        )
    return rows, cols


def tile_grid(rows: int, cols: int, bh: int, bw: int) -> tuple[int, int]:
    """Tile rows and tile columns of the (rows, cols) matrix."""
    return -(-rows // bh), -(-cols // bw)


def real_elements(chosen: np.ndarray, rows: int, cols: int, bh: int, bw: int) -> int:
    """Real (not padding) elements of the tiles marked in ``chosen`` (bools in tile order),
    counted without building the tiles: only the last tile row and column are ragged."""
    tr, tc = tile_grid(rows, cols, bh, bw)
    grid = chosen.reshape(tr, tc)
    short_h, short_w = tr * bh - rows, tc * bw - cols  # padding in the last tile row, column
    count = np.count_nonzero  # of bools: faster than sum, the same number
    return (count(grid) * bh * bw - count(grid[-1]) * short_h * bw
            - count(grid[:, -1]) * short_w * bh + int(grid[-1, -1]) * short_h * short_w)


def tile_candidates(view: TensorView, sizes: tuple[tuple[int, int], ...],
                    hint: tuple[int, int] | None) -> list[dict]:
    """The ``bh``/``bw`` parameter sets of ``sizes`` (and ``hint``) that fit ``view``."""
    rows, cols = view.matrix
    tried = list(sizes) + ([tuple(hint)] if hint is not None else [])
    return [{"bh": bh, "bw": bw} for bh, bw in dict.fromkeys(tried) if bh <= rows and bw <= cols]
