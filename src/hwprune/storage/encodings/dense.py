"""The dense encoding: every element's raw bits, in order."""

from __future__ import annotations

from torch import Tensor

from ..bits import from_raw_bits
from .base import EncodedTensor, Encoding, Size, TensorView, stored_array

__all__ = ["Dense"]


class Dense(Encoding):
    """Every element's raw bits, in order. Always applicable; the reference for the others."""

    name, simplicity = "dense", 0
    needs_zeros = False

    def encode_view(self, view: TensorView) -> EncodedTensor:
        return view.encoded(self.name, {"values": view.bits.reshape(-1)}, {})

    def decode(self, enc: EncodedTensor) -> Tensor:
        return from_raw_bits(stored_array(enc.payload, "values", enc), enc.dtype, enc.shape,
                             owned="values" in enc.fresh)

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        return [{}]

    def sizes(self, view: TensorView, params: dict) -> Size:
        return Size({"values": view.numel}, 0)

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        return 0.0
