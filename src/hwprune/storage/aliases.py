"""Tied tensors: a state-dict entry that is the same view of the same memory as an earlier one
(a language model's output layer tied to its embedding) is stored once.

``save`` writes such an entry as an *alias record*: encoding ``"alias"``, the tensor's dtype
and shape, ``meta = {"of": <the earlier entry's name>}``, no arrays. ``load`` checks that the
earlier entry is a stored tensor of the same dtype and shape, and returns that same tensor
object under both names, as ``torch.load`` returns tied tensors sharing their memory. Alias
records appear from container version 6 on.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .encodings.base import ALIAS, EncodedTensor
from .errors import StorageError

__all__ = ["ALIAS", "ALIAS_VERSION", "find_aliases", "alias_of", "check_alias"]

#: the first container version that may hold alias records
ALIAS_VERSION = 6


def find_aliases(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{name: the first name}`` of every entry that is the same view of the same memory
    (storage, offset, shape, strides, dtype, conjugate and negative bits) as an earlier one."""
    first: dict[tuple, str] = {}
    out = {}
    for name, t in state.items():
        if t.numel() == 0:  # empty tensors may share a null pointer without sharing anything
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), t.dtype, t.is_conj(), t.is_neg())
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def alias_of(t: Tensor, of: str) -> EncodedTensor:
    """The alias record's encoding of ``t``, stored as the entry ``of``: no arrays."""
    return EncodedTensor(ALIAS, t.dtype, tuple(t.shape), {}, {}, {"of": of})


def check_alias(rec: dict, stored: Mapping[str, tuple[str, list]], version: int) -> None:
    """``StorageError`` unless the alias record ``rec`` names an earlier record of ``stored``
    (``{name: (dtype, shape)}`` of the records before it that hold data) of its dtype and
    shape, with no arrays, in a file of a version that has alias records."""
    name, meta = rec["name"], rec["meta"]
    of = meta.get("of")
    if version < ALIAS_VERSION:
        raise StorageError(f"{name[:80]}: an alias record in a version {version} file (alias "
                           f"records appear in version {ALIAS_VERSION})")
    if set(meta) != {"of"} or rec["payload"] or rec["index"] or not isinstance(of, str):
        raise StorageError(f"{name[:80]}: an alias record holds meta {{'of': name}} and no "
                           f"arrays; got meta {str(meta)[:80]}")
    if of not in stored:
        raise StorageError(f"{name[:80]}: alias of {of[:80]!r}, which is not a tensor stored "
                           "before it")
    if stored[of] != (rec["dtype"], rec["shape"]):
        raise StorageError(f"{name[:80]}: alias of {of[:80]!r} with dtype and shape "
                           f"{rec['dtype'][:20]} {str(rec['shape'])[:80]}; the tensor stored "
                           f"there is {stored[of][0][:20]} {str(stored[of][1])[:80]}")
