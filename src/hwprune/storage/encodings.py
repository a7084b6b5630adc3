"""Exact per-tensor encodings, the chooser, and the byte count the report calls "stored".

Every encoding maps a tensor to an ``EncodedTensor``: named numpy arrays split into *payload*
(the kept values) and *index* (everything that says where they go: masks, pointers, positions,
sign bits, block states), plus a few JSON-able parameters. Decoding gives back the same dtype,
shape and raw bits (``-0.0`` and NaN payloads included): encodings work on raw bits, and
"nonzero" means "some bit set", so ``-0.0`` is a stored value. Tensors with NaN or inf (floats)
only take the dense encoding.

``-0.0`` is common in pruned weights (``w * mask`` gives it wherever w < 0), and storing each
one would hide a k-of-n or block pattern. So a floating tensor holding -0.0 is also tried as
the tensor with +0.0 there plus a *zero-signs* bit stream (index): one bit per zero element, in
flat order, ``ceil8(zeros)`` bytes, 1 where the zero is -0.0 (``meta["zero_signs"] = True``).
The chooser keeps whichever variant is smaller.

Notation for the byte formulas: N elements of e bytes, z of them nonzero; the *matrix* is the
im2col view ``(rows, cols) = (shape[0], N / shape[0])`` (``(1, N)`` below 2 dimensions);
``w(x)`` is the byte width of the smallest unsigned int holding ``x`` (1, 2, 4 or 8);
``ceil8(b) = ceil(b / 8)`` bytes for b bits (bit streams are packed, MSB first, no padding
except at the very end).

===========  =============================================  ===================================
encoding     payload bytes                                  index bytes
===========  =============================================  ===================================
dense        N·e                                            0
bitmask      z·e                                            ceil8(N)
csr          z·e                                            (rows+1)·w(z) + z·w(cols-1)
kofn         runs·k·e  (runs = N / n)                       ceil8(runs·ceil(log2 C(n,k)))
                                                            ["rank"] or ceil8(runs·k·ceil(log2
                                                            n)) ["index"]
block        e·(real elements of kept tiles)                ceil8(tiles)
rowblock     e·Σ_r ceil(cols / b_r)                         ceil8(3·rows) + Σ_b ceil8(blocks of
                                                            size b · ceil(log2 b))
unified      e·(unified blocks + real elements of free      ceil8(2·blocks) + ceil8(real
             blocks)                                        elements of unified blocks) [signs]
quantized    ceil8(N·ceil(log2(2q+1))) + e  [codes, scale]  0
===========  =============================================  ===================================

* **kofn**: runs of n consecutive elements along dim 1 (the input channels; for a conv weight
  (K, C, R, S) the n consecutive channels at each (k, r, s): the group order of
  ``hwprune.structures.Element(axis=1)`` / ``KofN``) with at most k nonzeros each. Exactly k
  values are stored per run (a kept weight that happens to be zero is stored as a zero), so
  the position code is the fixed-width k-subset: its combinatorial rank (the information-
  theoretic minimum rounded up to whole bits per run) or k positions of ceil(log2 n) bits.
* **block**: bh x bw tiles of the matrix (row-major, as ``hwprune.structures.Block``); a tile is
  kept when any element is nonzero; ragged edge tiles store only their real elements.
* **rowblock**: block-max rows (BMWM, DARB): row r takes the largest b_r in 1, 2, 4, ..., 64
  (<= cols) whose blocks of b_r consecutive weights hold at most one nonzero each; per block
  one value (zero for an empty block) and its position, grouped by size.
* **unified**: bh x bw blocks of the matrix (default 1 x b along rows); state 0 = all zero,
  1 = unified (every real element has the same magnitude bits; one magnitude in the tensor's
  dtype + one sign bit per element), 2 = free (stored dense). A block with zeros among
  equal-magnitude weights is free: three states are what ADMM weight unification produces.
* **quantized**: every element is an integer code in [-q, q] (q <= 127) times one scale, with
  ``code.to(dtype) * scale`` (in the dtype) giving back the exact bits; codes are stored
  offset by q in ceil(log2(2q+1)) bits each. Code 0 decodes to +0.0, so a tensor with -0.0
  is quantized only in the zero-signs variant.

* **quantized values** (``meta["qvalues"]``): when the whole tensor is quantized (as above,
  found once per tensor), every sparse encoding (bitmask, csr, kofn, block, unified) is also
  tried with each payload array stored as codes: ``ceil8(count·ceil(log2(2q+1)))`` bytes per
  array + one scale of e bytes, the index unchanged. DPP's 2:4 with 8-bit values is stored as
  k-of-n positions + 8-bit codes this way, about half of ``quantized``'s codes for every
  weight.

``choose`` tries every applicable encoding (k-of-n for n in 2, 4, 8, 16 with k the largest
count of nonzeros in a run; blocks bxb, 1xb, bx1 for b in 2, 4, 8, 16; unified 1 x b; plus the
sizes a hint names) and keeps the smallest total, ties to the simpler one.
``stored_bytes`` is the per-tensor line the report prints; the container stores exactly these
arrays, so a file's data section is the sum of the tensors' ``total_bytes``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import HwpruneError
from ..structures import Block, Element, KofN, Structure, parse_structure
from ._bits import (
    ceil_log2,
    from_raw_bits,
    log2_comb,
    pack_uint,
    raw_bits,
    subset_rank,
    subset_unrank,
    uint_for,
    unpack_uint,
)
from .errors import StorageError

__all__ = [
    "EncodedTensor",
    "Encoding",
    "ENCODINGS",
    "Hints",
    "encode",
    "decode",
    "encodings_for",
    "choose",
    "stored_bytes",
    "summarize",
]

#: ``None``, a structure (``"2:4"``, ``"block:4x4"``, a ``Structure``), or explicit sizes:
#: ``{"kofn": (k, n), "block": (bh, bw), "unified": (bh, bw)}``
Hints = None | str | Structure | Mapping[str, tuple[int, int]]

KOFN_N = (2, 4, 8, 16)
BLOCK_SIZES = tuple(s for b in (2, 4, 8, 16) for s in ((b, b), (1, b), (b, 1)))
UNIFIED_SIZES = tuple((1, b) for b in (2, 4, 8, 16))
QUANT_MAX = 127
#: block sizes a row of the ``rowblock`` encoding may take (DARB's default allowed set)
ROWBLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)
_QUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class EncodedTensor:
    """One tensor in one encoding: arrays (payload and index kept apart) + small metadata."""

    encoding: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload: dict[str, np.ndarray]
    index: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Payload bytes: the kept values (and a quantization scale)."""
        return sum(int(a.nbytes) for a in self.payload.values())

    @property
    def index_bytes(self) -> int:
        """Index bytes: masks, pointers, positions, sign bits, block states."""
        return sum(int(a.nbytes) for a in self.index.values())

    @property
    def total_bytes(self) -> int:
        return self.nbytes + self.index_bytes

    def decode(self) -> Tensor:
        return decode(self)


