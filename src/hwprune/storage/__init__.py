"""Storage: every tensor in its smallest exact encoding, in a safe container (no pickle).

``save(model_or_state_dict, path)`` / ``load(path)`` round-trip the exact tensors;
``stored_bytes(t, hints)`` is the per-tensor byte count (payload + index) the report prints,
and ``choose(t, hints)`` the encoding behind it. See ``encodings`` for the formats and their
byte formulas, ``container`` for the file layout.
"""

from .container import file_layout, load, save
from .encodings import EncodedTensor, choose, decode, encode, encodings_for, stored_bytes
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
]
