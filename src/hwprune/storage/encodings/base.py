"""What every encoding shares: the encoded form, the analysed tensor, the ``Encoding`` base
class, checked access to stored arrays, and the zero-signs variant."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ...hardware import im2col_shape
from ..bits import element_size, from_raw_bits, raw_bits, unpack_bits
from ..errors import StorageError

__all__ = [
    "ALIAS",
    "check_storable",
    "EncodedTensor",
    "TensorView",
    "Encoding",
    "ZERO_SIGNS",
    "add_zero_signs",
    "restore_zero_signs",
    "stored_param",
    "stored_array",
    "stored_values",
    "zero_bits",
    "matrix_of",
    "Size",
]



def check_storable(t: object) -> None:
    """``StorageError`` unless ``t`` is a tensor whose values are its bits: strided, with
    data (not on the meta device), not quantized (a quantized tensor's values also need its
    scale and zero point, which no encoding stores)."""
    if not isinstance(t, Tensor):
        raise StorageError(f"expected a torch.Tensor; got {type(t).__name__}")
    if t.layout != torch.strided:
        raise StorageError(f"only strided (dense-layout) tensors are stored; got {t.layout} "
                           "(call .to_dense() first)")
    if t.device.type == "meta":
        raise StorageError("a tensor on the meta device holds no values to store (load or "
                           "initialise its weights first)")
    if t.is_quantized:
        raise StorageError(f"quantized tensors ({t.dtype}) are not stored: their scale and zero "
                           "point are not saved (store t.dequantize(), or t.int_repr() and the "
                           "quantization parameters)")

@dataclass(frozen=True, eq=False)
class EncodedTensor:
    """One tensor in one encoding: arrays (payload and index kept apart) + small metadata."""

    encoding: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload: dict[str, np.ndarray]
    index: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    #: the payload arrays (by name) made for one decode of this tensor alone (``decode_values``'
    #: output, held by nothing else): a decoder may return a tensor over them without a copy
    fresh: frozenset[str] = field(default=frozenset(), repr=False)

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
        from .registry import decode  # the registry knows every encoding

        return decode(self)


@dataclass
class TensorView:
    """A tensor analysed once for all candidate encodings (raw bits, nonzeros, finiteness)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    bits: np.ndarray
    nz: np.ndarray
    finite: bool
    #: what one size computation leaves for another's bound (block: kept elements per tile)
    memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, t: Tensor) -> TensorView:
        check_storable(t)
        t = t.detach().cpu()
        bits = raw_bits(t, copy=False)  # read-only: nothing writes to an analysed tensor
        nz = bits != 0 if bits.ndim == 1 else (bits != 0).any(axis=1)
        return cls(t.dtype, tuple(t.shape), bits, nz, _all_finite(t, bits))

    @property
    def numel(self) -> int:
        return int(self.nz.size)

    @property
    def itemsize(self) -> int:
        return element_size(self.dtype)

    @cached_property
    def nonzero(self) -> int:
        """How many elements are nonzero (counted once for every candidate's size)."""
        return int(np.count_nonzero(self.nz))

    @cached_property
    def matrix(self) -> tuple[int, int]:
        """The im2col view: (shape[0], rest) for 2+ dimensions, else one row."""
        return im2col_shape(self.shape)

    def sparse_ok(self) -> bool:
        """Whether non-dense encodings apply: plain-width elements, finite, not empty."""
        return self.bits.ndim == 1 and self.finite and self.numel > 0

    @cached_property
    def negzero(self) -> np.ndarray:
        """Where the tensor holds -0.0 (floating dtypes only; all False otherwise)."""
        if not self.dtype.is_floating_point or self.bits.ndim != 1:
            return np.zeros(self.numel, bool)
        return self.bits == self.bits.dtype.type(1 << (8 * self.itemsize - 1))

    def canonical(self) -> TensorView:
        """This tensor with every -0.0 made +0.0: the base of the zero-signs variant."""
        bits = np.where(self.negzero, 0, self.bits).astype(self.bits.dtype)
        return TensorView(self.dtype, self.shape, bits, bits != 0, self.finite)

    def encoded(self, name: str, payload: dict, index: dict, **meta: Any) -> EncodedTensor:
        return EncodedTensor(name, self.dtype, self.shape, payload, index, meta)


