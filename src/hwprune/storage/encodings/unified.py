"""Weight unification: blocks that are zero, unified (one magnitude + signs) or free."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ...hardware import BLOCK_STATE_BITS, BLOCK_STATES, FREE, UNIFIED, ZERO, unified_min_bits
from ..bits import from_raw_bits, pack_uint, unpack_bits, unpack_uint
from ..errors import StorageError
from .base import (
    EncodedTensor,
    Encoding,
    TensorView,
    matrix_of,
    stored_array,
    stored_param,
    stored_values,
)
from .block import kept_elements
from .tiling import (
    check_tile,
    real_elements,
    tile_candidates,
    tile_grid,
    tiles,
    untile,
    valid_tiles,
)

__all__ = ["Unified", "UNIFIED_SIZES", "equal_neighbours"]

#: the block sizes the chooser tries (plus the one a hint names)
UNIFIED_SIZES = tuple((1, b) for b in (2, 4, 8, 16))


class Unified(Encoding):
    """Blocks (default 1 x b along rows of the im2col matrix) in three states, 2 bits each
    (``hwprune.hardware.BLOCK_STATES``): zero; unified (one magnitude in the dtype + one sign
    bit per element); free (dense)."""

    name, simplicity = "unified", 6
    needs_zeros, cost = False, 2

    def encode_view(self, view: TensorView, bh: int = 1, bw: int = 4) -> EncodedTensor:
        self.require_sparse_ok(view)
        if not view.dtype.is_floating_point:
            raise StorageError(f"unified needs a floating-point tensor; got {view.dtype}")
        rows, cols = check_tile(view, bh, bw)
        g, valid = tiles(view.bits, rows, cols, bh, bw), valid_tiles(rows, cols, bh, bw)
        sign_shift = 8 * view.itemsize - 1
        sign = g.dtype.type(1 << sign_shift)
        mag = g & ~sign
        top = np.where(valid, mag, 0).max(axis=1)
        same = (np.where(valid, mag, top[:, None]) == top[:, None]).all(axis=1)
        zero = ~(g != 0).any(axis=1)
        states = np.full(g.shape[0], FREE, np.uint8)
        states[same] = UNIFIED
        states[zero] = ZERO
        uni, free = states == UNIFIED, states == FREE
        signs = (g[uni][valid[uni]] >> g.dtype.type(sign_shift)).astype(np.uint8)
        return view.encoded(
            self.name,
            {"magnitudes": top[uni], "values": g[free][valid[free]]},
            {"states": pack_uint(states, BLOCK_STATE_BITS), "signs": np.packbits(signs)},
            bh=bh, bw=bw,
        )

    def decode(self, enc: EncodedTensor) -> Tensor:
        bh, bw = stored_param(enc, "bh"), stored_param(enc, "bw")
        rows, cols = check_tile(enc, bh, bw)
        tr, tc = tile_grid(rows, cols, bh, bw)
        states = unpack_uint(stored_array(enc.index, "states", enc), BLOCK_STATE_BITS, tr * tc)
        if (states > max(BLOCK_STATES)).any():
            raise StorageError("unified: a stored block state is not 0, 1 or 2")
        uni, free = states == UNIFIED, states == FREE
        # every stored array must fit the states before the matrix is allocated
        signs = unpack_bits(stored_array(enc.index, "signs", enc),
                            real_elements(uni, rows, cols, bh, bw))
        mags = stored_values(enc, int(uni.sum()), "magnitudes")
        values = stored_values(enc, real_elements(free, rows, cols, bh, bw))
        valid = valid_tiles(rows, cols, bh, bw)
        g = np.zeros(valid.shape, values.dtype)
        vu = valid[uni]
        sign_bits = np.zeros(vu.shape, g.dtype)
        sign_bits[vu] = signs.astype(g.dtype) << g.dtype.type(8 * g.dtype.itemsize - 1)
        g[uni] = np.where(vu, mags[:, None] | sign_bits, 0)
        sub = g[free]
        sub[valid[free]] = values
        g[free] = sub
        return from_raw_bits(untile(g, rows, cols, bh, bw), enc.dtype, enc.shape,
                             owned=True)

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        if not view.sparse_ok() or not view.dtype.is_floating_point:
            return []
        return tile_candidates(view, UNIFIED_SIZES, hints.get("unified"))

    def lower_bound(self, view: TensorView, params: dict) -> int:
        """Every block with a nonzero stores its real elements (free), or one magnitude
        (unified): along rows (bh = 1) a unified block of m weights saves m - 1 values, each
        one a neighbour (in flat order) of equal nonzero magnitude, so at most that many are
        saved against the elements of the nonzero blocks."""
        bh, bw = params.get("bh", 1), params.get("bw", 4)
        if bh != 1:
            return 0
        check_tile(view, bh, bw)
        nonzero = view.nonzero
        kept = nonzero if nonzero == view.numel else kept_elements(view, bh, bw)
        return _bound(view, kept, view.numel // bw)

    def family_bound(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> int:
        """``lower_bound`` of every size tried, from the elements that 1 x 2 tiles keep (a
        1 x b tile with b even is a union of those) and the fewest tiles."""
        sizes = self.candidates(view, hints)
        if not sizes or any(p["bh"] != 1 for p in sizes):
            return 0
        kept = view.nonzero
        if kept < view.numel and all(p["bw"] % 2 == 0 for p in sizes):
            kept = kept_elements(view, 1, 2)
        return _bound(view, kept, min(view.numel // p["bw"] for p in sizes))

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        """log2 of the multinomial of the three states + the sign bits (incompressible)."""
        rows, cols = matrix_of(enc)
        bh, bw = enc.meta["bh"], enc.meta["bw"]
        states = unpack_uint(enc.index["states"], BLOCK_STATE_BITS,
                             -(-rows // bh) * -(-cols // bw))
        counts = [int((states == s).sum()) for s in BLOCK_STATES]
        signs = int(valid_tiles(rows, cols, bh, bw)[states == UNIFIED].sum())
        return unified_min_bits(counts, signs)


def _bound(view: TensorView, kept: int, tiles: int) -> int:
    """The values of ``kept`` elements, less one per pair of equal nonzero neighbours (a
    unified block's saving), and at least a quarter byte per tile (its state)."""
    if "equal neighbours" not in view.memo:
        view.memo["equal neighbours"] = equal_neighbours(view.bits, view.itemsize)
    return (kept - view.memo["equal neighbours"]) * view.itemsize + tiles // 4


#: elements compared per step by ``equal_neighbours`` (its temporaries stay small)
_STEP = 1 << 18


def equal_neighbours(bits: np.ndarray, itemsize: int) -> int:
    """How many elements have the magnitude (the bits without the sign) of the element before
    them, a nonzero one; counted a bounded step at a time."""
    keep = ~bits.dtype.type(1 << (8 * itemsize - 1))
    count = 0
    for start in range(0, max(bits.size - 1, 0), _STEP):
        mag = bits[start: start + _STEP + 1] & keep
        count += int(np.count_nonzero((mag[1:] == mag[:-1]) & (mag[1:] != 0)))
    return count
