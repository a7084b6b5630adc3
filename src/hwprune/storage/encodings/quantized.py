"""Quantized tensors: every value an integer code in [-q, q] times one per-tensor scale, as
an encoding of its own and as the coded payload of any sparse encoding (``qvalues``)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from ..bits import from_raw_bits, pack_uint, raw_bits, unpack_uint
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

__all__ = ["Quantized", "QUANT_MAX", "QVALUES", "find_scale", "quantize_values",
           "dequantize_values"]

QUANT_MAX = 127
QUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the meta key of a sparse encoding whose payload is stored as codes
QVALUES = "qvalues"


class Quantized(Encoding):
    """Few distinct values, each an integer code in [-q, q] times one per-tensor scale:
    codes offset by q, packed in ceil(log2(2q+1)) bits, + the scale in the tensor's dtype."""

    name, simplicity = "quantized", 7
    needs_zeros, cost = False, 2

    def encode_view(self, view: TensorView) -> EncodedTensor:
        self.require_sparse_ok(view)
        found = find_scale(view)
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
        q = stored_param(enc, "qmax")
        if not 1 <= q <= QUANT_MAX or enc.dtype not in QUANT_DTYPES:
            raise StorageError(f"quantized: stored qmax {q} or dtype {enc.dtype} not allowed")
        numel = math.prod(enc.shape)
        codes = unpack_uint(stored_array(enc.payload, "codes", enc), (2 * q).bit_length(), numel)
        if (codes > 2 * q).any():
            raise StorageError(f"quantized: a stored code is outside [-{q}, {q}]")
        scale = from_raw_bits(stored_values(enc, 1, "scale"), enc.dtype, ())
        out = torch.from_numpy(codes.astype(np.int64) - q).to(enc.dtype) * scale
        return out.reshape(enc.shape)

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        return [{}] if view.sparse_ok() and view.dtype in QUANT_DTYPES else []

    def sizes(self, view: TensorView, params: dict) -> Size:
        return Size({}, 0, self.encode_view(view, **params).nbytes)  # codes: not raw values

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return 0.0  # no index: every element has its code, zeros included


def find_scale(view: TensorView) -> tuple[int, Tensor] | None:
    """The smallest q (and a scale in the dtype) with every value == code.to(dtype) * scale
    (found once per analysed tensor)."""
    if "scale" not in view.memo:
        view.memo["scale"] = _find_scale(view)
    return view.memo["scale"]


def _find_scale(view: TensorView) -> tuple[int, Tensor] | None:
    if view.dtype not in QUANT_DTYPES or not view.sparse_ok():
        return None
    limit = 2 * QUANT_MAX + 1
    # cheap early exits for ordinary weights: too many distinct values in a prefix (its
    # nonzeros first: a sparse tensor's prefix is mostly zeros)
    head = view.bits[:4096]
    head = np.sort(head[head != 0][: 2 * limit])
    if head.size and 1 + np.count_nonzero(head[1:] != head[:-1]) > limit:
        return None
    # every value is near a multiple of top / q: tested on a few of the prefix's first
    if head.size and view.dtype.is_floating_point:
        keep = view.bits.dtype.type((1 << (8 * view.itemsize - 1)) - 1)
        largest = (view.bits & keep).max()  # finite floats: magnitude order is bit order
        top = float(_float64(np.array([largest], view.bits.dtype), view.dtype)[0])
        if top and not _possible_q(_float64(head[:16], view.dtype), top, view.dtype).any():
            return None
    uniq = np.unique(view.bits[:4096])
    if uniq.size > limit:
        return None
    if view.numel > 4096:
        uniq = np.unique(view.bits)
    sign = uniq.dtype.type(1 << (8 * uniq.dtype.itemsize - 1))
    if uniq.size > limit or (uniq == sign).any():  # too many values, or a -0.0
        return None
    magnitudes = np.unique(uniq & ~sign)
    magnitudes = magnitudes[magnitudes != 0]
    if magnitudes.size == 1:
        # one magnitude (a constant tensor, BatchNorm's ones): the codes -1, 0, 1 and that
        # magnitude rebuild every value exactly (1.0 * s is s), and no q is smaller than 1
        return 1, from_raw_bits(magnitudes, view.dtype, ())
    as64 = _float64(uniq, view.dtype)
    top = float(np.abs(as64).max())
    possible = _possible_q(as64, top, view.dtype) if top else None
    if possible is None or not possible.any():
        return None
    vals = from_raw_bits(uniq, view.dtype, (uniq.size,))
    q = torch.arange(1, QUANT_MAX + 1, dtype=torch.float64)[torch.from_numpy(possible)]
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