#: the exponent bits of the common float dtypes: all set means inf or NaN
_EXPONENTS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
              torch.float64: 0x7FF0000000000000}


#: the float dtypes numpy shares with torch (same IEEE layouts)
_NUMPY_FLOATS = {torch.float16: np.float16, torch.float32: np.float32,
                 torch.float64: np.float64}


def _all_finite(t: Tensor, bits: np.ndarray) -> bool:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.dtype in _NUMPY_FLOATS:  # numpy's own test on the same bits: one pass
        return bool(np.isfinite(bits.view(_NUMPY_FLOATS[t.dtype])).all())
    if t.dtype in _EXPONENTS:  # on the raw bits: one vectorised pass, no float conversion
        mask = bits.dtype.type(_EXPONENTS[t.dtype])
        return not bool(np.any((bits & mask) == mask))
    if t.element_size() == 1:  # float8 kinds: isfinite is not implemented for all of them
        t = t.float()
    return bool(torch.isfinite(t).all())


# -- checked access to what an encoding stored -----------------------------------------------
def stored_param(enc: EncodedTensor, key: str) -> int:
    """The int parameter ``key`` of ``enc`` (``StorageError`` if missing or not an int)."""
    value = enc.meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise StorageError(f"{enc.encoding}: stored parameter {key!r} is missing or not an int")
    return value


def stored_array(arrays: dict[str, np.ndarray], key: str, enc: EncodedTensor) -> np.ndarray:
    """``arrays[key]`` (``enc``'s payload or index), or a ``StorageError`` naming it."""
    if key not in arrays:
        raise StorageError(f"{enc.encoding}: stored array {key!r} is missing")
    return np.asarray(arrays[key])


def stored_values(enc: EncodedTensor, count: int, key: str = "values") -> np.ndarray:
    """The ``count`` stored raw-bit values, checked against the dtype's width."""
    v = stored_array(enc.payload, key, enc)
    size = element_size(enc.dtype)
    if v.ndim != 1 or v.size != count or v.dtype.itemsize != size or v.dtype.kind != "u":
        raise StorageError(
            f"{enc.encoding}: expected {count} stored values of {size} bytes; got {v.size} "
            f"of {v.dtype}"
        )
    return v


def zero_bits(enc: EncodedTensor) -> np.ndarray:
    """All-zero raw bits of ``enc``'s size and element width: what decoding fills in."""
    size = element_size(enc.dtype)
    return np.zeros(math.prod(enc.shape), np.dtype(f"u{size}"))


def matrix_of(enc: EncodedTensor) -> tuple[int, int]:
    """The im2col matrix of the stored tensor."""
    return im2col_shape(enc.shape)


# -- the encoding interface ----------------------------------------------------------------
class Size(NamedTuple):
    """What ``encode_view(view, **params)`` would store, computed without encoding it:
    ``values``, the element count of each payload array of raw values (what a quantized-values
    or value-coded variant recodes); ``index``, the index bytes; ``other``, payload bytes that
    are not raw values (codes, a scale)."""

    values: dict[str, int]
    index: int
    other: int = 0

    def total(self, itemsize: int) -> int:
        return sum(self.values.values()) * itemsize + self.other + self.index


