"""The container: a model's tensors, each in its smallest exact encoding, in one safe file.

``save(obj, path)`` writes a state dict (or an ``nn.Module``'s) and ``load(path)`` gives back the
exact tensors: same names (in order), dtypes, shapes and bits. The file is a safetensors file, so
it holds only arrays and strings: nothing in it is ever unpickled or executed. Any damage (a
flipped byte, a truncation, trailing bytes, a foreign file) raises ``StorageError`` before a
single tensor is returned.

File layout, uncompressed (the default): a safetensors file with two uint8 arrays.

=============  ==========================================================================
bytes          content
=============  ==========================================================================
[0, 8)         ``H``: u64 little-endian, length of the JSON header (safetensors)
[8, 8+H)       the JSON header: the two arrays' entries (dtype U8, shape, offsets) and
               ``"__metadata__"``, whose one key ``"hwprune"`` holds the JSON
               ``{"format":"hwprune.storage","version":2}``; safetensors pads the header with
               spaces to a multiple of 8 bytes
then           ``hwprune.doc``: the document, compact JSON compressed with zlib: ``sha256``
               (see ``_digest``), ``tensors`` (one record per tensor in state-dict order:
               name, encoding, dtype, shape, the encoding's parameters ``meta``, and the
               names of its ``payload`` and ``index`` arrays) and ``arrays`` (``[key, dtype,
               count]`` per array, keys ``"<name>/<array>"``, in the order of the data)
               and ``hwprune.data``: every array's bytes, back to back with no padding
=============  ==========================================================================

(safetensors orders the two arrays; the header's offsets say where each lies.) So
``file size == 8 + H + len(doc) + sum(stored_bytes(t)["total_bytes"])`` over the tensors
saved (with the same hints): ``hwprune.data`` is exactly the payload + index bytes the report
counts, and ``8 + H + len(doc)`` is the container's whole overhead (``file_layout(path)``
reads both numbers). Packing the arrays into one blob and compressing the document keeps that
overhead small; version 1 stored one safetensors entry per array with the document as a JSON
string in the metadata (docs/storage.md, "Header accounting", compares the two).
``load`` reads version 1 files too.

With ``compress="zlib"`` or ``"lzma"`` (stdlib codecs) the whole uncompressed file above is
compressed and wrapped in a fixed header of ``COMPRESSED_HEADER_SIZE`` = 56 bytes (the
wrapper has its own version, 1):

=========  ====  ===================================================================
offset     size  field
=========  ====  ===================================================================
0          8     magic ``b"HWPRUNEZ"`` (never the start of a safetensors file: as a u64
                 header length it would be about 6.5e18)
8          1     wrapper version (1)
9          1     codec: 1 = zlib, 2 = lzma
10         6     reserved, zero
16         8     u64 little-endian: length of the uncompressed safetensors bytes
24         32    SHA-256 of the compressed body
56         ...   the compressed body; ``file size == 56 + len(body)``
=========  ====  ===================================================================

The checksum (``sha256`` in the document) covers the format, version and tensors JSON, and
every array's key, dtype, shape and bytes, so a changed byte in the data or in hwprune's
metadata is caught even where safetensors would still parse the file; the document itself is
guarded by zlib's checksum, and it may inflate to ``MAX_DOC_BYTES`` at most. Writes are
atomic: a temporary file in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from torch import Tensor, nn

from ..files import write_atomic
from .bits import dtype_from_name, dtype_name
from .encodings import EncodedTensor, Hints, choose, decode
from .errors import StorageError

__all__ = ["save", "load", "plan", "FilePlan", "file_layout", "FORMAT", "VERSION",
           "COMPRESSED_HEADER_SIZE"]

FORMAT = "hwprune.storage"
#: the version ``save`` writes; ``load`` also reads version 1 (one safetensors entry per array)
VERSION = 2
READABLE_VERSIONS = (1, 2)
#: version 2's two arrays: the zlib-compressed JSON document, and every array back to back
DOC_KEY, DATA_KEY = "hwprune.doc", "hwprune.data"
#: the most bytes a document may inflate to (a model with 10^4 tensors needs about 2 MB)
MAX_DOC_BYTES = 256 << 20
#: the array dtypes a file may declare (numpy's ``dtype.str``, little-endian)
_ARRAY_DTYPES = {np.dtype(t).str: np.dtype(t) for t in
                 ("|b1", "|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f2", "<f4",
                  "<f8")}
MAGIC = b"HWPRUNEZ"
WRAPPER_VERSION = 1  # the compressed wrapper's own version
_CODECS = {"zlib": 1, "lzma": 2}
_HEADER = struct.Struct("<8sBB6sQ32s")
COMPRESSED_HEADER_SIZE = _HEADER.size  # 56
#: bytes of safetensors' length prefix in front of its JSON header
PREFIX_SIZE = 8
#: the one key of the safetensors metadata that hwprune uses
META_KEY = "hwprune"


def save(obj: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
         compress: str | None = None, hints: Mapping[str, Hints] | None = None) -> int:
    """Write ``obj`` (a module's ``state_dict()`` or a dict of tensors) to ``path``.

    Each tensor takes ``choose(t, hints.get(name))``, its smallest exact encoding.
    ``compress`` (``None``, ``"zlib"``, ``"lzma"``) wraps the file in the compressed layout.
    Returns the number of bytes written.
    """
    if compress is not None and compress not in _CODECS:
        raise StorageError(f"compress must be None, 'zlib' or 'lzma'; got {compress!r}")
    data = plan(obj, hints).data
    if compress is not None:
        data = _wrap(data, compress)
    write_atomic(Path(path), data)
    return len(data)


@dataclass(frozen=True)
class FilePlan:
    """What ``save(obj, path, hints=hints)`` (uncompressed) writes, computed without writing.

    ``encoded``: each tensor's chosen ``EncodedTensor`` by name; ``data``: the file's bytes;
    ``header_bytes`` = 8 + H + the compressed document (everything but the tensors' data);
    ``data_bytes`` = the sum of the tensors' ``total_bytes``; ``size = header_bytes +
    data_bytes = len(data)``.
    """

    encoded: dict[str, EncodedTensor]
    data: bytes
    header_bytes: int
    data_bytes: int

    @property
    def size(self) -> int:
        return len(self.data)


def plan(obj: nn.Module | Mapping[str, Tensor],
         hints: Mapping[str, Hints] | None = None) -> FilePlan:
    """Encode ``obj`` as ``save`` would (same choices, same bytes) and say how the file's
    bytes divide between the container header and the tensors' data."""
    state = _state(obj)
    hints = hints or {}
    records, arrays, encoded = [], {}, {}
    for name, t in state.items():
        encoded[name] = choose(t, hints.get(name))
        records.append(_record(name, encoded[name], arrays))
    doc = {"sha256": _digest(records, arrays, VERSION), "tensors": records,
           "arrays": [[key, a.dtype.str, int(a.size)] for key, a in arrays.items()]}
    blob = np.concatenate([a.view(np.uint8) for a in arrays.values()] or [np.zeros(0, np.uint8)])
    packed = {DOC_KEY: np.frombuffer(zlib.compress(_json(doc).encode(), 9), np.uint8),
              DATA_KEY: blob}
    # one metadata key: safetensors writes a multi-key metadata map in no fixed order, and the
    # same model should give the same bytes
    data = safetensors.numpy.save(
        packed, metadata={META_KEY: _json({"format": FORMAT, "version": VERSION})})
    data_bytes = sum(e.total_bytes for e in encoded.values())
    return FilePlan(encoded, data, len(data) - data_bytes, data_bytes)


def load(path: str | os.PathLike) -> dict[str, Tensor]:
    """The exact tensors of a file ``save`` wrote, by name, in the order they were saved.

    Raises ``StorageError`` for anything else: a damaged, truncated or foreign file. Only
    safetensors and ``json`` read it; nothing is unpickled.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise StorageError(f"cannot read {path}: {err}") from err
    if data[: len(MAGIC)] == MAGIC:
        data = _unwrap(data)
    meta, _, section = _header(data)
    try:
        stored = safetensors.numpy.load(data)
    except Exception as err:  # safetensors raises its own error types for every malformed file
        raise StorageError(f"{path} is not an intact hwprune file: {err}") from err
    if sum(int(a.nbytes) for a in stored.values()) != section:
        raise StorageError(f"{path}: the data section does not match the arrays it declares")
    doc, arrays = (meta, stored) if meta["version"] == 1 else _unpack(stored, path)
    tensors = doc["tensors"]
    if doc.get("sha256") != _digest(tensors, arrays, meta["version"]):
        raise StorageError(f"{path}: checksum mismatch; the file is damaged")
    return _decode_all(tensors, arrays, path)


def _json(obj: Any) -> str:
    """Compact, deterministic JSON (what the checksum is computed over)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)


def file_layout(path: str | os.PathLike) -> dict[str, Any]:
    """How a file's bytes divide: ``{"compressed", "header_bytes", "data_bytes", "size"}``.

    Uncompressed: ``header_bytes = 8 + H + len(doc)`` (version 1: ``8 + H``) and
    ``data_bytes`` = the arrays' bytes (= the sum of the tensors' ``total_bytes``).
    Compressed: ``header_bytes = 56``, ``data_bytes`` = the compressed body. Reads headers
    only; use ``load`` to verify a file.
    """
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] == MAGIC:
        return {"compressed": True, "header_bytes": COMPRESSED_HEADER_SIZE,
                "data_bytes": len(data) - COMPRESSED_HEADER_SIZE, "size": len(data)}
    meta, entries, section = _header(data)
    data_bytes = section if meta["version"] == 1 else _entry_bytes(entries, DATA_KEY)
    return {"compressed": False, "header_bytes": len(data) - data_bytes,
            "data_bytes": data_bytes, "size": len(data)}


