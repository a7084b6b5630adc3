"""Golomb codes of gaps, vectorised: an entropy-coded position index for irregular sparsity.

Positions p_0 < p_1 < ... of a set in [0, N) become gaps g_i = p_i - p_{i-1} - 1 (p_{-1} = -1),
each Golomb-coded with one parameter m per tensor: q = g // m in unary (q ones, then a zero),
r = g % m in truncated binary (b = ceil(log2 m) bits, u = 2^b - m: r < u takes b - 1 bits,
r >= u takes b bits as r + u). For geometric gaps (independent positions at density p) the
best m is about -log(2 - p) / log(1 - p), and the code is within a fraction of a percent of the
entropy, i.e. of log2 C(N, count).

A sequential Golomb stream needs a per-symbol loop to decode. Here the same bits are laid out
as three consecutive sections of one bit stream, so that both directions are whole-array numpy:
all unary parts, then the high b - 1 bits of every remainder (fixed width), then the one low bit
of the remainders that need it (those whose high part is >= u). The bit count is exactly that
of the sequential code; one byte stream holds it, zero-padded to a whole byte.
"""

from __future__ import annotations

import math

import numpy as np

from .bits import pack_uint
from .errors import StorageError

__all__ = ["golomb_bits", "best_parameter", "best_parameter_bits", "tried_parameters",
           "histogram_bits", "golomb_encode", "golomb_decode", "gaps_of"]


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """The gaps (int64) before each of the sorted ``positions``."""
    p = positions.astype(np.int64, copy=False)
    g = np.empty(p.size, np.int64)
    if p.size:
        g[0] = p[0]
        np.subtract(p[1:], p[:-1], out=g[1:])
        g -= 1
        g[0] += 1  # the first gap counts from -1: the position itself
    return g


def _split(m: int) -> tuple[int, int]:
    """(b, u) of parameter ``m``: remainder bits and the truncated-binary threshold."""
    b = (m - 1).bit_length()
    return b, (1 << b) - m


def golomb_bits(gaps: np.ndarray, m: int) -> int:
    """The exact bit count of ``golomb_encode(gaps, m)`` (before padding to a byte)."""
    if gaps.size == 0:
        return 0
    b, u = _split(m)
    if b == 0:
        return int(gaps.sum()) + gaps.size
    q, r = np.divmod(gaps, m)
    unary = int(q.sum()) + gaps.size
    long_ones = gaps.size if u == 0 else int(np.count_nonzero(r >= u))
    return unary + gaps.size * (b - 1) + long_ones


