"""Writing the container: each tensor's JSON record, the checksum, and the file's bytes.

``container.plan``/``save`` write through these functions (``container``'s docstring and
docs/storage.md describe the layout); ``container.load`` checks a file's checksum with
``checksum``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .bits import dtype_name
from .encodings import EncodedTensor
from .errors import StorageError
from .fileformat import DATA_KEY, DOC_KEY, FORMAT, META_KEY, VERSION

__all__ = ["pack", "pack_parts", "tensor_record", "checksum", "canonical_json"]


def pack(records: list[dict[str, Any]], arrays: Mapping[str, np.ndarray],
         version: int = VERSION) -> bytes:
    """The file of tensor ``records`` (as ``plan`` makes them) and their ``arrays`` (1-D, by
    key ``"<name>/<array>"``, in the order of the data), checksummed. ``version`` 2 writes
    the same layout as an older hwprune did (for records of the encodings it knew), 3 the
    same with the checksum over every array's bytes."""
    return b"".join(pack_parts(records, arrays, version))


def pack_parts(records: list[dict[str, Any]], arrays: Mapping[str, np.ndarray],
               version: int = VERSION) -> list:
    """``pack``'s file as the buffers that, joined, are its bytes (the arrays' own memory,
    not copies): ``save`` writes them one after the other."""
    if version not in range(2, VERSION + 1):
        raise StorageError(f"pack writes versions 2 to {VERSION}; got {version!r}")
    tensors = canonical_json(records)  # once, for the checksum and the document
    listed = [[key, a.dtype.str, int(a.size)] for key, a in arrays.items()]
    # canonical_json of the document, its keys in sorted order, with the records' text as it is
    digest = canonical_json(checksum(records, arrays, version, tensors))
    text = f'{{"arrays":{canonical_json(listed)},"sha256":{digest},"tensors":{tensors}}}'
    body = zlib.compress(text.encode(), 9)
    parts = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays.values()]
    size = sum(int(p.size) for p in parts)
    # the safetensors file of two uint8 arrays, as safetensors writes it (its header: metadata
    # first, then the arrays by name, offsets in that order; padded with spaces to 8 bytes),
    # its parts the arrays themselves: no concatenation, no serialization.
    # One metadata key: safetensors writes a multi-key map in no fixed order.
    header = json.dumps({
        "__metadata__": {META_KEY: canonical_json({"format": FORMAT, "version": version})},
        DATA_KEY: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]},
        DOC_KEY: {"dtype": "U8", "shape": [len(body)], "data_offsets": [size, size + len(body)]},
    }, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return [len(header).to_bytes(8, "little") + header, *parts, body]


def tensor_record(name: str, enc: EncodedTensor,
                  arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON record of one tensor; its arrays go into ``arrays`` under ``name/array``."""
    keys: dict[str, list[str]] = {"payload": [], "index": []}
    for role, group in (("payload", enc.payload), ("index", enc.index)):
        for arr_name, arr in group.items():
            key = f"{name}/{arr_name}"
            if key in arrays:
                raise StorageError(f"two tensors' arrays would share the key {key!r}; rename one")
            arrays[key] = np.ascontiguousarray(arr).reshape(-1)
            keys[role].append(arr_name)
    return {"name": name, "encoding": enc.encoding, "dtype": dtype_name(enc.dtype),
            "shape": list(enc.shape), "meta": enc.meta, **keys}


def checksum(tensors: list, arrays: Mapping[str, np.ndarray], version: int,
             tensors_json: str | None = None) -> str:
    """SHA-256 over the format, version, tensor records (as ``canonical_json``;
    ``tensors_json``: that text, where the caller has it) and every array (key, dtype, shape,
    bytes; sorted by key), each part length-prefixed so parts cannot shift.

    From version 4 an array of more than ``_SMALL_PART`` bytes enters as its length followed
    by the SHA-256 of its bytes (32 bytes), not by the bytes themselves: those digests are
    computed in threads (hashlib releases the GIL), so a large file is hashed on every core,
    writing and reading.
    """
    h = hashlib.sha256()
    small: list[bytes] = []  # short parts hashed together: the same digest as one by one

    def text(t: str) -> None:
        b = t.encode()
        small.extend((len(b).to_bytes(8, "little"), b))

    if tensors_json is None:
        tensors_json = canonical_json(tensors)
    for item in (FORMAT, str(version), tensors_json):
        text(item)
    keys = sorted(arrays)
    digests = _array_digests(arrays, keys) if version >= 4 else {}
    for key in keys:
        a = np.ascontiguousarray(arrays[key])
        name, layout = key.encode(), f"{a.dtype.str}{a.shape}".encode()
        # text(key), text(layout) and the byte count, written out: this runs once per array
        small += (len(name).to_bytes(8, "little"), name, len(layout).to_bytes(8, "little"),
                  layout, int(a.nbytes).to_bytes(8, "little"))
        if a.nbytes <= _SMALL_PART:
            small.append(a.tobytes())
        elif key in digests:
            small.append(digests[key])
        else:  # its bytes, read in place
            h.update(b"".join(small))
            small.clear()
            h.update(a.reshape(-1).view(np.uint8))
    h.update(b"".join(small))
    return h.hexdigest()


def _array_digests(arrays: Mapping[str, np.ndarray], keys: list[str]) -> dict[str, bytes]:
    """The SHA-256 of each array of more than ``_SMALL_PART`` bytes, by key; the large ones
    in threads."""
    big = [k for k in keys if arrays[k].nbytes > _SMALL_PART]

    def digest(key: str) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(arrays[key]).reshape(-1).view(np.uint8)
                              ).digest()

    if sum(arrays[k].nbytes for k in big) < _THREADED_HASH:
        return {k: digest(k) for k in big}
    # the largest first, so that no thread is left with a big one at the end
    order = sorted(big, key=lambda k: -arrays[k].nbytes)
    with ThreadPoolExecutor(max_workers=min(len(order), os.cpu_count() or 1)) as pool:
        return dict(zip(order, pool.map(digest, order), strict=True))


#: parts of the checksum up to this many bytes are copied and hashed with their neighbours
_SMALL_PART = 1 << 12
#: arrays of at least this many bytes in all are hashed in threads
_THREADED_HASH = 1 << 24


def canonical_json(obj: Any) -> str:
    """Compact, deterministic JSON (what the checksum is computed over)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)
