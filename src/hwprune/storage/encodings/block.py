"""Block sparsity: bh x bw tiles of the im2col matrix, kept or not."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ...hardware import block_min_bits
from ..bits import from_raw_bits, unpack_bits
from .base import (
    EncodedTensor,
    Encoding,
    Size,
    TensorView,
    matrix_of,
    stored_array,
    stored_param,
    stored_values,
)
from .tiling import (
    check_tile,
    real_elements,
    tile_candidates,
    tile_grid,
    tiles,
    untile,
    valid_tiles,
)

__all__ = ["BlockEncoding", "BLOCK_SIZES", "kept_elements"]

#: the tile sizes the chooser tries (plus the one a hint names); rows and columns of 2 first:
#: every other size is a union of their tiles, so their kept counts bound all the others
BLOCK_SIZES = tuple(s for b in (2, 4, 8, 16) for s in ((1, b), (b, 1), (b, b)))
#: ``view.memo``'s entry of the elements each tile size computed so far keeps, by (bh, bw)
_KEPT = "block kept"


class BlockEncoding(Encoding):
    """bh x bw tiles of the im2col matrix: one bit per tile + the kept tiles stored dense."""

    name, simplicity = "block", 3
    # tried after k-of-n: where k-of-n fits, its size is the best that the blocks' family
    # bound (two passes) has to beat, and it rules them out before any size is computed
    cost = 2

    def encode_view(self, view: TensorView, bh: int = 4, bw: int = 4) -> EncodedTensor:
        self.require_sparse_ok(view)
        rows, cols = check_tile(view, bh, bw)
        g = tiles(view.bits, rows, cols, bh, bw)
        kept = (g != 0).any(axis=1)
        values = g[kept][valid_tiles(rows, cols, bh, bw)[kept]]
        return view.encoded(self.name, {"values": values}, {"tiles": np.packbits(kept)},
                            bh=bh, bw=bw)

    def decode(self, enc: EncodedTensor) -> Tensor:
        bh, bw = stored_param(enc, "bh"), stored_param(enc, "bw")
        rows, cols = check_tile(enc, bh, bw)
        tr, tc = tile_grid(rows, cols, bh, bw)
        # the index and the values must fit the shape before the matrix is allocated
        kept = unpack_bits(stored_array(enc.index, "tiles", enc), tr * tc)
        values = stored_values(enc, real_elements(kept, rows, cols, bh, bw))
        valid = valid_tiles(rows, cols, bh, bw)
        g = np.zeros(valid.shape, values.dtype)
        sub = g[kept]
        sub[valid[kept]] = values
        g[kept] = sub
        return from_raw_bits(untile(g, rows, cols, bh, bw), enc.dtype, enc.shape,
                             owned=True)

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        if not view.sparse_ok():
            return []
        return tile_candidates(view, BLOCK_SIZES, hints.get("block"))

    def sizes(self, view: TensorView, params: dict) -> Size:
        self.require_sparse_ok(view)
        bh, bw = params.get("bh", 4), params.get("bw", 4)
        rows, cols = check_tile(view, bh, bw)
        tr, tc = tile_grid(rows, cols, bh, bw)
        return Size({"values": kept_elements(view, bh, bw)}, -(-(tr * tc) // 8))

    def lower_bound(self, view: TensorView, params: dict) -> int:
        """Every nonzero is kept, and a tiling whose tiles are unions of a finer one's
        (bh' | bh, bw' | bw) keeps at least the elements the finer one keeps; + one bit a tile."""
        return _kept_bound(view, params.get("bh", 4), params.get("bw", 4),
                           view.memo.get(_KEPT, {}))

    def family_bound(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> int:
        """The fewest of ``lower_bound`` over the sizes tried, once the kept elements of 1 x 2
        and 2 x 1 tiles are counted: every tiling made of their tiles keeps at least as many."""
        sizes = self.candidates(view, hints)
        if not sizes or view.nonzero == view.numel:
            return 0
        rows, cols = view.matrix
        for h, w in ((1, 2), (2, 1)):
            if h <= rows and w <= cols:
                kept_elements(view, h, w)  # into view.memo, for the bounds
        known = view.memo[_KEPT]
        return min(_kept_bound(view, p["bh"], p["bw"], known) for p in sizes)

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        rows, cols = matrix_of(enc)
        count = -(-rows // enc.meta["bh"]) * -(-cols // enc.meta["bw"])
        kept = int(np.unpackbits(enc.index["tiles"], count=count).sum())
        return block_min_bits(count, kept)


def _kept_bound(view: TensorView, bh: int, bw: int, known: dict) -> int:
    """``lower_bound`` of bh x bw tiles from the kept elements ``known`` of finer tilings."""
    rows, cols = view.matrix
    kept = view.nonzero
    for (h, w), count in known.items():
        if bh % h == 0 and bw % w == 0 and count > kept:
            kept = count
    return kept * view.itemsize + -(-(-(-rows // bh) * -(-cols // bw)) // 8)


def kept_elements(view: TensorView, bh: int, bw: int) -> int:
    """The real elements that bh x bw tiles holding a nonzero keep (kept in ``view.memo``,
    where ``lower_bound`` finds them for the coarser sizes)."""
    kept = view.memo.setdefault(_KEPT, {})
    if (bh, bw) not in kept:
        if (bh, bw) in ((1, 2), (2, 1)):
            kept[(bh, bw)] = pairs_kept(view, axis=bw - 1)
        else:
            kept[(bh, bw)] = real_elements(kept_grid(view, bh, bw), *view.matrix, bh, bw)
    return kept[(bh, bw)]


def pairs_kept(view: TensorView, axis: int) -> int:
    """The real elements that 2 x 1 (``axis`` 0) or 1 x 2 (``axis`` 1) tiles keep: twice the
    pairs of neighbours holding a nonzero, plus the odd last row or column's nonzeros: the
    count of the padded tile grid (``kept_grid``), from two strided views of the mask."""
    rows, cols = view.matrix
    m = view.nz.reshape(rows, cols)
    if axis == 0:
        first, second, odd = m[0:rows - 1:2], m[1::2], m[-1] if rows % 2 else None
    else:
        first, second, odd = m[:, 0:cols - 1:2], m[:, 1::2], m[:, -1] if cols % 2 else None
    kept = 2 * int(np.count_nonzero(first | second))
    return kept + (int(np.count_nonzero(odd)) if odd is not None else 0)


def kept_grid(view: TensorView, bh: int, bw: int) -> np.ndarray:
    """Which bh x bw tiles of the matrix hold a nonzero (flat, tile order). Power-of-two sizes
    come from halvings of one padded mask, shared by every size the chooser tries (each halving
    reads half the previous one); other sizes tile the mask directly."""
    rows, cols = view.matrix
    if bh & (bh - 1) or bw & (bw - 1):
        return tiles(view.nz, rows, cols, bh, bw).any(axis=1)
    tr, tc = -(-rows // bh), -(-cols // bw)
    memo = view.memo
    if "block masks" not in memo:
        # pad to the largest power of two each size may take (sizes never exceed the matrix)
        ph, pw = (1 << min(4, rows.bit_length() - 1)), (1 << min(4, cols.bit_length() - 1))
        padded = np.zeros((-(-rows // ph) * ph, -(-cols // pw) * pw), bool)
        padded[:rows, :cols] = view.nz.reshape(rows, cols)
        memo["block masks"] = {(1, 1): padded}
    masks = memo["block masks"]

    def reduced(h: int, w: int) -> np.ndarray:
        if (h, w) not in masks:  # OR of the two halves: strided views, no reduction loop
            if h > 1:
                m = reduced(h // 2, w)
                masks[(h, w)] = m[0::2] | m[1::2]
            else:
                m = reduced(1, w // 2)
                masks[(h, w)] = m[:, 0::2] | m[:, 1::2]
        return masks[(h, w)]

    grid = reduced(bh, bw)
    return np.ascontiguousarray(grid[:tr, :tc]).reshape(-1)
