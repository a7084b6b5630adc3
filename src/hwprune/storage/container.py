"""The container: a model's tensors, each in its smallest exact encoding, in one safe file.

``save(obj, path)`` writes a state dict (or an ``nn.Module``'s) and ``load(path)`` gives back the
exact tensors: same names (in order), dtypes, shapes and bits. The file is a safetensors file, so
it holds only arrays and strings: nothing in it is ever unpickled or executed. Any damage (a
flipped byte, a truncation, trailing bytes, a foreign file) raises ``StorageError`` before a
single tensor is returned.

File layout, uncompressed (the default): a plain safetensors file.

=============  ==========================================================================
bytes          content
=============  ==========================================================================
[0, 8)         ``H``: u64 little-endian, length of the JSON header (safetensors)
[8, 8+H)       the JSON header: for every array its dtype (U8/U16/U32/U64), shape and
               offsets, and ``"__metadata__"`` (string -> string) with one key, ``"hwprune"``,
               whose value is a JSON document: ``format`` = ``"hwprune.storage"``,
               ``version`` = 1, ``sha256`` (hex digest, see ``_digest``) and ``tensors``, a list
               with one record per tensor in state-dict order (name, encoding, dtype, shape,
               the encoding's parameters ``meta``, and the names of its ``payload`` and
               ``index`` arrays, stored under the keys ``"<name>/<array>"``); safetensors pads
               the header with spaces to a multiple of 8 bytes
[8+H, end)     the arrays' bytes, back to back with no padding
=============  ==========================================================================

So ``file size == 8 + H + sum(stored_bytes(t)["total_bytes"])`` over the tensors saved (with
the same hints): the data section is exactly the payload + index bytes the report counts, and
``8 + H`` is the container's whole overhead (``file_layout(path)`` reads both numbers).

With ``compress="zlib"`` or ``"lzma"`` (stdlib codecs) the whole uncompressed file above is
compressed and wrapped in a fixed header of ``COMPRESSED_HEADER_SIZE`` = 56 bytes:

=========  ====  ===================================================================
offset     size  field
=========  ====  ===================================================================
0          8     magic ``b"HWPRUNEZ"`` (never the start of a safetensors file: as a u64
                 header length it would be about 6.5e18)
8          1     container version (1)
9          1     codec: 1 = zlib, 2 = lzma
10         6     reserved, zero
16         8     u64 little-endian: length of the uncompressed safetensors bytes
24         32    SHA-256 of the compressed body
56         ...   the compressed body; ``file size == 56 + len(body)``
=========  ====  ===================================================================

The checksum (``sha256`` in the metadata) covers the format, version and tensors JSON, and every
array's key, dtype, shape and bytes, so a changed byte in the data or in hwprune's metadata is
caught even where safetensors would still parse the file. Writes are atomic: a temporary file
in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from torch import Tensor, nn

from ._bits import dtype_from_name, dtype_name
from .encodings import EncodedTensor, Hints, choose, decode
from .errors import StorageError

__all__ = ["save", "load", "plan", "FilePlan", "file_layout", "FORMAT", "VERSION",
           "COMPRESSED_HEADER_SIZE"]

FORMAT = "hwprune.storage"
VERSION = 1
MAGIC = b"HWPRUNEZ"
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
    _write_atomic(Path(path), data)
    return len(data)


@dataclass(frozen=True)
class FilePlan:
    """What ``save(obj, path, hints=hints)`` (uncompressed) writes, computed without writing.

    ``encoded``: each tensor's chosen ``EncodedTensor`` by name; ``data``: the file's bytes;
    ``header_bytes`` = 8 + H (the length prefix and the JSON header, padding included);
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
    doc = {"format": FORMAT, "version": VERSION, "sha256": _digest(records, arrays),
           "tensors": records}
    # one metadata key: safetensors writes a multi-key metadata map in no fixed order, and the
    # same model should give the same bytes
    data = safetensors.numpy.save(arrays, metadata={META_KEY: _json(doc)})
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
    metadata, data_bytes = _header(data)
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as err:  # safetensors raises its own error types for every malformed file
        raise StorageError(f"{path} is not an intact hwprune file: {err}") from err
    if sum(int(a.nbytes) for a in arrays.values()) != data_bytes:
        raise StorageError(f"{path}: the data section does not match the arrays it declares")
    tensors = metadata["tensors"]
    if metadata.get("sha256") != _digest(tensors, arrays):
        raise StorageError(f"{path}: checksum mismatch; the file is damaged")
    return _decode_all(tensors, arrays, path)


