"""k-of-n: at most k nonzeros in every run of n consecutive elements along dim 1."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ...hardware import ceil_log2, kofn_min_bits, kofn_rank_bits
from ..bits import (
    from_raw_bits,
    pack_radix,
    pack_uint,
    radix_group,
    subset_rank,
    subset_unrank,
    unpack_radix,
    unpack_uint,
)
from ..errors import StorageError
from .base import (
    EncodedTensor,
    Encoding,
    Size,
    TensorView,
    stored_array,
    stored_param,
    stored_values,
)

__all__ = ["KofNEncoding", "KOFN_N", "run_counts"]

#: the run lengths the chooser tries (plus the one a hint names)
KOFN_N = (2, 4, 8, 16)


class KofNEncoding(Encoding):
    """At most k nonzeros in every run of n consecutive elements along dim 1: k values per run
    + the positions, as a combinatorial rank (``positions="rank"``, ceil(log2 C(n, k)) bits per
    run) or as k indices of ceil(log2 n) bits (``positions="index"``)."""

    name, simplicity = "kofn", 4
    cost = 1
    POSITIONS = ("index", "rank", "coded")

    @staticmethod
    def _runs(bits: np.ndarray, shape: tuple[int, ...], n: int) -> np.ndarray:
        return np.moveaxis(bits.reshape(shape), 1, -1).reshape(-1, n)

    def encode_view(self, view: TensorView, k: int | None = None, n: int | None = None,
                    positions: str = "rank") -> EncodedTensor:
        self.require_sparse_ok(view)
        if positions not in self.POSITIONS:
            raise StorageError(f"kofn positions must be one of {self.POSITIONS}; got {positions!r}")
        if len(view.shape) < 2 or not isinstance(n, int) or not 2 <= n <= 64 \
                or view.shape[1] % n:
            raise StorageError(
                f"kofn needs n in [2, 64] dividing dim 1 of a tensor with 2+ dimensions; got "
                f"n={n} for shape {view.shape}"
            )
        nz = self._runs(view.nz, view.shape, n)
        counts = run_counts(view, n)
        most = int(counts.max())
        k = max(most, 1) if k is None else k
        if not isinstance(k, int) or not most <= k < n:
            raise StorageError(
                f"kofn {k}:{n} does not fit: a run of {n} along dim 1 holds {most} nonzeros "
                f"(need 1 <= k < n and at most k nonzeros per run)"
            )
        # k positions per run: its nonzeros, padded with its lowest zero positions; sorted
        missing = k - counts.astype(np.int64)
        chosen = nz if not missing.any() else nz | (np.cumsum(~nz, axis=1) <= missing[:, None])
        at = np.flatnonzero(chosen)  # row-major: run by run, each run's positions ascending
        pos = (at & (n - 1) if n & (n - 1) == 0 else at % n).reshape(-1, k)  # & : cheaper
        values = self._runs(view.bits, view.shape, n).reshape(-1)[at]
        if positions == "rank":
            code = pack_uint(subset_rank(pos, n), kofn_rank_bits(n, k))
        elif positions == "coded":
            code = pack_radix(subset_rank(pos, n), math.comb(n, k))
        else:
            code = pack_uint(pos.reshape(-1), ceil_log2(n))
        return view.encoded(self.name, {"values": values.reshape(-1)}, {"positions": code},
                            k=k, n=n, positions=positions)

    def decode(self, enc: EncodedTensor) -> Tensor:
        k, n = stored_param(enc, "k"), stored_param(enc, "n")
        mode = enc.meta.get("positions")
        if len(enc.shape) < 2 or not 1 <= k < n <= 64 or enc.shape[1] % n:
            raise StorageError(f"kofn: stored {k}:{n} does not fit shape {enc.shape}")
        runs = math.prod(enc.shape) // n
        code = stored_array(enc.index, "positions", enc)
        if mode == "rank":
            ranks = unpack_uint(code, kofn_rank_bits(n, k), runs)
            pos = subset_unrank(ranks, n, k)
        elif mode == "coded":
            pos = subset_unrank(unpack_radix(code, math.comb(n, k), runs), n, k)
        elif mode == "index":
            pos = unpack_uint(code, ceil_log2(n), runs * k).astype(np.int64).reshape(runs, k)
            if (pos >= n).any():
                raise StorageError(f"kofn: a stored position is >= n={n}")
        else:
            raise StorageError(f"kofn: unknown positions mode {mode!r}")
        values = stored_values(enc, runs * k).reshape(runs, k)
        out = np.zeros((runs, n), values.dtype)
        np.put_along_axis(out, pos, values, axis=1)
        moved = (enc.shape[0], *enc.shape[2:], enc.shape[1])
        flat = np.moveaxis(out.reshape(moved), -1, 1).reshape(-1)
        return from_raw_bits(flat, enc.dtype, enc.shape, owned=True)

    @staticmethod
    def _lengths(view: TensorView, hints: dict[str, tuple[int, int]]) -> list[int]:
        """The run lengths tried on ``view``: those of ``KOFN_N`` and the hint that fit it."""
        ns = set(KOFN_N) | ({hints["kofn"][1]} if "kofn" in hints else set())
        return [n for n in sorted(ns) if 2 <= n <= 64 and view.shape[1] % n == 0]

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        if not view.sparse_ok() or len(view.shape) < 2:
            return []
        out = []
        for n in self._lengths(view, hints):
            most = int(run_counts(view, n).max())
            if most < n:
                out += [{"k": max(most, 1), "n": n, "positions": p} for p in self.POSITIONS]
        return out

    def family_bound(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> int:
        """k values in every run of n, k at least the average count of a run (and 1): the
        fewest over the run lengths tried."""
        if not view.sparse_ok() or len(view.shape) < 2:
            return 0
        runs = [view.numel // n for n in self._lengths(view, hints)]
        return min((r * max(1, -(-view.nonzero // r)) * view.itemsize for r in runs), default=0)

    def sizes(self, view: TensorView, params: dict) -> Size:
        k, n, mode = params["k"], params["n"], params.get("positions", "rank")
        runs = view.numel // n
        if mode == "rank":
            bits = runs * kofn_rank_bits(n, k)
        elif mode == "coded":
            g, width = radix_group(math.comb(n, k))
            bits = -(-runs // g) * width
        else:
            bits = runs * k * ceil_log2(n)
        return Size({"values": runs * k}, -(-bits // 8))

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        k, n = enc.meta["k"], enc.meta["n"]
        return kofn_min_bits(math.prod(enc.shape) // n, n, k)


def run_counts(view: TensorView, n: int) -> np.ndarray:
    """The nonzeros (uint8) of each run of ``n`` consecutive elements along dim 1 of ``view``
    (n dividing dim 1). Kept in ``view.memo``: an even n's counts are the sums of adjacent
    pairs of n / 2's, so the sizes the chooser tries (2, 4, 8, 16) cost one pass in all."""
    key = ("kofn counts", n)
    if key not in view.memo:
        if n % 2 == 0:
            half = run_counts(view, n // 2)
            view.memo[key] = half[0::2] + half[1::2]
        else:
            ones = KofNEncoding._runs(view.nz, view.shape, 1).reshape(-1).view(np.uint8)
            view.memo[key] = ones if n == 1 else np.add.reduceat(
                ones, np.arange(0, ones.size, n), dtype=np.uint8)
    return view.memo[key]
