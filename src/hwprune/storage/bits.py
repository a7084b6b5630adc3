"""Bit-level helpers shared by the encodings: raw bit views, bit packing, k-subset ranks
(the index widths they pack to are ``hwprune.hardware``'s).

Encodings work on the *raw bits* of a tensor (an unsigned integer per element), never on float
values, so every round trip is bitwise exact: -0.0, NaN payloads and subnormals survive, and
"nonzero" means "some bit set" (-0.0 counts as nonzero and is stored).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .errors import StorageError

__all__ = [
    "raw_bits",
    "from_raw_bits",
    "aligned_copy",
    "dtype_name",
    "dtype_from_name",
    "element_size",
    "uint_for",
    "pack_uint",
    "unpack_uint",
    "unpack_bits",
    "subset_rank",
    "subset_unrank",
    "radix_group",
    "pack_radix",
    "unpack_radix",
]

_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
#: values ``unpack_uint`` expands per step (a multiple of 8)
_UNPACK_STEP = 1 << 14


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (what the container's metadata records)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StorageError(f"unknown dtype {name!r} in stored metadata")
    return dtype


@lru_cache(maxsize=64)
def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (``StorageError`` for a dtype no tensor can hold)."""
    try:
        return torch.empty((), dtype=dtype).element_size()
    except (RuntimeError, TypeError) as err:
        raise StorageError(f"dtype {dtype} cannot be stored: {err}") from err


def raw_bits(t: Tensor, copy: bool = True) -> np.ndarray:
    """The flattened raw bits of ``t``: one unsigned int per element of the same width.

    Element sizes other than 1, 2, 4, 8 bytes (complex128) come back as ``uint8`` rows of the
    element's bytes; only the dense encoding accepts those. ``copy=False``: a read-only view
    of ``t``'s memory where it is a contiguous CPU tensor (no copy of a large tensor).
    """
    t = t.detach()
    size = t.element_size()
    bits = _numpy_bits(t, size)
    if bits is None:
        # a conjugate or negative view stores its values as they read, not its memory
        t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        bits = (t.view(_SIGNED[size]).numpy().view(_UNSIGNED[size]) if size in _SIGNED
                else t.view(torch.uint8).numpy().reshape(-1, size))
    if copy:
        return bits.copy()
    bits.flags.writeable = False
    return bits


def _numpy_bits(t: Tensor, size: int) -> np.ndarray | None:
    """``raw_bits``' flat bits of a CPU tensor through numpy's view of it (a few torch calls
    fewer: what a small tensor's bits cost); ``None`` where numpy has no such dtype (bfloat16,
    float8), the tensor is not on the CPU or has a conj/neg view bit."""
    if t.device.type != "cpu" or size not in _SIGNED:
        return None
    try:
        values = t.numpy()
    except (TypeError, RuntimeError):
        return None
    return np.ascontiguousarray(values).reshape(-1).view(_UNSIGNED[size])


def from_raw_bits(bits: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...],
                  owned: bool = False) -> Tensor:
    """Inverse of ``raw_bits``: a tensor of ``dtype`` and ``shape`` holding exactly ``bits``.

    The tensor gets its own copy of the bits, unless ``owned``: the caller made ``bits`` for
    this tensor alone (a decoder's fresh output, never a stored array, a view of one or of a
    file's bytes), and the tensor then takes its memory as it is."""
    size = element_size(dtype)
    bits = np.ascontiguousarray(bits)
    if size in _SIGNED:
        signed = bits.astype(_UNSIGNED[size], copy=False).view(f"i{size}")
    else:
        signed = bits.astype(np.uint8, copy=False).reshape(-1)
    if not owned or not signed.flags.writeable or not signed.flags.aligned:
        signed = aligned_copy(signed)
    t = torch.from_numpy(signed).view(dtype)
    if t.numel() != math.prod(shape):
        raise StorageError(f"stored data has {t.numel()} elements, shape {shape} needs more/less")
    return t.reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """A new, aligned copy of the contiguous ``a``, copied as bytes: arrays cut from a file's
    bytes at any offset may be unaligned, and numpy's ``copy`` of those is many times slower."""
    out = np.empty(a.shape, a.dtype)
    out.reshape(-1).view(np.uint8)[:] = a.reshape(-1).view(np.uint8)
    return out