def _float64(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The values of raw ``bits`` of a float ``dtype`` as float64, in numpy alone."""
    if dtype == torch.bfloat16:  # the top half of a float32
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return bits.view({2: np.float16, 4: np.float32, 8: np.float64}[bits.itemsize]).astype(
        np.float64)


def _possible_q(vals: np.ndarray, top: float, dtype: torch.dtype) -> np.ndarray:
    """Which q in 1..QUANT_MAX can pass the exact test, from float64 arithmetic alone: if
    v == fl(c * s) with |c| <= q and s within a few ulps of top / q, then v / (top / q) is
    within q * 4 * eps of the integer c. A necessary condition that rules out ordinary weights
    in one vectorised step (all q pass where values are subnormal: no relative bound there)."""
    q = np.arange(1, QUANT_MAX + 1, dtype=np.float64)
    info = torch.finfo(dtype)
    if top / QUANT_MAX < info.tiny * 1024:
        return np.ones(q.size, bool)
    codes = vals[None, :] / (top / q)[:, None]
    tolerance = q[:, None] * 4 * info.eps + 1e-9
    return (np.abs(codes - np.rint(codes)) <= tolerance).all(axis=1)


def _scale_fits(vals: Tensor, bits: np.ndarray, scales: Tensor, qs: Tensor) -> Tensor:
    """For each candidate scale: does every value equal ``round(v / s).to(dtype) * s``
    bitwise, with the code within [-q, q]?"""
    codes = torch.round(vals.double()[None, :] / scales.double()[:, None])
    rebuilt = codes.to(vals.dtype) * scales[:, None]
    same = torch.from_numpy(raw_bits(rebuilt).reshape(rebuilt.shape) == bits[None, :])
    return (torch.isfinite(scales)[:, None] & (codes.abs() <= qs[:, None]) & same).all(dim=1)


def quantize_values(enc: EncodedTensor, found: tuple[int, Tensor]) -> EncodedTensor | None:
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


def dequantize_values(enc: EncodedTensor) -> EncodedTensor:
    """The inverse of ``quantize_values``: the payload arrays as raw bits again."""
    info = enc.meta[QVALUES]
    q = info.get("qmax") if isinstance(info, dict) else None
    counts = info.get("counts") if isinstance(info, dict) else None
    if (not isinstance(q, int) or not 1 <= q <= QUANT_MAX or enc.dtype not in QUANT_DTYPES
            or not isinstance(counts, dict)):
        raise StorageError(f"{enc.encoding}: stored quantized values ({info!r}) for "
                           f"{enc.dtype} are not valid")
    scale = from_raw_bits(stored_values(enc, 1, "scale"), enc.dtype, ())
    payload = {}
    for name, count in counts.items():
        codes = unpack_uint(stored_array(enc.payload, f"{name}_codes", enc),
                            (2 * q).bit_length(), int(count))
        if (codes > 2 * q).any():
            raise StorageError(f"{enc.encoding}: a stored code is outside [-{q}, {q}]")
        values = torch.from_numpy(codes.astype(np.int64) - q).to(enc.dtype) * scale
        payload[name] = raw_bits(values).reshape(-1)
    return replace(enc, payload=payload,
                   meta={k: v for k, v in enc.meta.items() if k != QVALUES})
