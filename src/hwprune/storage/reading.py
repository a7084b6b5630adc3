"""Reading a container without trusting it: a regular file only, never more bytes than it
declares, and every size checked against a bound before the memory for it is taken.

``container.load`` reads through these functions; each raises ``StorageError`` for anything
but an intact file. The bounds (docs/storage.md, "Memory bound"):

* the file is a regular file (``/dev/zero``, a FIFO, a socket or a folder are refused before a
  byte is read, and a FIFO is opened without blocking) of at most ``max_bytes``; exactly the size
  ``fstat`` gives is read.
* the compressed wrapper's uncompressed length (outside its checksum) must be at most
  ``max_bytes`` and equal the size the inner safetensors header declares, which is read from the
  first inflated bytes; inflation runs in bounded chunks and stops at the first byte past it.
* JSON (the safetensors header, the metadata, the document) is parsed strictly: no NaN,
  Infinity or out-of-range floats, at most ``MAX_JSON_DEPTH`` levels, and at most one value per
  ``_BYTES_PER_VALUE`` bytes of text, so parsing takes memory in proportion to the text.
* the document inflates to at most ``DOC_BASE_BYTES`` + the data section's size
  (``MAX_DOC_BYTES`` and ``max_bytes`` at most); the arrays it lists must use the data section
  exactly.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .aliases import ALIAS, check_alias
from .bits import dtype_from_name, element_size
from .encodings.valuecoding import decode_frame
from .errors import StorageError
from .fileformat import (
    ARRAY_DTYPES,
    CODECS,
    COMPRESSED_HEADER,
    COMPRESSED_HEADER_SIZE,
    DATA_KEY,
    DOC_BASE_BYTES,
    DOC_KEY,
    FORMAT,
    MAX_DIMS,
    MAX_DOC_BYTES,
    MAX_JSON_DEPTH,
    META_KEY,
    PREFIX_SIZE,
    READABLE_VERSIONS,
    WRAPPER_VERSION,
    ZSTD_DOC_VERSION,
)

__all__ = ["check_max_bytes", "read_regular", "parse_json", "unwrap", "Header", "parse_header",
           "cut_arrays", "unpack", "check_records"]

#: bytes inflated per step
_CHUNK = 1 << 20
#: bytes read per system call (Linux reads at most 2^31 - 4096 at once)
_MAX_READ = 1 << 30
#: JSON text may hold at most one value per this many bytes (a real document holds about one
#: per 8): a parsed value costs some 60 bytes, so text dense with values (``[],[],...``) would
#: take 20 times its size in memory
_BYTES_PER_VALUE = 4
#: ...plus this many values, for short texts
_SPARE_VALUES = 1024


def check_max_bytes(max_bytes: Any) -> int:
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise StorageError(f"max_bytes must be a positive int; got {max_bytes!r}")
    return max_bytes


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``: refused if it is anything else or larger than
    ``max_bytes``; never more than the size ``fstat`` gives is read. (Messages do not name the
    path: the caller does.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise StorageError(f"cannot read it: {err}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError("not a regular file (a device, FIFO, socket or folder); "
                               "hwprune files are regular files")
        if info.st_size > max_bytes:
            raise StorageError(f"the file has {info.st_size} bytes, more than max_bytes="
                               f"{max_bytes}")
        parts, left = [], info.st_size
        while left:  # one read where the system allows (no joining copy)
            piece = os.read(fd, min(left, _MAX_READ))
            if not piece:
                break  # the file shrank while being read: the check below refuses it
            parts.append(piece)
            left -= len(piece)
    except OSError as err:
        raise StorageError(f"cannot read it: {err}") from err
    finally:
        os.close(fd)
    if left:
        raise StorageError("the file changed while it was read")
    return parts[0] if len(parts) == 1 else b"".join(parts)


# -- JSON ------------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def parse_json(raw: bytes | str, what: str) -> Any:
    """``raw`` parsed as strict JSON (``StorageError`` naming ``what`` if it is not): finite
    numbers only, at most ``MAX_JSON_DEPTH`` levels, in memory proportional to its size."""
    sep = (b"[", b"{", b",") if isinstance(raw, bytes) else ("[", "{", ",")
    values = sum(raw.count(s) for s in sep) + 1
    if values > len(raw) // _BYTES_PER_VALUE + _SPARE_VALUES:
        raise StorageError(f"{what}: {values} JSON values in {len(raw)} bytes; a hwprune file "
                           "holds far fewer (the file is damaged or forged)")
    try:
        obj = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError as err:
        raise StorageError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN, 1e400, huge ints
        raise StorageError(f"{what}: unreadable JSON ({err})") from err
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise StorageError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return obj


# -- the safetensors header ------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    """A checked safetensors header: hwprune's metadata (version 1: the whole document;
    version 2: format and version only), the array entries, and the JSON's length ``H``."""

    meta: dict[str, Any]
    entries: dict[str, Any]
    length: int

    @property
    def version(self) -> int:
        return self.meta["version"]

    @property
    def data_end(self) -> int:
        """Where the last array ends, counted from the start of the data section."""
        return max((e["data_offsets"][1] for e in self.entries.values()), default=0)