def tried_parameters(count: int, numel: int) -> list[int]:
    """The m ``best_parameter`` compares for ``count`` gaps in ``numel`` elements: values
    around the geometric optimum for the density and the powers of two near it, ascending."""
    p = min(max(count / max(numel, 1), 1e-9), 1 - 1e-9)
    m0 = max(1, round(-math.log(2 - p) / math.log1p(-p)))
    tried = {max(1, m0 + d) for d in range(-2, 3)} | {max(1, m0 * 3 // 4), m0 * 3 // 2 or 1}
    tried |= {1 << max(0, (m0 - 1).bit_length() - 1), 1 << (m0 - 1).bit_length()}
    return sorted(tried)


def best_parameter(gaps: np.ndarray, numel: int) -> int:
    """The m of ``tried_parameters`` with the fewest bits (the smallest on a tie): chosen
    from exact counts, without encoding. Where the gaps are short (a sparse tensor's usually
    are), the counts come from one histogram of the gaps, every m counted in one pass over
    it instead of over the gaps."""
    return best_parameter_bits(gaps, numel)[0]


def best_parameter_bits(gaps: np.ndarray, numel: int) -> tuple[int, int]:
    """``best_parameter`` and its ``golomb_bits``."""
    if gaps.size == 0:
        return 1, 0
    tried = tried_parameters(gaps.size, numel)
    if int(gaps.max()) > gaps.size:
        bits = [golomb_bits(gaps, m) for m in tried]
    else:
        bits = histogram_bits(np.bincount(gaps), np.array(tried, np.int64)).tolist()
    best = bits.index(min(bits))  # the first of the fewest: the smallest m
    return tried[best], bits[best]


def histogram_bits(counts: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """``golomb_bits`` with each parameter of ``ms`` (exact, int64) of the gaps given as
    ``counts[g]`` gaps of each length ``g``. (m = 1, b = 0, is the general formula too: no
    remainder bits, and u = 0 adds back the n that n * (b - 1) takes.)"""
    if ms.size > 1 and ms.size * counts.size > _HISTOGRAM_CELLS:  # bounded temporaries
        return np.concatenate([histogram_bits(counts, ms[i: i + 1]) for i in range(ms.size)])
    n = int(counts.sum())
    values = np.arange(counts.size, dtype=np.int64)
    q = values[None, :] // ms[:, None]
    r = values[None, :] - q * ms[:, None]
    b = np.array([(int(m) - 1).bit_length() for m in ms], np.int64)
    u = (np.int64(1) << b) - ms
    long_ones = np.where(u == 0, n, (r >= u[:, None]) @ counts)
    return q @ counts + n + n * (b - 1) + long_ones


#: ``histogram_bits`` counts all parameters at once up to this many (parameter, length) cells
_HISTOGRAM_CELLS = 1 << 20


def golomb_encode(gaps: np.ndarray, m: int) -> np.ndarray:
    """The packed bit stream (uint8) of ``gaps`` (non-negative ints) with parameter ``m``."""
    if gaps.size == 0:
        return np.zeros(0, np.uint8)
    g = gaps.astype(np.int64)
    q, r = g // m, g % m
    b, u = _split(m)
    ends = np.cumsum(q + 1)  # the zero closing each unary part sits at ends - 1
    unary = np.ones(int(ends[-1]), np.uint8)
    unary[ends - 1] = 0
    parts = [unary]
    if b:
        long = r >= u
        high = np.where(long, (r + u) >> 1, r)
        if b > 1:
            parts.append(np.unpackbits(pack_uint(high, b - 1), count=g.size * (b - 1)))
        parts.append(((r[long] + u) & 1).astype(np.uint8))
    return np.packbits(np.concatenate(parts))


def golomb_decode(packed: np.ndarray, count: int, m: int) -> np.ndarray:
    """The ``count`` gaps of a stream ``golomb_encode`` wrote (``StorageError`` for any stream
    that is not exactly such a stream: too short, too long, or with stray padding bits)."""
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise StorageError(f"golomb: the stream must be uint8 bytes; got {packed.dtype}")
    if not isinstance(m, int) or m < 1 or m > 1 << 40:
        raise StorageError(f"golomb: parameter m={m!r} is not an int in [1, 2^40]")
    if count == 0:
        if packed.size:
            raise StorageError("golomb: a stream for no positions must be empty")
        return np.zeros(0, np.int64)
    bits = np.unpackbits(packed)
    zeros = _first_zeros(bits, count)  # every unary part ends in a zero
    if zeros.size < count:
        raise StorageError(f"golomb: the stream ends before {count} gaps")
    q = np.diff(zeros, prepend=-1) - 1
    b, u = _split(m)
    at = int(zeros[-1]) + 1
    r = np.zeros(count, np.int64)
    if b:
        if b > 1:
            width = count * (b - 1)
            if at + width > bits.size:
                raise StorageError(f"golomb: the stream ends before {count} remainders")
            shifts = np.arange(b - 2, -1, -1, dtype=np.int64)
            high = (bits[at: at + width].reshape(count, b - 1).astype(np.int64) << shifts).sum(1)
            at += width
        else:
            high = np.zeros(count, np.int64)
        long = high >= u
        n_long = int(long.sum())
        if at + n_long > bits.size:
            raise StorageError("golomb: the stream ends before the remainders' low bits")
        low = bits[at: at + n_long].astype(np.int64)
        at += n_long
        r = high.copy()
        r[long] = (high[long] << 1 | low) - u
        if (r >= m).any():
            raise StorageError(f"golomb: a stored remainder is >= m={m}")
    if -(-at // 8) != packed.size or bits[at:].any():
        raise StorageError("golomb: the stream is longer than its gaps, or its padding is not zero")
    return q * m + r


#: bits searched for zeros per step: the positions found never take more than ``count`` + one
#: step's worth of memory, whatever the stream holds
_ZERO_STEP = 1 << 23


def _first_zeros(bits: np.ndarray, count: int) -> np.ndarray:
    """Positions of the first ``count`` zeros of ``bits`` (fewer if it has fewer)."""
    found, total = [], 0
    for start in range(0, bits.size, _ZERO_STEP):
        z = np.flatnonzero(bits[start: start + _ZERO_STEP] == 0)[: count - total] + start
        found.append(z)
        total += z.size
        if total == count:
            break
    return np.concatenate(found) if found else np.zeros(0, np.int64)