class Encoding:
    """One encoding: ``encode(t, **params)``, ``decode(enc)``, and what the chooser tries."""

    name: ClassVar[str]
    #: lower is simpler; the chooser breaks ties towards simpler encodings
    simplicity: ClassVar[int]
    #: whether the encoding can only win on a tensor with zeros (the chooser skips it on one
    #: without: its payload alone would be the dense size)
    needs_zeros: ClassVar[bool] = True
    #: how much computing its size costs: 0 one pass, 1 a pass per parameter set, 2 more;
    #: the chooser tries cheaper ones first, so the bounds of the others have a best to beat
    cost: ClassVar[int] = 0

    def encode(self, t: Tensor, zero_signs: bool = False, **params: Any) -> EncodedTensor:
        """Encode ``t``; ``StorageError`` if it cannot take this encoding (with these params).

        ``zero_signs=True``: encode ``t`` with -0.0 made +0.0, plus one sign bit per zero.
        """
        allowed = set(inspect.signature(self.encode_view).parameters) - {"view"}
        if set(params) - allowed:
            raise StorageError(
                f"{self.name} takes parameters {sorted(allowed)}; got {sorted(params)}"
            )
        view = TensorView.of(t)
        if not zero_signs:
            return self.encode_view(view, **params)
        if self.name == "dense" or not view.dtype.is_floating_point:
            raise StorageError("zero_signs applies to sparse encodings of floating tensors")
        return add_zero_signs(self.encode_view(view.canonical(), **params), view)

    def encode_view(self, view: TensorView, **params: Any) -> EncodedTensor:
        """Encode an analysed tensor (``StorageError`` if it does not fit)."""
        raise NotImplementedError

    def decode(self, enc: EncodedTensor) -> Tensor:
        raise NotImplementedError

    def candidates(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> list[dict]:
        """Parameter sets worth trying on ``view`` (empty: not applicable)."""
        return [{}] if view.sparse_ok() else []

    def min_index_bits(self, enc: EncodedTensor) -> float | None:
        """Information-theoretic minimum of the index for this pattern (None: undefined)."""
        return None

    def lower_bound(self, view: TensorView, params: dict) -> int:
        """Bytes ``encode_view(view, **params)`` takes at least, from one cheap pass: the
        chooser skips the exact size where this already loses (not where the values could
        be stored as quantized codes: the bound counts them at full width)."""
        return 0

    def family_bound(self, view: TensorView, hints: dict[str, tuple[int, int]]) -> int:
        """Bytes every parameter set of ``candidates(view, hints)`` takes at least, from the
        view's counts alone: the chooser skips the whole encoding where this already loses,
        before its candidates are analysed (the same rule as ``lower_bound``)."""
        return 0

    def sizes(self, view: TensorView, params: dict) -> Size:
        """The ``Size`` of ``encode_view(view, **params)`` (``StorageError`` where it does not
        apply). Encodings with a closed form override this; the default encodes, for those
        whose pattern analysis is the encoding itself."""
        enc = self.encode_view(view, **params)
        return Size({k: int(a.size) for k, a in enc.payload.items()}, enc.index_bytes)

    def require_sparse_ok(self, view: TensorView) -> None:
        """``StorageError`` unless non-dense encodings apply to ``view``."""
        if not view.sparse_ok():
            raise StorageError(
                f"{self.name} needs a finite, non-empty tensor of 1/2/4/8-byte elements; got "
                f"{view.dtype} of shape {view.shape} (NaN/inf and odd dtypes are stored dense)"
            )


# -- the zero-signs variant ------------------------------------------------------------------
ZERO_SIGNS = "zero_signs"
#: the encoding name of a record that holds no data: a tied entry, stored under an earlier name
#: (``hwprune.storage.aliases``)
ALIAS = "alias"


def add_zero_signs(enc: EncodedTensor, view: TensorView) -> EncodedTensor:
    """``enc`` (of ``view.canonical()``) + which zeros of ``view`` are -0.0: one bit per zero
    element in flat order. Cheaper than storing each -0.0 as a value when ``w * mask`` left
    many of them; the chooser tries both."""
    neg = view.negzero
    signs = np.packbits(neg[(view.bits == 0) | neg])
    return replace(enc, index={**enc.index, ZERO_SIGNS: signs}, meta={**enc.meta, ZERO_SIGNS: True})


def restore_zero_signs(out: Tensor, enc: EncodedTensor) -> Tensor:
    """``out`` (decoded without the signs) with the stored -0.0 signs set back."""
    bits = raw_bits(out)
    zeros = np.flatnonzero(bits == 0)
    signs = unpack_bits(stored_array(enc.index, ZERO_SIGNS, enc), zeros.size)
    bits[zeros[signs]] = bits.dtype.type(1 << (8 * bits.dtype.itemsize - 1))
    return from_raw_bits(bits, enc.dtype, enc.shape, owned=True)  # raw_bits made a copy