def _json(obj: Any) -> str:
    """Compact, deterministic JSON (what the checksum is computed over)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)


def file_layout(path: str | os.PathLike) -> dict[str, Any]:
    """How a file's bytes divide: ``{"compressed", "header_bytes", "data_bytes", "size"}``.

    Uncompressed: ``header_bytes = 8 + H`` and ``data_bytes`` = the arrays' bytes (= the sum of
    the tensors' ``total_bytes``). Compressed: ``header_bytes = 56``, ``data_bytes`` = the
    compressed body. Reads headers only; use ``load`` to verify a file.
    """
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] == MAGIC:
        return {"compressed": True, "header_bytes": COMPRESSED_HEADER_SIZE,
                "data_bytes": len(data) - COMPRESSED_HEADER_SIZE, "size": len(data)}
    _, data_bytes = _header(data)
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


def _digest(tensors: list, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the format, version, tensor records (as ``_json``) and every array (key,
    dtype, shape, bytes; sorted by key), each part length-prefixed so parts cannot shift."""
    h = hashlib.sha256()

    def part(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for text in (FORMAT, str(VERSION), _json(tensors)):
        part(text.encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        part(key.encode())
        part(f"{a.dtype.str}{a.shape}".encode())
        part(a.tobytes())
    return h.hexdigest()


def _wrap(data: bytes, codec: str) -> bytes:
    body = zlib.compress(data, 9) if codec == "zlib" else lzma.compress(data)
    head = _HEADER.pack(MAGIC, VERSION, _CODECS[codec], bytes(6), len(data),
                        hashlib.sha256(body).digest())
    return head + body


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- reading --------------------------------------------------------------------------------
def _unwrap(data: bytes) -> bytes:
    if len(data) < COMPRESSED_HEADER_SIZE:
        raise StorageError("compressed hwprune file is truncated (shorter than its header)")
    magic, version, codec, reserved, size, digest = _HEADER.unpack_from(data)
    body = data[COMPRESSED_HEADER_SIZE:]
    if version != VERSION or reserved != bytes(6) or codec not in _CODECS.values():
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


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """hwprune's metadata from the safetensors header, checked; and the data section's size."""
    if len(data) < PREFIX_SIZE:
        raise StorageError("not an hwprune file: shorter than the 8-byte header length")
    (length,) = struct.unpack_from("<Q", data)
    if length > len(data) - PREFIX_SIZE:
        raise StorageError("not an intact hwprune file: the header runs past the end (truncated?)")
    try:
        header = json.loads(data[PREFIX_SIZE: PREFIX_SIZE + length])
        meta = json.loads(header["__metadata__"][META_KEY])
        fmt, version, tensors = meta.get("format"), meta.get("version"), meta.get("tensors")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise StorageError(f"not an hwprune file: unreadable header ({err})") from err
    if fmt != FORMAT:
        raise StorageError(f"not an hwprune file (format {fmt!r})")
    if version != VERSION:
        raise StorageError(
            f"hwprune container version {version!r} is not supported (this is version "
            f"{VERSION}); upgrade hwprune"
        )
    if not isinstance(tensors, list):
        raise StorageError("not an intact hwprune file: the tensors record is not a list")
    return meta, len(data) - PREFIX_SIZE - length


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