@dataclass
class _View:
    """A tensor analysed once for all candidate encodings (raw bits, nonzeros, finiteness)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    bits: np.ndarray
    nz: np.ndarray
    finite: bool

    @classmethod
    def of(cls, t: Tensor) -> _View:
        if not isinstance(t, Tensor):
            raise StorageError(f"expected a torch.Tensor; got {type(t).__name__}")
        if t.layout != torch.strided:
            raise StorageError(f"only strided (dense-layout) tensors are stored; got {t.layout} "
                               "(call .to_dense() first)")
        t = t.detach().cpu()
        bits = raw_bits(t)
        nz = bits != 0 if bits.ndim == 1 else (bits != 0).any(axis=1)
        return cls(t.dtype, tuple(t.shape), bits, nz, _all_finite(t))

    @property
    def numel(self) -> int:
        return int(self.nz.size)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def matrix(self) -> tuple[int, int]:
        """The im2col view: (shape[0], rest) for 2+ dimensions, else one row."""
        if len(self.shape) >= 2:
            return self.shape[0], self.numel // self.shape[0] if self.shape[0] else 0
        return 1, self.numel

    def sparse_ok(self) -> bool:
        """Whether non-dense encodings apply: plain-width elements, finite, not empty."""
        return self.bits.ndim == 1 and self.finite and self.numel > 0

    @cached_property
    def negzero(self) -> np.ndarray:
        """Where the tensor holds -0.0 (floating dtypes only; all False otherwise)."""
        if not self.dtype.is_floating_point or self.bits.ndim != 1:
            return np.zeros(self.numel, bool)
        return self.bits == self.bits.dtype.type(1 << (8 * self.itemsize - 1))

    def canonical(self) -> _View:
        """This tensor with every -0.0 made +0.0: the base of the zero-signs variant."""
        bits = np.where(self.negzero, 0, self.bits).astype(self.bits.dtype)
        return _View(self.dtype, self.shape, bits, bits != 0, self.finite)

    def encoded(self, name: str, payload: dict, index: dict, **meta: Any) -> EncodedTensor:
        return EncodedTensor(name, self.dtype, self.shape, payload, index, meta)


def _all_finite(t: Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8 kinds: isfinite is not implemented for all of them
        t = t.float()
    return bool(torch.isfinite(t).all())


# -- the tiling shared by block and unified ------------------------------------------------
def _tiles(flat: np.ndarray, rows: int, cols: int, bh: int, bw: int) -> np.ndarray:
    """(tiles, bh*bw) view of the (rows, cols) matrix, zero-padded at ragged edges, row-major
    tile order (the group order of ``hwprune.structures.Block``)."""
    pr, pc = -(-rows // bh) * bh, -(-cols // bw) * bw
    m = flat.reshape(rows, cols)
    if (pr, pc) != (rows, cols):
        padded = np.zeros((pr, pc), flat.dtype)
        padded[:rows, :cols] = m
        m = padded
    return m.reshape(pr // bh, bh, pc // bw, bw).transpose(0, 2, 1, 3).reshape(-1, bh * bw)


def _untile(g: np.ndarray, rows: int, cols: int, bh: int, bw: int) -> np.ndarray:
    pr, pc = -(-rows // bh) * bh, -(-cols // bw) * bw
    m = g.reshape(pr // bh, pc // bw, bh, bw).transpose(0, 2, 1, 3).reshape(pr, pc)
    return np.ascontiguousarray(m[:rows, :cols]).reshape(-1)


def _valid(rows: int, cols: int, bh: int, bw: int) -> np.ndarray:
    return _tiles(np.ones(rows * cols, bool), rows, cols, bh, bw)


def _check_tile(view: _View, bh: int, bw: int) -> tuple[int, int]:
    rows, cols = view.matrix
    if not (isinstance(bh, int) and isinstance(bw, int)) or not (1 <= bh <= rows and
                                                                  1 <= bw <= cols):
        raise StorageError(
            f"block {bh}x{bw} does not fit the {rows}x{cols} matrix of shape {view.shape}"
        )
    return rows, cols


def _param(enc: EncodedTensor, key: str) -> int:
    value = enc.meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise StorageError(f"{enc.encoding}: stored parameter {key!r} is missing or not an int")
    return value


def _array(arrays: dict[str, np.ndarray], key: str, enc: EncodedTensor) -> np.ndarray:
    if key not in arrays:
        raise StorageError(f"{enc.encoding}: stored array {key!r} is missing")
    return np.asarray(arrays[key])


def _values(enc: EncodedTensor, count: int, key: str = "values") -> np.ndarray:
    """The ``count`` stored raw-bit values, checked against the dtype's width."""
    v = _array(enc.payload, key, enc)
    size = torch.empty((), dtype=enc.dtype).element_size()
    if v.ndim != 1 or v.size != count or v.dtype.itemsize != size or v.dtype.kind != "u":
        raise StorageError(
            f"{enc.encoding}: expected {count} stored values of {size} bytes; got {v.size} "
            f"of {v.dtype}"
        )
    return v


