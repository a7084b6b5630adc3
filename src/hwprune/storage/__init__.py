"""Storage: every tensor in its smallest exact encoding, in a safe container (no pickle).

``save(model_or_state_dict, path)`` / ``load(path)`` round-trip the exact tensors;
``stored_bytes(t, hints)`` is the per-tensor byte count (payload + index) the report prints,
and ``choose(t, hints)`` the encoding behind it; ``plan(obj, hints)`` is the whole file
``save`` would write (each tensor's encoding, the header and data bytes) without writing
it. See ``encodings`` for the formats and their byte formulas, ``container`` for the file
layout, and docs/storage.md.
"""

from .container import FilePlan, file_layout, load, plan, save
from .encodings import (
    EncodedTensor,
    choose,
    decode,
    encode,
    encodings_for,
    stored_bytes,
    summarize,
)
from .errors import StorageError

__all__ = [
    "save",
    "load",
    "choose",
    "stored_bytes",
    "StorageError",
    "EncodedTensor",
    "encode",
    "decode",
    "encodings_for",
    "file_layout",
    "plan",
    "FilePlan",
    "summarize",
]
