"""Every encoding by name, and ``encode``/``decode`` through them (with the zero-signs and
quantized-values variants undone on the way back)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from torch import Tensor

from ..errors import StorageError
from .base import ZERO_SIGNS, EncodedTensor, Encoding, restore_zero_signs
from .block import BlockEncoding
from .dense import Dense
from .gaps import Gaps
from .irregular import CSR, Bitmask
from .kofn import KofNEncoding
from .quantized import QVALUES, Quantized, dequantize_values
from .rowblock import RowBlock
from .unified import Unified
from .valuecoding import VCODED, decode_values

__all__ = ["ENCODINGS", "encode", "decode"]

ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (Dense(), Bitmask(), CSR(), BlockEncoding(), KofNEncoding(), RowBlock(), Unified(),
              Quantized(), Gaps())
}


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
        out = restore_zero_signs(_decode_base(base), enc)
    else:
        out = _decode_base(enc)
    if out.dtype != enc.dtype or tuple(out.shape) != tuple(enc.shape):
        raise StorageError(f"{enc.encoding}: decoded {out.dtype} {tuple(out.shape)}, stored "
                           f"{enc.dtype} {enc.shape}")
    return out


def _decode_base(enc: EncodedTensor) -> Tensor:
    if enc.meta.get(VCODED) is not None:
        enc = decode_values(enc, math.prod(enc.shape))
    if enc.meta.get(QVALUES) is not None:
        enc = dequantize_values(enc)
    return ENCODINGS[enc.encoding].decode(enc)