@lru_cache(maxsize=1024)
def uint_for(max_value: int) -> np.dtype:
    """The smallest unsigned dtype (uint8/16/32/64) that holds ``max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise StorageError(f"{max_value} does not fit in 64 bits")


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned ints of ``width`` bits each, most significant bit first, into bytes.

    The result has exactly ``ceil(len(values) * width / 8)`` bytes: no per-value padding.
    """
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    if width <= 8:
        return _pack_narrow(values.reshape(-1), width)
    # each value's bytes most significant first, in the narrowest word that holds ``width``
    # bits, expanded by numpy's bit table: its last ``width`` bits are the value's
    size = next(b for b in (2, 4, 8) if width <= 8 * b)
    words = values.reshape(-1).astype(f">u{size}")  # the low bytes, as a cast keeps them
    bits = np.unpackbits(words.view(np.uint8)).reshape(-1, 8 * size)
    return np.packbits(bits[:, 8 * size - width:])


def _pack_narrow(values: np.ndarray, width: int) -> np.ndarray:
    """``pack_uint`` for ``width`` <= 8: eight values at a time make ``width`` whole bytes,
    shifted into one 64-bit word whose low bytes, most significant first, are those bytes."""
    groups = -(-values.size // 8)
    v = np.zeros(groups * 8, np.uint64)
    v[: values.size] = values
    v &= np.uint64((1 << width) - 1)  # the low bits, as a field of ``width`` bits keeps them
    words = np.zeros(groups, np.uint64)
    for j in range(8):  # column by column: a reduction along a short axis is slow in numpy
        words |= v[j::8] << np.uint64((7 - j) * width)
    words = words.astype(">u8")
    out = words.view(np.uint8).reshape(groups, 8)[:, 8 - width:]
    return np.ascontiguousarray(out).reshape(-1)[: -(-values.size * width // 8)]


def unpack_uint(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of ``pack_uint``: ``count`` values of ``width`` bits, as uint64.

    The packed size is checked against ``count`` before anything is allocated, and the bits
    are expanded a bounded number of values at a time (the output is 8 bytes per value)."""
    expected = -(-count * width // 8)
    if packed.dtype != np.uint8 or packed.size != expected:
        raise StorageError(
            f"packed array has {packed.size} bytes of {packed.dtype}; {count} values of "
            f"{width} bits need {expected} uint8"
        )
    out = np.zeros(count, np.uint64)
    if width == 0:
        return out
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    for start in range(0, count, _UNPACK_STEP):  # a multiple of 8: each step starts on a byte
        n = min(_UNPACK_STEP, count - start)
        first = start * width // 8
        bits = np.unpackbits(packed[first: first + -(-n * width // 8)], count=n * width)
        out[start: start + n] = (bits.reshape(n, width).astype(np.uint64) << shifts).sum(
            axis=1, dtype=np.uint64)
    return out


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """``count`` bits packed by ``pack_uint(..., 1)`` or ``np.packbits``, as bools (the size is
    checked before anything is allocated)."""
    if packed.dtype != np.uint8 or packed.size != -(-count // 8):
        raise StorageError(f"packed array has {packed.size} bytes of {packed.dtype}; {count} "
                           f"bits need {-(-count // 8)} uint8")
    return np.unpackbits(packed, count=count).view(bool)


@lru_cache(maxsize=256)
def radix_group(radix: int) -> tuple[int, int]:
    """(g, width): how many digits of base ``radix`` ``pack_radix`` joins into one number,
    and that number's bits, ceil(log2(radix^g)). g (at most 64 digits, radix^g < 2^64) is the
    one with the fewest bits per digit, the smallest on a tie: within a few tenths of a
    percent of log2(radix) per digit for the radixes k-of-n ranks take."""
    if not 2 <= radix < 1 << 32:
        raise StorageError(f"radix must be in [2, 2^32); got {radix}")
    best = (1, (radix - 1).bit_length())
    g = 1
    while g < 64 and radix ** (g + 1) < 1 << 64:
        g += 1
        width = (radix ** g - 1).bit_length()
        if width * best[0] < best[1] * g:
            best = (g, width)
    return best


def pack_radix(digits: np.ndarray, radix: int) -> np.ndarray:
    """Digits in [0, radix) packed g at a time (``radix_group``) as base-``radix`` numbers of
    ``width`` bits each (the last group padded with zero digits): about log2(radix) bits per
    digit, where one fixed-width field per digit takes ceil(log2(radix))."""
    g, width = radix_group(radix)
    d = digits.astype(np.uint64).reshape(-1)
    padded = np.zeros(-(-d.size // g) * g, np.uint64)
    padded[: d.size] = d
    # each group's number: its digits times the powers of radix, summed (every partial sum
    # is below radix^g < 2^64, so nothing overflows) as one integer matrix-vector product:
    # a reduction along rows of a few digits is slow in numpy
    powers = np.array([radix ** (g - 1 - j) for j in range(g)], np.uint64)
    acc = padded.reshape(-1, g) @ powers
    return pack_uint(acc, width)


def unpack_radix(packed: np.ndarray, radix: int, count: int) -> np.ndarray:
    """Inverse of ``pack_radix``: ``count`` digits (uint64); ``StorageError`` where a group is
    not below radix^g or padding digits are not zero."""
    g, width = radix_group(radix)
    groups = -(-count // g)
    acc = unpack_uint(packed, width, groups)
    if groups and int(acc.max()) >= radix ** g:
        raise StorageError(f"a packed group is out of range for {g} digits of base {radix}")
    powers = np.array([radix ** (g - 1 - j) for j in range(g)], np.uint64)
    out = (acc[:, None] // powers[None, :] % np.uint64(radix)).reshape(-1)
    if out[count:].any():
        raise StorageError("the padding digits of a packed group are not zero")
    return out[:count]


@lru_cache(maxsize=64)
def _comb_table(n: int, k: int) -> np.ndarray:
    """``table[i, x] = C(x, i + 1)`` for x < n, i < k (uint64; exact for n <= 64)."""
    return np.array([[math.comb(x, i) for x in range(n)] for i in range(1, k + 1)], np.uint64)


def subset_rank(positions: np.ndarray, n: int) -> np.ndarray:
    """Combinatorial-number-system rank of each row of sorted ``positions`` (rows of k < n).

    ``rank = sum_i C(p_i, i)`` over the sorted positions ``p_1 < ... < p_k`` is a bijection
    onto ``[0, C(n, k))``, so it fits in exactly ``ceil(log2(C(n, k)))`` bits.
    """
    runs, k = positions.shape
    if n > 64:
        raise StorageError(f"k-of-n ranks support n <= 64; got n={n}")
    if k == 0:
        return np.zeros(runs, np.uint64)
    table = _comb_table(n, k)
    rank = table[0][positions[:, 0]]  # column by column: k gathers, no 2-D fancy index
    for i in range(1, k):
        rank = rank + table[i][positions[:, i]]
    return rank


def subset_unrank(ranks: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of ``subset_rank``: the sorted positions (runs, k) of each rank."""
    if n > 64:
        raise StorageError(f"k-of-n ranks support n <= 64; got n={n}")
    ranks = ranks.astype(np.uint64).copy()
    if ranks.size and int(ranks.max()) >= math.comb(n, k):
        raise StorageError(f"a stored k-of-n rank is out of range for {k}:{n}")
    out = np.zeros((ranks.size, k), np.int64)
    if k == 0:
        return out
    table = _comb_table(n, k)
    for i in range(k, 0, -1):
        # greedy: the largest x with C(x, i) <= rank (C(x, i) grows with x: a sorted search)
        x = np.searchsorted(table[i - 1], ranks, side="right") - 1
        out[:, i - 1] = x
        ranks = ranks - table[i - 1][x]
    return out
