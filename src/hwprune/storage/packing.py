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
from collections.abc import Callable, Container, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import blake3
import numpy as np
import zstandard

from .bits import dtype_name
from .encodings import EncodedTensor
from .errors import StorageError
from .fileformat import DATA_KEY, DOC_KEY, FORMAT, META_KEY, VERSION, ZSTD_DOC_VERSION

__all__ = ["pack", "pack_parts", "tensor_record", "checksum", "canonical_json", "document",
           "compress_document",
           "file_header", "checksum_of_entries", "array_entry", "array_digest",
           "needs_digest", "check_key_free", "hash_of", "checksum_key"]


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
    body = document(tensors, listed, checksum(records, arrays, version, tensors), version)
    parts = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays.values()]
    return [file_header(sum(int(p.size) for p in parts), len(body), version), *parts, body]


def document(tensors_json: str, listed: list, digest: str, version: int = VERSION) -> bytes:
    """The compressed document: ``canonical_json`` of ``{"arrays": listed, KEY: digest,
    "tensors": ...}`` (``KEY``: ``checksum_key(version)``, which sorts between the two), its
    keys in sorted order, with the records' text ``tensors_json`` as it is."""
    text = (f'{{"arrays":{canonical_json(listed)},"{checksum_key(version)}":'
            f'{canonical_json(digest)},"tensors":{tensors_json}}}')
    return compress_document(text.encode(), version)


def compress_document(text: bytes, version: int = VERSION) -> bytes:
    """The document's JSON ``text`` as a ``version`` file stores it: one Zstandard frame with
    its length and checksum from ``ZSTD_DOC_VERSION`` on (smaller than zlib's best level and
    several times as fast on a model's records: docs/storage.md), a zlib stream before."""
    if version >= ZSTD_DOC_VERSION:
        # level 9: smaller than the default level for well under a millisecond on a ResNet's
        # records; a compressor per call, as one is not for two threads at once
        return zstandard.ZstdCompressor(level=9, write_checksum=True).compress(text)
    return zlib.compress(text, 9)