def _zeros(enc: EncodedTensor) -> np.ndarray:
    size = torch.empty((), dtype=enc.dtype).element_size()
    return np.zeros(math.prod(enc.shape), np.dtype(f"u{size}"))


# -- the encodings -------------------------------------------------------------------------
class Encoding:
    """One encoding: ``encode(t, **params)``, ``decode(enc)``, and what the chooser tries."""

    name: ClassVar[str]
    #: lower is simpler; the chooser breaks ties towards simpler encodings
    simplicity: ClassVar[int]

    def encode(self, t: Tensor, zero_signs: bool = False, **params: Any) -> EncodedTensor:
        """Encode ``t``; ``StorageError`` if it cannot take this encoding (with these params).

        ``zero_signs=True``: encode ``t`` with -0.0 made +0.0, plus one sign bit per zero.
        """
        allowed = set(inspect.signature(self._encode).parameters) - {"view"}
        if set(params) - allowed:
            raise StorageError(
                f"{self.name} takes parameters {sorted(allowed)}; got {sorted(params)}"
            )
        view = _View.of(t)
        if not zero_signs:
            return self._encode(view, **params)
        if self.name == "dense" or not view.dtype.is_floating_point:
            raise StorageError("zero_signs applies to sparse encodings of floating tensors")
        return _add_zero_signs(self._encode(view.canonical(), **params), view)

    def _encode(self, view: _View, **params: Any) -> EncodedTensor:
        raise NotImplementedError

    def decode(self, enc: EncodedTensor) -> Tensor:
        raise NotImplementedError

    def candidates(self, view: _View, hints: dict[str, tuple[int, int]]) -> list[dict]:
        """Parameter sets worth trying on ``view`` (empty: not applicable)."""
        return [{}] if view.sparse_ok() else []

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        """Information-theoretic minimum of the index for this pattern (None: undefined)."""
        return None

    def min_payload(self, view: _View, params: dict) -> int:
        """A cheap lower bound on the payload of ``params``, so the chooser can skip it."""
        return 0

    def _require_sparse_ok(self, view: _View) -> None:
        if not view.sparse_ok():
            raise StorageError(
                f"{self.name} needs a finite, non-empty tensor of 1/2/4/8-byte elements; got "
                f"{view.dtype} of shape {view.shape} (NaN/inf and odd dtypes are stored dense)"
            )


class Dense(Encoding):
    """Every element's raw bits, in order. Always applicable; the reference for the others."""

    name, simplicity = "dense", 0

    def _encode(self, view: _View) -> EncodedTensor:
        return view.encoded(self.name, {"values": view.bits.reshape(-1)}, {})

    def decode(self, enc: EncodedTensor) -> Tensor:
        return from_raw_bits(_array(enc.payload, "values", enc), enc.dtype, enc.shape)

    def candidates(self, view: _View, hints: dict[str, tuple[int, int]]) -> list[dict]:
        return [{}]

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return 0.0


class Bitmask(Encoding):
    """One bit per element (numpy.packbits, big-endian bit order) + the nonzero values."""

    name, simplicity = "bitmask", 1

    def _encode(self, view: _View) -> EncodedTensor:
        self._require_sparse_ok(view)
        return view.encoded(self.name, {"values": view.bits[view.nz]},
                            {"mask": np.packbits(view.nz)})

    def decode(self, enc: EncodedTensor) -> Tensor:
        numel = math.prod(enc.shape)
        mask = unpack_uint(_array(enc.index, "mask", enc), 1, numel).astype(bool)
        out = _zeros(enc)
        out[mask] = _values(enc, int(mask.sum()))
        return from_raw_bits(out, enc.dtype, enc.shape)

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return log2_comb(math.prod(enc.shape), enc.payload["values"].size)


class CSR(Encoding):
    """Compressed sparse rows of the im2col matrix; pointers and column indices in the
    smallest unsigned dtype that holds them."""

    name, simplicity = "csr", 2

    def _encode(self, view: _View) -> EncodedTensor:
        self._require_sparse_ok(view)
        rows, cols = view.matrix
        m = view.nz.reshape(rows, cols)
        nnz = int(view.nz.sum())
        indptr = np.zeros(rows + 1, uint_for(nnz))
        np.cumsum(m.sum(axis=1), out=indptr[1:])
        indices = np.nonzero(m)[1].astype(uint_for(max(cols - 1, 0)))
        return view.encoded(self.name, {"values": view.bits[view.nz]},
                            {"indptr": indptr, "indices": indices})

    def decode(self, enc: EncodedTensor) -> Tensor:
        rows, cols = _matrix(enc)
        indptr = _array(enc.index, "indptr", enc).astype(np.int64)
        indices = _array(enc.index, "indices", enc).astype(np.int64)
        counts = np.diff(indptr)
        if (indptr.size != rows + 1 or indptr[0] != 0 or (counts < 0).any()
                or indptr[-1] != indices.size or (indices >= cols).any()):
            raise StorageError("csr: row pointers and column indices are inconsistent")
        out = _zeros(enc)
        out[np.repeat(np.arange(rows), counts) * cols + indices] = _values(enc, indices.size)
        return from_raw_bits(out, enc.dtype, enc.shape)

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return log2_comb(math.prod(enc.shape), enc.payload["values"].size)


