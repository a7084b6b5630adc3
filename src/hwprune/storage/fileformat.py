"""The container's fixed names and sizes, shared by the writer (``container``) and the checked
reader (``reading``); ``container``'s docstring and docs/storage.md describe the layout.

The bounds at the end are what ``load`` refuses beyond, each checked before the memory is taken
(docs/storage.md, "Memory bound").
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = [
    "FORMAT", "VERSION", "READABLE_VERSIONS", "ZSTD_DOC_VERSION", "DOC_KEY", "DATA_KEY",
    "ARRAY_DTYPES", "MAGIC", "WRAPPER_VERSION", "CODECS", "COMPRESSED_HEADER",
    "COMPRESSED_HEADER_SIZE", "PREFIX_SIZE",
    "META_KEY", "MAX_DOC_BYTES", "DOC_BASE_BYTES", "DEFAULT_MAX_BYTES", "MAX_JSON_DEPTH",
    "MAX_DIMS",
]

FORMAT = "hwprune.storage"
#: the version ``save`` writes. ``load`` also reads version 1 (one safetensors entry per array),
#: 2 (the layout of 3, without the Golomb-coded gaps, coded k-of-n ranks and coded value
#: planes that version 3 added), 3 (the layout of 4, whose checksum takes each array of
#: more than 4 KiB by its own SHA-256 instead of its bytes, so that it is computed in
#: threads), 4 (the layout of 5, whose coded value planes are all deflate streams: 5 codes
#: planes of a MiB or more as Zstandard frames), 5 (the layout of 6 without alias records,
#: ``aliases``), 6 (the layout of 7 whose checksum is SHA-256, under the document's key
#: ``sha256``: 7 hashes with BLAKE3, key ``blake3``) and 7 (the layout of 8 whose document is
#: zlib-compressed: 8 stores it as a Zstandard frame). An older hwprune refuses a newer file by
#: its version
VERSION = 8
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
#: the version from which the document is a Zstandard frame (zlib before)
ZSTD_DOC_VERSION = 8
#: the two arrays of version 2 and after: the compressed JSON document, and every array back
#: to back
DOC_KEY, DATA_KEY = "hwprune.doc", "hwprune.data"
#: the array dtypes a file may declare (numpy's ``dtype.str``, little-endian)
ARRAY_DTYPES = {np.dtype(t).str: np.dtype(t) for t in
                ("|b1", "|u1", "<u2", "<u4", "<u8", "|i1", "<i2", "<i4", "<i8", "<f2", "<f4",
                 "<f8")}
#: bytes of safetensors' length prefix in front of its JSON header
PREFIX_SIZE = 8
#: the one key of the safetensors metadata that hwprune uses
META_KEY = "hwprune"

# -- the compressed wrapper ------------------------------------------------------------------
MAGIC = b"HWPRUNEZ"
WRAPPER_VERSION = 1  # the compressed wrapper's own version
CODECS = {"zlib": 1, "lzma": 2}
#: magic, wrapper version, codec, 6 reserved bytes, uncompressed length, SHA-256 of the body
COMPRESSED_HEADER = struct.Struct("<8sBB6sQ32s")
COMPRESSED_HEADER_SIZE = COMPRESSED_HEADER.size  # 56

# -- what load refuses beyond --------------------------------------------------------------
#: the default of ``load(path, max_bytes=...)``: the file read, the uncompressed container and
#: the decoded tensors may each take at most this many bytes
DEFAULT_MAX_BYTES = 16 << 30
#: the most bytes a document may inflate to, whatever the file (a model with 10^4 tensors needs
#: about 2 MB)
MAX_DOC_BYTES = 256 << 20
#: a document may inflate to this many bytes plus the size of the data section it describes:
#: every record but an empty tensor's accounts for bytes in the data, so a document far larger
#: than its data is a forgery
DOC_BASE_BYTES = 4 << 20
#: the deepest nesting of JSON a file may hold (the document needs 6 levels)
MAX_JSON_DEPTH = 32
#: the most dimensions a stored tensor may have
MAX_DIMS = 64