# -- writing --------------------------------------------------------------------------------
def _state(obj: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise StorageError(
            f"save needs an nn.Module or a dict of tensors; got {type(obj).__name__}"
        )
    for name, t in obj.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise StorageError(
                f"save stores str -> torch.Tensor entries only; {name!r} is a {type(t).__name__}"
            )
    return dict(obj)


def _record(name: str, enc: EncodedTensor, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
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


def _digest(tensors: list, arrays: Mapping[str, np.ndarray], version: int) -> str:
    """SHA-256 over the format, version, tensor records (as ``_json``) and every array (key,
    dtype, shape, bytes; sorted by key), each part length-prefixed so parts cannot shift."""
    h = hashlib.sha256()

    def part(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for text in (FORMAT, str(version), _json(tensors)):
        part(text.encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        part(key.encode())
        part(f"{a.dtype.str}{a.shape}".encode())
        part(a.tobytes())
    return h.hexdigest()


def _wrap(data: bytes, codec: str) -> bytes:
    body = zlib.compress(data, 9) if codec == "zlib" else lzma.compress(data)
    head = _HEADER.pack(MAGIC, WRAPPER_VERSION, _CODECS[codec], bytes(6), len(data),
                        hashlib.sha256(body).digest())
    return head + body


# -- reading --------------------------------------------------------------------------------
def _unwrap(data: bytes) -> bytes:
    if len(data) < COMPRESSED_HEADER_SIZE:
        raise StorageError("compressed hwprune file is truncated (shorter than its header)")
    magic, version, codec, reserved, size, digest = _HEADER.unpack_from(data)
    body = data[COMPRESSED_HEADER_SIZE:]
    if version != WRAPPER_VERSION or reserved != bytes(6) or codec not in _CODECS.values():
        raise StorageError(f"unsupported compressed container (version {version}, codec {codec})")
    if hashlib.sha256(body).digest() != digest:
        raise StorageError("checksum mismatch in the compressed body; the file is damaged")
    if size >= sys.maxsize:  # the length field is outside the checksum: a flipped bit shows here
        raise StorageError(f"recorded uncompressed length {size} is impossible; the file is "
                           "damaged")
    try:
        if codec == _CODECS["zlib"]:
            d = zlib.decompressobj()
            out = d.decompress(body, size + 1)
            complete = d.eof and not d.unused_data
        else:
            d = lzma.LZMADecompressor()
            out = d.decompress(body, size + 1)
            complete = d.eof and not d.unused_data
    except (zlib.error, lzma.LZMAError) as err:
        raise StorageError(f"cannot decompress the file: {err}") from err
    if len(out) != size or not complete:
        raise StorageError("the compressed body does not decompress to its recorded length")
    return out


def _header(data: bytes) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The safetensors header, checked: hwprune's metadata (version 1: the whole document;
    version 2: format and version only), the array entries, and the data section's size."""
    if len(data) < PREFIX_SIZE:
        raise StorageError("not an hwprune file: shorter than the 8-byte header length")
    (length,) = struct.unpack_from("<Q", data)
    if length > len(data) - PREFIX_SIZE:
        raise StorageError("not an intact hwprune file: the header runs past the end (truncated?)")
    try:
        header = json.loads(data[PREFIX_SIZE: PREFIX_SIZE + length])
        meta = json.loads(header.pop("__metadata__")[META_KEY])
        fmt, version = meta.get("format"), meta.get("version")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise StorageError(f"not an hwprune file: unreadable header ({err})") from err
    if fmt != FORMAT:
        raise StorageError(f"not an hwprune file (format {fmt!r})")
    if version not in READABLE_VERSIONS:
        raise StorageError(
            f"hwprune container version {version!r} is not supported (this hwprune reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade hwprune"
        )
    if version == 1 and not isinstance(meta.get("tensors"), list):
        raise StorageError("not an intact hwprune file: the tensors record is not a list")
    return meta, header, len(data) - PREFIX_SIZE - length


def _entry_bytes(entries: dict[str, Any], key: str) -> int:
    """The byte size safetensors' header declares for the array ``key``."""
    try:
        start, end = entries[key]["data_offsets"]
        return int(end) - int(start)
    except (KeyError, TypeError, ValueError) as err:
        raise StorageError(f"not an intact hwprune file: no valid entry {key!r}") from err


def _unpack(stored: dict[str, np.ndarray], path: Any) -> tuple[dict[str, Any], dict]:
    """Version 2: the document (inflated, at most ``MAX_DOC_BYTES``) and the arrays it
    declares, cut from the data blob in order; the blob must be used exactly."""
    if set(stored) != {DOC_KEY, DATA_KEY}:
        raise StorageError(f"{path}: a version 2 file holds the arrays {DOC_KEY!r} and "
                           f"{DATA_KEY!r} only; found {sorted(stored)}")
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stored[DOC_KEY].tobytes(), MAX_DOC_BYTES + 1)
        complete = inflate.eof and not inflate.unused_data and len(raw) <= MAX_DOC_BYTES
        doc = json.loads(raw) if complete else None
    except (zlib.error, ValueError) as err:
        raise StorageError(f"{path}: unreadable document ({err}); the file is damaged") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise StorageError(f"{path}: the document is incomplete or not a tensor list")
    blob, arrays, offset = stored[DATA_KEY], {}, 0
    try:
        for key, dtype, count in doc["arrays"]:
            dt = _ARRAY_DTYPES[dtype]
            end = offset + dt.itemsize * int(count)
            if count < 0 or end > blob.size:
                raise StorageError(f"{path}: array {key!r} runs past the data section")
            arrays[key] = np.frombuffer(blob, dt, int(count), offset).copy()
            offset = end
    except (KeyError, TypeError, ValueError) as err:
        raise StorageError(f"{path}: malformed array list ({type(err).__name__}: {err})") \
            from err
    if offset != blob.size:
        raise StorageError(f"{path}: the data section is longer than the arrays it declares")
    return doc, arrays


def _decode_all(tensors: list, arrays: dict[str, np.ndarray], path: Any) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    try:
        for rec in tensors:
            name = rec["name"]
            groups = {}
            for role in ("payload", "index"):
                groups[role] = {a: arrays[f"{name}/{a}"] for a in rec[role]}
                used.update(f"{name}/{a}" for a in rec[role])
            shape = tuple(int(s) for s in rec["shape"])
            enc = EncodedTensor(rec["encoding"], dtype_from_name(rec["dtype"]), shape,
                                groups["payload"], groups["index"], dict(rec["meta"]))
            out[name] = decode(enc)
            if out[name].numel() != math.prod(shape):
                raise StorageError(f"{name}: decoded the wrong number of elements")
    except StorageError as err:
        raise StorageError(f"{path}: {err}") from err
    except Exception as err:  # a record that passed the checksum but is malformed
        raise StorageError(f"{path}: malformed tensor record ({type(err).__name__}: {err})") \
            from err
    if used != set(arrays):
        raise StorageError(f"{path}: arrays and tensor records do not match")
    return out