class KofNEncoding(Encoding):
    """At most k nonzeros in every run of n consecutive elements along dim 1: k values per run
    + the positions, as a combinatorial rank (``positions="rank"``, ceil(log2 C(n, k)) bits per
    run) or as k indices of ceil(log2 n) bits (``positions="index"``)."""

    name, simplicity = "kofn", 4
    POSITIONS = ("index", "rank")

    @staticmethod
    def _runs(bits: np.ndarray, shape: tuple[int, ...], n: int) -> np.ndarray:
        return np.moveaxis(bits.reshape(shape), 1, -1).reshape(-1, n)

    def _encode(self, view: _View, k: int | None = None, n: int | None = None,
                positions: str = "rank") -> EncodedTensor:
        self._require_sparse_ok(view)
        if positions not in self.POSITIONS:
            raise StorageError(f"kofn positions must be one of {self.POSITIONS}; got {positions!r}")
        if len(view.shape) < 2 or not isinstance(n, int) or not 2 <= n <= 64 \
                or view.shape[1] % n:
            raise StorageError(
                f"kofn needs n in [2, 64] dividing dim 1 of a tensor with 2+ dimensions; got "
                f"n={n} for shape {view.shape}"
            )
        nz = self._runs(view.nz, view.shape, n)
        most = int(nz.sum(axis=1).max())
        k = max(most, 1) if k is None else k
        if not isinstance(k, int) or not most <= k < n:
            raise StorageError(
                f"kofn {k}:{n} does not fit: a run of {n} along dim 1 holds {most} nonzeros "
                f"(need 1 <= k < n and at most k nonzeros per run)"
            )
        # k positions per run: its nonzeros, padded with its lowest zero positions; sorted
        missing = k - nz.sum(axis=1)
        chosen = nz | (np.cumsum(~nz, axis=1) <= missing[:, None])
        pos = np.nonzero(chosen)[1].reshape(-1, k)
        values = np.take_along_axis(self._runs(view.bits, view.shape, n), pos, axis=1)
        if positions == "rank":
            code = pack_uint(subset_rank(pos, n), ceil_log2(math.comb(n, k)))
        else:
            code = pack_uint(pos.reshape(-1), ceil_log2(n))
        return view.encoded(self.name, {"values": values.reshape(-1)}, {"positions": code},
                            k=k, n=n, positions=positions)

    def decode(self, enc: EncodedTensor) -> Tensor:
        k, n, mode = _param(enc, "k"), _param(enc, "n"), enc.meta.get("positions")
        if len(enc.shape) < 2 or not 1 <= k < n <= 64 or enc.shape[1] % n:
            raise StorageError(f"kofn: stored {k}:{n} does not fit shape {enc.shape}")
        runs = math.prod(enc.shape) // n
        code = _array(enc.index, "positions", enc)
        if mode == "rank":
            ranks = unpack_uint(code, ceil_log2(math.comb(n, k)), runs)
            pos = subset_unrank(ranks, n, k)
        elif mode == "index":
            pos = unpack_uint(code, ceil_log2(n), runs * k).astype(np.int64).reshape(runs, k)
            if (pos >= n).any():
                raise StorageError(f"kofn: a stored position is >= n={n}")
        else:
            raise StorageError(f"kofn: unknown positions mode {mode!r}")
        out = np.zeros((runs, n), _zeros(enc).dtype)
        np.put_along_axis(out, pos, _values(enc, runs * k).reshape(runs, k), axis=1)
        moved = (enc.shape[0], *enc.shape[2:], enc.shape[1])
        flat = np.moveaxis(out.reshape(moved), -1, 1).reshape(-1)
        return from_raw_bits(flat, enc.dtype, enc.shape)

    def candidates(self, view: _View, hints: dict[str, tuple[int, int]]) -> list[dict]:
        if not view.sparse_ok() or len(view.shape) < 2:
            return []
        ns = set(KOFN_N) | ({hints["kofn"][1]} if "kofn" in hints else set())
        out = []
        for n in sorted(ns):
            if 2 <= n <= 64 and view.shape[1] % n == 0:
                most = int(self._runs(view.nz, view.shape, n).sum(axis=1).max())
                if most < n:
                    out += [{"k": max(most, 1), "n": n, "positions": p} for p in self.POSITIONS]
        return out

    def min_payload(self, view: _View, params: dict) -> int:
        return view.numel // params["n"] * params["k"] * view.itemsize

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        k, n = enc.meta["k"], enc.meta["n"]
        return math.prod(enc.shape) // n * log2_comb(n, k)