def parse_header(data: bytes) -> Header:
    """The header at the start of ``data`` (which must hold at least ``8 + H`` bytes)."""
    if len(data) < PREFIX_SIZE:
        raise StorageError("not an hwprune file: shorter than the 8-byte header length")
    (length,) = struct.unpack_from("<Q", data)
    if length > len(data) - PREFIX_SIZE:
        raise StorageError("not an intact hwprune file: the header runs past the end (truncated?)")
    raw = bytes(data[PREFIX_SIZE: PREFIX_SIZE + length])
    # safetensors pads the JSON with spaces alone: a padding byte turned into other whitespace
    # (a flip the checksum, which does not cover the header, cannot see) would parse the same
    if not raw.rstrip(b" ").endswith(b"}"):
        raise StorageError("not an intact hwprune file: the header's padding is not spaces")
    entries = parse_json(raw, "the safetensors header")
    metadata = entries.pop("__metadata__", None) if isinstance(entries, dict) else None
    text = metadata.get(META_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise StorageError(f"not an hwprune file: the header has no {META_KEY!r} metadata")
    meta = parse_json(text, "hwprune's metadata")
    if not isinstance(meta, dict):
        raise StorageError("not an hwprune file: its metadata is not a JSON object")
    fmt, version = meta.get("format"), meta.get("version")
    if fmt != FORMAT:
        raise StorageError(f"not an hwprune file (format {fmt!r})")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise StorageError(
            f"hwprune container version {version!r} is not supported (this hwprune reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade hwprune"
        )
    if version == 1 and not isinstance(meta.get("tensors"), list):
        raise StorageError("not an intact hwprune file: the tensors record is not a list")
    if version >= 2 and set(entries) != {DOC_KEY, DATA_KEY}:
        raise StorageError(f"a version {version} file holds the arrays {DOC_KEY!r} and "
                           f"{DATA_KEY!r} only; found {sorted(entries)[:8]}")
    for key, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise StorageError(f"not an intact hwprune file: array {key[:80]!r} has no valid "
                               "data offsets")
    return Header(meta, entries, length)


def cut_arrays(data: bytes, header: Header) -> dict[str, np.ndarray]:
    """The arrays of a version 2 (or later) file (two uint8 arrays) as read-only views of ``data``,
    without the copy safetensors' reader makes, checked as it checks them: dtype ``U8``, a
    one-dimensional shape of the size its offsets give, and the arrays back to back from the
    start of the data section to its end."""
    start = PREFIX_SIZE + header.length
    out, at = {}, 0
    for key, entry in sorted(header.entries.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        shape = entry.get("shape")
        if not (entry.get("dtype") == "U8" and isinstance(shape, list) and len(shape) == 1
                and isinstance(shape[0], int) and not isinstance(shape[0], bool)
                and shape[0] == end - begin and begin == at):
            raise StorageError(f"not an intact hwprune file: array {key[:80]!r} "
                               f"({str(entry)[:80]}) is not {end - begin} uint8 from offset {at}")
        out[key] = np.frombuffer(data, np.uint8, end - begin, start + begin)
        at = end
    if at != len(data) - start:
        raise StorageError("the data section does not match the arrays it declares")
    return out


# -- the compressed wrapper ------------------------------------------------------------------
class _Inflater:
    """A zlib or lzma stream, inflated at most a given number of bytes at a time."""

    def __init__(self, body: bytes, codec: int):
        self._zlib = codec == CODECS["zlib"]
        self._d = zlib.decompressobj() if self._zlib else lzma.LZMADecompressor()
        self._input = body

    def read(self, n: int) -> bytes:
        """Up to ``n`` more bytes; fewer only where the stream ends."""
        out = []
        while n > 0 and not self._d.eof:
            before = len(self._input)
            piece = self._d.decompress(self._input, min(n, _CHUNK))
            self._input = self._d.unconsumed_tail if self._zlib else b""
            if piece:
                out.append(piece)
                n -= len(piece)
            elif (len(self._input) == before) if self._zlib else self._d.needs_input:
                break  # no input left: the stream is truncated
        return b"".join(out)

    def complete(self) -> bool:
        """Whether the stream ended exactly, with nothing after it."""
        return self._d.eof and not self._d.unused_data


def unwrap(data: bytes, max_bytes: int) -> bytes:
    """The safetensors bytes inside a compressed wrapper, inflated only as far as its recorded
    length, which must be at most ``max_bytes`` and what the inner header declares."""
    if len(data) < COMPRESSED_HEADER_SIZE:
        raise StorageError("compressed hwprune file is truncated (shorter than its header)")
    _, version, codec, reserved, size, digest = COMPRESSED_HEADER.unpack_from(data)
    body = data[COMPRESSED_HEADER_SIZE:]
    if version != WRAPPER_VERSION or reserved != bytes(6) or codec not in CODECS.values():
        raise StorageError(f"unsupported compressed container (version {version}, codec {codec})")
    if hashlib.sha256(body).digest() != digest:
        raise StorageError("checksum mismatch in the compressed body; the file is damaged")
    # the length field is outside the checksum: it is trusted no further than max_bytes and
    # the inner header
    if size > max_bytes:
        raise StorageError(f"the compressed file records {size} uncompressed bytes, more than "
                           f"max_bytes={max_bytes}")
    wrong = "the compressed body does not decompress to its recorded length"
    inflater = _Inflater(body, codec)
    try:
        head = inflater.read(PREFIX_SIZE)
        if len(head) < PREFIX_SIZE or PREFIX_SIZE + struct.unpack("<Q", head)[0] > size:
            raise StorageError(wrong)
        head += inflater.read(PREFIX_SIZE + struct.unpack("<Q", head)[0] - len(head))
        header = parse_header(head)
        if PREFIX_SIZE + header.length + header.data_end != size:
            raise StorageError(f"{wrong}: it records {size} bytes, its header declares "
                               f"{PREFIX_SIZE + header.length + header.data_end}")
        parts, left = [head], size - len(head)
        while left:
            piece = inflater.read(min(left, _CHUNK))
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
        if left or inflater.read(1) or not inflater.complete():
            raise StorageError(wrong)
    except (zlib.error, lzma.LZMAError) as err:
        raise StorageError(f"cannot decompress the file: {err}") from err
    return b"".join(parts)


# -- the document of version 2 and later ------------------------------------------------------
def _zlib_document(stored: np.ndarray, limit: int, data_bytes: int) -> bytes:
    """Versions 2 to 7: the document's zlib stream, inflated to at most ``limit`` bytes."""
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stored.tobytes(), limit + 1)
    except zlib.error as err:
        raise StorageError(f"unreadable document ({err}); the file is damaged") from err
    if len(raw) > limit:
        raise StorageError(f"the document inflates past {limit} bytes, more than a data "
                           f"section of {data_bytes} bytes can need; the file is forged")
    if not inflate.eof or inflate.unused_data:
        raise StorageError("the document is incomplete; the file is damaged")
    return raw


def unpack(stored: dict[str, np.ndarray], max_bytes: int,
           version: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Version 2 and later: the document (decompressed to at most ``DOC_BASE_BYTES`` + the
    data section, and ``MAX_DOC_BYTES`` and ``max_bytes`` at most) and the arrays it declares,
    cut from the data blob in order; the blob must be used exactly."""
    blob = stored[DATA_KEY]
    limit = min(MAX_DOC_BYTES, max_bytes, DOC_BASE_BYTES + blob.size)
    if version >= ZSTD_DOC_VERSION:  # its declared length checked before it is decoded
        raw = decode_frame(stored[DOC_KEY], limit, "the document")
    else:
        raw = _zlib_document(stored[DOC_KEY], limit, blob.size)
    doc = parse_json(raw, "the document")
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list) \
            or not isinstance(doc.get("arrays"), list):
        raise StorageError("the document is incomplete or not a tensor list")
    arrays, offset = {}, 0
    for entry in doc["arrays"]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and entry[1] in ARRAY_DTYPES
                and isinstance(entry[2], int) and not isinstance(entry[2], bool)
                and entry[2] >= 0):
            raise StorageError(f"malformed array list entry {str(entry)[:80]}")
        key, dt, count = entry[0], ARRAY_DTYPES[entry[1]], entry[2]
        end = offset + dt.itemsize * count
        if end > blob.size:
            raise StorageError(f"array {key[:80]!r} runs past the data section")
        if key in arrays:
            raise StorageError(f"array {key[:80]!r} is listed twice")
        # a read-only view of the blob: every decoder copies what it keeps (``from_raw_bits``)
        arrays[key] = np.frombuffer(blob, dt, count, offset)
        offset = end
    if offset != blob.size:
        raise StorageError("the data section is longer than the arrays it declares")
    return doc, arrays


def check_records(tensors: list, max_bytes: int, version: int) -> None:
    """Every tensor record well formed, names distinct, shapes lists of non-negative ints, an
    alias record naming a stored tensor before it (``aliases.check_alias``), and the decoded
    tensors together at most ``max_bytes`` (an alias shares its tensor's memory): checked
    before any is decoded (each encoding then checks its arrays against the shape before it
    allocates)."""
    total, names = 0, set()
    stored: dict[str, tuple[str, list]] = {}  # the records that hold data, for the aliases
    for rec in tensors:
        if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str)
                                              for k in ("name", "encoding", "dtype"))
                and isinstance(rec.get("meta"), dict)
                and all(isinstance(rec.get(r), list) and all(isinstance(a, str) for a in rec[r])
                        for r in ("payload", "index"))):
            raise StorageError(f"malformed tensor record {str(rec)[:100]}")
        name, shape = rec["name"], rec.get("shape")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                        for s in shape)):
            raise StorageError(f"{name[:80]}: stored shape {str(shape)[:80]} is not a list of "
                               f"at most {MAX_DIMS} non-negative ints")
        if name in names:
            raise StorageError(f"two tensor records are named {name[:80]!r}")
        names.add(name)
        size = element_size(dtype_from_name(rec["dtype"]))
        if rec["encoding"] == ALIAS:
            check_alias(rec, stored, version)
            continue
        stored[name] = (rec["dtype"], shape)
        total += math.prod(shape) * size
        if total > max_bytes:
            raise StorageError(
                f"the tensors decode to more than max_bytes={max_bytes} bytes ({name[:80]!r} "
                f"has shape {str(shape)[:80]} of {rec['dtype'][:20]}); nothing was allocated. "
                "load(path, max_bytes=...) allows more"
            )