def file_header(size: int, doc_bytes: int, version: int = VERSION) -> bytes:
    """The file's first bytes (the header's length, then the header) before ``size`` bytes of
    arrays and a document of ``doc_bytes``: the safetensors file of two uint8 arrays, as
    safetensors writes it (its header: metadata first, then the arrays by name, offsets in
    that order; padded with spaces to 8 bytes), so that the arrays themselves can follow as
    they are, with no concatenation. One metadata key: safetensors writes a multi-key map in
    no fixed order."""
    header = json.dumps({
        "__metadata__": {META_KEY: canonical_json({"format": FORMAT, "version": version})},
        DATA_KEY: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]},
        DOC_KEY: {"dtype": "U8", "shape": [doc_bytes],
                  "data_offsets": [size, size + doc_bytes]},
    }, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def tensor_record(name: str, enc: EncodedTensor,
                  arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON record of one tensor; its arrays go into ``arrays`` under ``name/array``."""
    keys: dict[str, list[str]] = {"payload": [], "index": []}
    for role, group in (("payload", enc.payload), ("index", enc.index)):
        for arr_name, arr in group.items():
            key = f"{name}/{arr_name}"
            check_key_free(key, arrays)
            arrays[key] = np.ascontiguousarray(arr).reshape(-1)
            keys[role].append(arr_name)
    return {"name": name, "encoding": enc.encoding, "dtype": dtype_name(enc.dtype),
            "shape": list(enc.shape), "meta": enc.meta, **keys}


def check_key_free(key: str, taken: Container[str]) -> None:
    """``StorageError`` where an array's key is taken already (two tensors' names and arrays
    that join to the same key)."""
    if key in taken:
        raise StorageError(f"two tensors' arrays would share the key {key!r}; rename one")


def checksum(tensors: list, arrays: Mapping[str, np.ndarray], version: int,
             tensors_json: str | None = None) -> str:
    """The file's digest over the format, version, tensor records (as ``canonical_json``;
    ``tensors_json``: that text, where the caller has it) and every array (key, dtype, shape,
    bytes; sorted by key), each part length-prefixed so parts cannot shift: BLAKE3 from
    version 7, SHA-256 before (``hash_of``).

    From version 4 an array of more than ``_SMALL_PART`` bytes enters as its length followed
    by the digest of its bytes (32 bytes), not by the bytes themselves: those digests are
    computed in threads (both hashes release the GIL), so a large file is hashed on every
    core, writing and reading.
    """
    if tensors_json is None:
        tensors_json = canonical_json(tensors)
    keys = sorted(arrays)
    if version >= 4:
        digests = _array_digests(arrays, keys, version)
        return _digest_of(tensors_json, version,
                          [array_entry(key, arrays[key], digests.get(key)) for key in keys])
    h = hash_of(version)()
    small = [_text(FORMAT), _text(str(version)), _text(tensors_json)]
    for key in keys:  # versions 2 and 3: every array's bytes
        a = np.ascontiguousarray(arrays[key])
        small.append(_entry_head(key, a))
        if a.nbytes <= _SMALL_PART:
            small.append(a.tobytes())
        else:  # its bytes, read in place
            h.update(b"".join(small))
            small.clear()
            h.update(a.reshape(-1).view(np.uint8))
    h.update(b"".join(small))
    return h.hexdigest()


def hash_of(version: int) -> Callable[[Any], Any]:
    """The hash of a version's checksum (a hashlib-style constructor): BLAKE3 from version 7
    (about four times SHA-256's speed here, as strong), SHA-256 before."""
    return blake3.blake3 if version >= 7 else hashlib.sha256


def checksum_key(version: int) -> str:
    """The document's key that holds the checksum: the name of its hash."""
    return "blake3" if version >= 7 else "sha256"


def checksum_of_entries(tensors_json: str, version: int, entries: Mapping[str, bytes]) -> str:
    """``checksum`` of a version 4+ file from each array's ``array_entry``, by key (in any
    order: they enter sorted by key)."""
    return _digest_of(tensors_json, version, [entries[k] for k in sorted(entries)])


def _digest_of(tensors_json: str, version: int, entries: list[bytes]) -> str:
    """The version 4+ checksum of the arrays' entries in the order of their keys."""
    head = _text(FORMAT) + _text(str(version)) + _text(tensors_json)
    return hash_of(version)(b"".join([head, *entries])).hexdigest()


def array_entry(key: str, a: np.ndarray, digest: bytes | None) -> bytes:
    """What one array adds to a version 4+ checksum: its key, dtype, shape and byte count, then
    its bytes where it has at most ``_SMALL_PART`` of them, else ``digest``, their digest
    (``array_digest``)."""
    a = np.ascontiguousarray(a)
    if not needs_digest(a):
        return _entry_head(key, a) + a.tobytes()
    if digest is None:
        raise StorageError(f"array {key!r}: {a.nbytes} bytes enter the checksum by their "
                           "digest, and none was given")
    return _entry_head(key, a) + digest


def needs_digest(a: np.ndarray) -> bool:
    """Whether an array enters a version 4+ checksum by its digest (else by its bytes)."""
    return a.nbytes > _SMALL_PART


def array_digest(a: np.ndarray, version: int = VERSION) -> bytes:
    """The digest of an array's bytes in a ``version`` file (``hash_of``; it releases the
    GIL: callable in threads)."""
    return hash_of(version)(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).digest()


def _entry_head(key: str, a: np.ndarray) -> bytes:
    """An array's key and layout (dtype, shape) as length-prefixed texts, then its byte count:
    every part length-prefixed, so parts cannot shift."""
    return _text(key) + _text(f"{a.dtype.str}{a.shape}") + int(a.nbytes).to_bytes(8, "little")


def _text(t: str) -> bytes:
    b = t.encode()
    return len(b).to_bytes(8, "little") + b


def _array_digests(arrays: Mapping[str, np.ndarray], keys: list[str],
                   version: int) -> dict[str, bytes]:
    """The digest of each array of more than ``_SMALL_PART`` bytes, by key; the large ones
    in threads."""
    big = [k for k in keys if needs_digest(arrays[k])]

    def digest(key: str) -> bytes:
        return array_digest(arrays[key], version)

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