class BlockEncoding(Encoding):
    """bh x bw tiles of the im2col matrix: one bit per tile + the kept tiles stored dense."""

    name, simplicity = "block", 3

    def _encode(self, view: _View, bh: int = 4, bw: int = 4) -> EncodedTensor:
        self._require_sparse_ok(view)
        rows, cols = _check_tile(view, bh, bw)
        tiles = _tiles(view.bits, rows, cols, bh, bw)
        kept = (tiles != 0).any(axis=1)
        values = tiles[kept][_valid(rows, cols, bh, bw)[kept]]
        return view.encoded(self.name, {"values": values}, {"tiles": np.packbits(kept)},
                            bh=bh, bw=bw)

    def decode(self, enc: EncodedTensor) -> Tensor:
        bh, bw = _param(enc, "bh"), _param(enc, "bw")
        rows, cols = _matrix(enc)
        valid = _valid(rows, cols, bh, bw)
        kept = unpack_uint(_array(enc.index, "tiles", enc), 1, valid.shape[0]).astype(bool)
        g = np.zeros(valid.shape, _zeros(enc).dtype)
        sub = g[kept]
        sub[valid[kept]] = _values(enc, int(valid[kept].sum()))
        g[kept] = sub
        return from_raw_bits(_untile(g, rows, cols, bh, bw), enc.dtype, enc.shape)

    def candidates(self, view: _View, hints: dict[str, tuple[int, int]]) -> list[dict]:
        if not view.sparse_ok():
            return []
        rows, cols = view.matrix
        sizes = list(BLOCK_SIZES) + ([tuple(hints["block"])] if "block" in hints else [])
        return [{"bh": bh, "bw": bw} for bh, bw in dict.fromkeys(sizes)
                if bh <= rows and bw <= cols]

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        rows, cols = _matrix(enc)
        tiles = -(-rows // enc.meta["bh"]) * -(-cols // enc.meta["bw"])
        kept = int(np.unpackbits(enc.index["tiles"], count=tiles).sum())
        return log2_comb(tiles, kept)


class RowBlock(Encoding):
    """Block-max rows (BMWM; DARB's per-row block sizes): row r of the im2col matrix is cut
    into blocks of b_r consecutive weights (b_r from ``ROWBLOCK_SIZES``), each holding at most
    one nonzero. Stored: every row's size (``ceil(log2 7)`` = 3 bits), per block the position
    of its weight (``ceil(log2 b_r)`` bits, grouped by size: array ``positions<b>``) and one
    value (zero where the block is empty). Each row takes the largest size that fits."""

    name, simplicity = "rowblock", 5

    def _encode(self, view: _View) -> EncodedTensor:
        self._require_sparse_ok(view)
        rows, cols = view.matrix
        sizes = _row_block_sizes(view.nz.reshape(rows, cols))
        bits = view.bits.reshape(rows, cols)
        nz = view.nz.reshape(rows, cols)
        values, index = [], {"sizes": pack_uint(np.searchsorted(ROWBLOCK_SIZES, sizes), 3)}
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
        codes = unpack_uint(_array(enc.index, "sizes", enc), 3, _matrix(enc)[0])
        if (codes >= len(ROWBLOCK_SIZES)).any():
            raise StorageError("rowblock: a stored row block size code is not a size")
        return np.asarray(ROWBLOCK_SIZES)[codes.astype(np.int64)]

    def decode(self, enc: EncodedTensor) -> Tensor:
        rows, cols = _matrix(enc)
        sizes = self.row_sizes(enc)
        present = np.unique(sizes).tolist()
        if set(enc.index) != {"sizes"} | {f"positions{b}" for b in present}:
            raise StorageError("rowblock: position arrays do not match the row sizes")
        counts = [int((sizes == b).sum()) * -(-cols // b) for b in present]
        values = _values(enc, sum(counts))
        out = _zeros(enc).reshape(rows, cols)
        start = 0
        for b, count in zip(present, counts, strict=True):
            r = np.flatnonzero(sizes == b)
            nb = -(-cols // b)
            pos = unpack_uint(_array(enc.index, f"positions{b}", enc), ceil_log2(b), count)
            col = (np.arange(nb) * b)[None, :] + pos.astype(np.int64).reshape(len(r), nb)
            if (pos >= b).any() or (col >= cols).any():
                raise StorageError("rowblock: a stored position is outside its block")
            out[r[:, None], col] = values[start:start + count].reshape(len(r), nb)
            start += count
        return from_raw_bits(out.reshape(-1), enc.dtype, enc.shape)

    def candidates(self, view: _View, hints: dict[str, tuple[int, int]]) -> list[dict]:
        return [{}] if view.sparse_ok() and view.matrix[1] >= 2 else []

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        """Per block log2 of its real width (where its weight can be), + log2 7 per row."""
        rows, cols = _matrix(enc)
        sizes = self.row_sizes(enc)
        bits = 0.0
        for b in np.unique(sizes).tolist():
            full, rest = divmod(cols, b)
            per_row = full * math.log2(b) + (math.log2(rest) if rest else 0.0)
            bits += int((sizes == b).sum()) * per_row
        return bits + rows * math.log2(len(ROWBLOCK_SIZES))


def _row_block_sizes(nz: np.ndarray) -> np.ndarray:
    """Per row of a (rows, cols) nonzero mask, the largest size in ``ROWBLOCK_SIZES`` whose
    blocks each hold at most one nonzero (1 always fits)."""
    rows, cols = nz.shape
    sizes = np.ones(rows, np.int64)
    for b in ROWBLOCK_SIZES[1:]:
        if b > cols:
            break
        nb = -(-cols // b)
        fits = (np.pad(nz, ((0, 0), (0, nb * b - cols))).reshape(rows, nb, b).sum(2) <= 1)
        sizes[fits.all(axis=1)] = b
    return sizes


class Unified(Encoding):
    """Blocks (default 1 x b along rows of the im2col matrix) in three states, 2 bits each:
    zero; unified (one magnitude in the dtype + one sign bit per element); free (dense)."""

    name, simplicity = "unified", 6
    ZERO, UNIFIED, FREE = 0, 1, 2

    def _encode(self, view: _View, bh: int = 1, bw: int = 4) -> EncodedTensor:
        self._require_sparse_ok(view)
        if not view.dtype.is_floating_point:
            raise StorageError(f"unified needs a floating-point tensor; got {view.dtype}")
        rows, cols = _check_tile(view, bh, bw)
        tiles, valid = _tiles(view.bits, rows, cols, bh, bw), _valid(rows, cols, bh, bw)
        sign_shift = 8 * view.itemsize - 1
        sign = tiles.dtype.type(1 << sign_shift)
        mag = tiles & ~sign
        top = np.where(valid, mag, 0).max(axis=1)
        same = (np.where(valid, mag, top[:, None]) == top[:, None]).all(axis=1)
        zero = ~(tiles != 0).any(axis=1)
        states = np.full(tiles.shape[0], self.FREE, np.uint8)
        states[same] = self.UNIFIED
        states[zero] = self.ZERO
        uni, free = states == self.UNIFIED, states == self.FREE
        signs = (tiles[uni][valid[uni]] >> tiles.dtype.type(sign_shift)).astype(np.uint8)
        return view.encoded(
            self.name,
            {"magnitudes": top[uni], "values": tiles[free][valid[free]]},
            {"states": pack_uint(states, 2), "signs": np.packbits(signs)},
            bh=bh, bw=bw,
        )

    def decode(self, enc: EncodedTensor) -> Tensor:
        bh, bw = _param(enc, "bh"), _param(enc, "bw")
        rows, cols = _matrix(enc)
        valid = _valid(rows, cols, bh, bw)
        states = unpack_uint(_array(enc.index, "states", enc), 2, valid.shape[0])
        if (states > self.FREE).any():
            raise StorageError("unified: a stored block state is not 0, 1 or 2")
        uni, free = states == self.UNIFIED, states == self.FREE
        g = np.zeros(valid.shape, _zeros(enc).dtype)
        vu = valid[uni]
        signs = unpack_uint(_array(enc.index, "signs", enc), 1, int(vu.sum()))
        sign_bits = np.zeros(vu.shape, g.dtype)
        sign_bits[vu] = signs.astype(g.dtype) << g.dtype.type(8 * g.dtype.itemsize - 1)
        mags = _values(enc, int(uni.sum()), "magnitudes")
        g[uni] = np.where(vu, mags[:, None] | sign_bits, 0)
        sub = g[free]
        sub[valid[free]] = _values(enc, int(valid[free].sum()))
        g[free] = sub
        return from_raw_bits(_untile(g, rows, cols, bh, bw), enc.dtype, enc.shape)

    def candidates(self, view: _View, hints: dict[str, tuple[int, int]]) -> list[dict]:
        if not view.sparse_ok() or not view.dtype.is_floating_point:
            return []
        rows, cols = view.matrix
        sizes = list(UNIFIED_SIZES) + ([tuple(hints["unified"])] if "unified" in hints else [])
        return [{"bh": bh, "bw": bw} for bh, bw in dict.fromkeys(sizes)
                if bh <= rows and bw <= cols]

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        """log2 of the multinomial of the three states + the sign bits (incompressible)."""
        rows, cols = _matrix(enc)
        blocks = -(-rows // enc.meta["bh"]) * -(-cols // enc.meta["bw"])
        states = unpack_uint(enc.index["states"], 2, blocks)
        counts = [int((states == s).sum()) for s in (self.ZERO, self.UNIFIED, self.FREE)]
        multinomial = math.lgamma(blocks + 1) - sum(math.lgamma(c + 1) for c in counts)
        valid = _valid(rows, cols, enc.meta["bh"], enc.meta["bw"])
        signs = int(valid[states == self.UNIFIED].sum())
        return multinomial / math.log(2) + signs


class Quantized(Encoding):
    """Few distinct values, each an integer code in [-q, q] times one per-tensor scale:
    codes offset by q, packed in ceil(log2(2q+1)) bits, + the scale in the tensor's dtype."""

    name, simplicity = "quantized", 7

    def _encode(self, view: _View) -> EncodedTensor:
        self._require_sparse_ok(view)
        found = _find_scale(view)
        if found is None:
            raise StorageError(
                "quantized needs a float16/bfloat16/float32/float64 tensor whose values are "
                f"exactly integer * scale with |integer| <= {QUANT_MAX} and no -0.0"
            )
        q, scale = found
        values = from_raw_bits(view.bits, view.dtype, (view.numel,)).double()
        codes = torch.round(values / scale.double()).long().numpy() + q
        enc = view.encoded(
            self.name,
            {"codes": pack_uint(codes, (2 * q).bit_length()), "scale": raw_bits(scale)},
            {}, qmax=q,
        )
        if not np.array_equal(raw_bits(self.decode(enc)), view.bits):  # the definition: exact
            raise StorageError("quantized: decoding does not give back the exact bits")
        return enc

    def decode(self, enc: EncodedTensor) -> Tensor:
        q = _param(enc, "qmax")
        if not 1 <= q <= QUANT_MAX or enc.dtype not in _QUANT_DTYPES:
            raise StorageError(f"quantized: stored qmax {q} or dtype {enc.dtype} not allowed")
        numel = math.prod(enc.shape)
        codes = unpack_uint(_array(enc.payload, "codes", enc), (2 * q).bit_length(), numel)
        if (codes > 2 * q).any():
            raise StorageError(f"quantized: a stored code is outside [-{q}, {q}]")
        scale = from_raw_bits(_values(enc, 1, "scale"), enc.dtype, ())
        out = torch.from_numpy(codes.astype(np.int64) - q).to(enc.dtype) * scale
        return out.reshape(enc.shape)

    def candidates(self, view: _View, hints: dict[str, tuple[int, int]]) -> list[dict]:
        return [{}] if view.sparse_ok() and view.dtype in _QUANT_DTYPES else []

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return 0.0  # no index: every element has its code, zeros included


def _find_scale(view: _View) -> tuple[int, Tensor] | None:
    """The smallest q (and a scale in the dtype) with every value == code.to(dtype) * scale."""
    if view.dtype not in _QUANT_DTYPES or not view.sparse_ok():
        return None
    limit = 2 * QUANT_MAX + 1
    if np.unique(view.bits[:4096]).size > limit:  # cheap early exit for ordinary weights
        return None
    uniq = np.unique(view.bits)
    sign = uniq.dtype.type(1 << (8 * uniq.dtype.itemsize - 1))
    if uniq.size > limit or (uniq == sign).any():  # too many values, or a -0.0
        return None
    vals = from_raw_bits(uniq, view.dtype, (uniq.size,))
    top = float(vals.double().abs().max())
    if top == 0.0:
        return None
    q = torch.arange(1, QUANT_MAX + 1, dtype=torch.float64)
    base = raw_bits((top / q).to(view.dtype)).astype(np.int64)
    # the scale a quantizer used may sit an ulp or two from top / q after rounding
    near = (base[:, None] + np.arange(-2, 3)[None, :]).reshape(-1)
    qs = q.repeat_interleave(5)
    keep = near > 0
    scales = from_raw_bits(near[keep].astype(uniq.dtype), view.dtype, (int(keep.sum()),))
    qs = qs[torch.from_numpy(keep)]
    # a few probe values rule out almost every candidate before the full check
    probe = np.unique(np.linspace(0, uniq.size - 1, 8).round().astype(np.int64))
    ok = _scale_fits(vals[probe], uniq[probe], scales, qs).nonzero().reshape(-1)
    if ok.numel():
        scales, qs = scales[ok], qs[ok]
        good = _scale_fits(vals, uniq, scales, qs).nonzero().reshape(-1)
        if good.numel():
            i = int(good[0])
            return int(qs[i]), scales[i].clone()
    return None


def _scale_fits(vals: Tensor, bits: np.ndarray, scales: Tensor, qs: Tensor) -> Tensor:
    """For each candidate scale: does every value equal ``round(v / s).to(dtype) * s``
    bitwise, with the code within [-q, q]?"""
    codes = torch.round(vals.double()[None, :] / scales.double()[:, None])
    rebuilt = codes.to(vals.dtype) * scales[:, None]
    same = torch.from_numpy(raw_bits(rebuilt).reshape(rebuilt.shape) == bits[None, :])
    return (torch.isfinite(scales)[:, None] & (codes.abs() <= qs[:, None]) & same).all(dim=1)


ZERO_SIGNS = "zero_signs"


def _add_zero_signs(enc: EncodedTensor, view: _View) -> EncodedTensor:
    """``enc`` (of ``view.canonical()``) + which zeros of ``view`` are -0.0: one bit per zero
    element in flat order. Cheaper than storing each -0.0 as a value when ``w * mask`` left
    many of them; the chooser tries both."""
    neg = view.negzero
    signs = np.packbits(neg[(view.bits == 0) | neg])
    return replace(enc, index={**enc.index, ZERO_SIGNS: signs}, meta={**enc.meta, ZERO_SIGNS: True})


def _restore_zero_signs(out: Tensor, enc: EncodedTensor) -> Tensor:
    bits = raw_bits(out)
    zeros = np.flatnonzero(bits == 0)
    signs = unpack_uint(_array(enc.index, ZERO_SIGNS, enc), 1, zeros.size).astype(bool)
    bits[zeros[signs]] = bits.dtype.type(1 << (8 * bits.dtype.itemsize - 1))
    return from_raw_bits(bits, enc.dtype, enc.shape)


QVALUES = "qvalues"


def _quantize_values(enc: EncodedTensor, found: tuple[int, Tensor]) -> EncodedTensor | None:
    """``enc`` with its payload arrays stored as integer codes in [-q, q] (offset by q, packed
    in ceil(log2(2q+1)) bits each) + one ``scale`` in the dtype: a sparse pattern of quantized
    weights (DPP's 2:4 with 8-bit values: k-of-n positions + 8-bit codes). ``None`` where a
    value is not exactly ``code.to(dtype) * scale``."""
    q, scale = found
    width = (2 * q).bit_length()
    payload, counts = {}, {}
    for name, arr in enc.payload.items():
        values = from_raw_bits(arr, enc.dtype, (arr.size,))
        codes = torch.round(values.double() / scale.double()).long()
        if (codes.abs() > q).any() or not np.array_equal(raw_bits(codes.to(enc.dtype) * scale),
                                                         arr):
            return None
        payload[f"{name}_codes"] = pack_uint(codes.numpy() + q, width)
        counts[name] = int(arr.size)
    payload["scale"] = raw_bits(scale)
    return replace(enc, payload=payload, meta={**enc.meta, QVALUES: {"qmax": q,
                                                                    "counts": counts}})


def _dequantize_values(enc: EncodedTensor) -> EncodedTensor:
    """The inverse of ``_quantize_values``: the payload arrays as raw bits again."""
    info = enc.meta[QVALUES]
    q = info.get("qmax") if isinstance(info, dict) else None
    counts = info.get("counts") if isinstance(info, dict) else None
    if (not isinstance(q, int) or not 1 <= q <= QUANT_MAX or enc.dtype not in _QUANT_DTYPES
            or not isinstance(counts, dict)):
        raise StorageError(f"{enc.encoding}: stored quantized values ({info!r}) for "
                           f"{enc.dtype} are not valid")
    scale = from_raw_bits(_values(enc, 1, "scale"), enc.dtype, ())
    payload = {}
    for name, count in counts.items():
        codes = unpack_uint(_array(enc.payload, f"{name}_codes", enc), (2 * q).bit_length(),
                            int(count))
        if (codes > 2 * q).any():
            raise StorageError(f"{enc.encoding}: a stored code is outside [-{q}, {q}]")
        values = torch.from_numpy(codes.astype(np.int64) - q).to(enc.dtype) * scale
        payload[name] = raw_bits(values).reshape(-1)
    return replace(enc, payload=payload,
                   meta={k: v for k, v in enc.meta.items() if k != QVALUES})


def _decode_base(enc: EncodedTensor) -> Tensor:
    if enc.meta.get(QVALUES) is not None:
        enc = _dequantize_values(enc)
    return ENCODINGS[enc.encoding].decode(enc)


def _matrix(enc: EncodedTensor) -> tuple[int, int]:
    shape = enc.shape
    numel = math.prod(shape)
    if len(shape) >= 2:
        return shape[0], numel // shape[0] if shape[0] else 0
    return 1, numel


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (Dense(), Bitmask(), CSR(), BlockEncoding(), KofNEncoding(), RowBlock(), Unified(),
              Quantized())
}


# -- public functions ----------------------------------------------------------------------
def encode(t: Tensor, encoding: str, **params: Any) -> EncodedTensor:
    """Encode ``t`` with the named encoding (``StorageError`` if it does not apply)."""
    if encoding not in ENCODINGS:
        raise StorageError(f"unknown encoding {encoding!r}; allowed: {sorted(ENCODINGS)}")
    return ENCODINGS[encoding].encode(t, **params)


def decode(enc: EncodedTensor) -> Tensor:
    """The exact tensor back (same dtype, shape and bits)."""
    if enc.encoding not in ENCODINGS:
        raise StorageError(f"unknown encoding {enc.encoding!r}; allowed: {sorted(ENCODINGS)}")
    if enc.meta.get(ZERO_SIGNS):
        if not enc.dtype.is_floating_point:
            raise StorageError(f"{enc.encoding}: zero signs stored for a {enc.dtype} tensor")
        base = replace(enc, index={k: v for k, v in enc.index.items() if k != ZERO_SIGNS},
                       meta={k: v for k, v in enc.meta.items() if k != ZERO_SIGNS})
        out = _restore_zero_signs(_decode_base(base), enc)
    else:
        out = _decode_base(enc)
    if out.dtype != enc.dtype or tuple(out.shape) != tuple(enc.shape):
        raise StorageError(f"{enc.encoding}: decoded {out.dtype} {tuple(out.shape)}, stored "
                           f"{enc.dtype} {enc.shape}")
    return out


def _normalize_hints(hints: Hints) -> dict[str, tuple[int, int]]:
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
    return _encodings_for(_View.of(t), hints)


def _encodings_for(view: _View, hints: Hints, prune: bool = False) -> list[EncodedTensor]:
    """All applicable encodings; with ``prune``, skip those whose payload alone is already
    larger than the smallest total found so far (they cannot win)."""
    sizes = _normalize_hints(hints)
    out: list[EncodedTensor] = []
    best = math.inf
    # a tensor with -0.0 is tried as it is and as +0.0 with a sign bit per zero
    variants = [(view, False)] + ([(view.canonical(), True)] if view.negzero.any() else [])
    # quantized weights: every sparse encoding is also tried with its values as codes
    scales = {signs: _find_scale(base) for base, signs in variants}
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
                    e = enc._encode(base, **params)
                except StorageError:
                    continue
                tries = [e] + ([q] if found and (q := _quantize_values(e, found)) else [])
                for t in tries:
                    out.append(_add_zero_signs(t, view) if signs else t)
                    best = min(best, out[-1].total_bytes)
    return out


def _simplicity(enc: EncodedTensor) -> tuple[int, bool, bool, bool]:
    return (ENCODINGS[enc.encoding].simplicity, bool(enc.meta.get(ZERO_SIGNS)),
            QVALUES in enc.meta, enc.meta.get("positions") == "rank")


def choose(t: Tensor, hints: Hints = None) -> EncodedTensor:
    """The smallest exact encoding of ``t`` by total bytes (payload + index); ties go to the
    simpler encoding (dense < bitmask < csr < block < kofn < rowblock < unified < quantized)."""
    return _choose(_View.of(t), hints)


def _choose(view: _View, hints: Hints) -> EncodedTensor:
    candidates = _encodings_for(view, hints, prune=True)
    return min(candidates, key=lambda e: (e.total_bytes, _simplicity(e)))


def _summary(enc: EncodedTensor, view: _View) -> dict[str, Any]:
    numel = math.prod(enc.shape)
    size = torch.empty((), dtype=enc.dtype).element_size()
    kept = int((view.nz & ~view.negzero).sum())
    # the pattern's minimum does not depend on how the values are coded
    base = _dequantize_values(enc) if enc.meta.get(QVALUES) is not None else enc
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
    return _summary(enc, _View.of(t))


def stored_bytes(t: Tensor, hints: Hints = None) -> dict[str, Any]:
    """What storing ``t`` costs, as the report prints it.

    Keys: ``encoding``, ``params`` (k, n, bh, bw, ...), ``payload_bytes``, ``index_bytes``,
    ``total_bytes`` (the bytes ``save`` writes for this tensor, outside the container's
    header), ``dense_bytes``, ``numel``, ``kept`` (elements other than +-0),
    ``min_index_bits`` (information-theoretic minimum of the chosen pattern's index:
    runs·log2 C(n, k) for k-of-n, log2 C(numel, stored values) for bitmask/CSR, log2 C(tiles,
    kept tiles) for blocks, state multinomial + sign bits for unified, plus one bit per zero
    with zero signs; 0 for dense and quantized, which have no index) and ``bits_per_kept_weight``
    (8·total_bytes / kept; None when nothing is kept).
    """
    view = _View.of(t)
    return _summary(_choose(view, hints), view)
