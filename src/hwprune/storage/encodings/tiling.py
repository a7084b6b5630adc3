"""The tiling block and unified encodings share: bh x bw tiles of the im2col matrix."""

from __future__ import annotations

import numpy as np

from ..errors import StorageError
from .base import TensorView

__all__ = ["tiles", "untile", "valid_tiles", "check_tile", "tile_candidates"]


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


def check_tile(view: TensorView, bh: int, bw: int) -> tuple[int, int]:
    """The matrix (rows, cols) of ``view``, or a ``StorageError`` if bh x bw does not fit."""
    rows, cols = view.matrix
    if not (isinstance(bh, int) and isinstance(bw, int)) or not (1 <= bh <= rows and
                                                                  1 <= bw <= cols):
        raise StorageError(
            f"block {bh}x{bw} does not fit the {rows}x{cols} matrix of shape {view.shape}"
        )
    return rows, cols


def tile_candidates(view: TensorView, sizes: tuple[tuple[int, int], ...],
                    hint: tuple[int, int] | None) -> list[dict]:
    """The ``bh``/``bw`` parameter sets of ``sizes`` (and ``hint``) that fit ``view``."""
    rows, cols = view.matrix
    tried = list(sizes) + ([tuple(hint)] if hint is not None else [])
    return [{"bh": bh, "bw": bw} for bh, bw in dict.fromkeys(tried) if bh <= rows and bw <= cols]
