"""Lossless coding of stored values: byte planes, each entropy-coded where that saves bytes.

A trained float32 weight's top byte (sign and 7 exponent bits) takes a handful of values, its
low mantissa bytes are close to uniform. So each payload array (raw values of 1, 2, 4 or 8
bytes, or the packed codes of quantized values) is split into its byte planes (plane j = byte j
of every value, little-endian), and each plane is stored either as it is or entropy-coded,
whichever is smaller: coded where that saves at least 3 % of it. A plane of more than
``_TRIAL_BYTES`` is coded only where the order-0 entropy of an evenly spaced sample (a
histogram, no trial compression) says so, so the uniform planes of a large model cost a copy
and no compressor call; a shorter one is simply coded and kept if it gains, which costs less
than the histogram (here zstd gave up on uniform planes of 16-256 KiB in 8-26 us, the
histogram took 21-26 us). The stored bytes decode to exactly the same bits: the values are
never rounded.

Every plane is one Zstandard frame at level 1 with matches of at least 7 bytes
(``zstandard``: its Huffman-coded literals do the work), made in zstd's own worker threads
from ``THREADED_BYTES`` on. Before, planes shorter than a MiB were raw deflate streams with
Huffman coding only (``zlib``), the fewest bytes on the planes of a CNN's layers: zstd's
frames of a pretrained ResNet's planes are up to 7 % larger, its files 0.06-1.3 % larger, but
it codes a small plane 2-4 times as fast and decodes it about 6 times as fast, and coding the
values had become the largest part of saving a ResNet-56 after the search for encodings
(``bench/storage/save_floor.py``). Planes below ``ZSTD_BYTES`` (none, at the default) are
still deflated: files of versions 3 and 4 hold such streams, and the reader takes both.

Meta: ``meta["vcoded"] = {array: [count, [len of plane 0, ...]]}`` (-1: the plane is stored
raw, ``count`` bytes; other planes deflated), or ``[count, [...], "zstd"]`` where the coded
planes are Zstandard frames; the payload array ``<array>_planes`` holds the planes back to back.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import numpy as np
import zstandard

from ..errors import StorageError
from .base import EncodedTensor, stored_array

__all__ = ["VCODED", "ZSTD", "code_values", "decode_values", "decode_frame", "MIN_CODED",
           "THREADED_BYTES", "ZSTD_BYTES", "split_planes", "join_planes", "worth_coding",
           "byte_columns"]

VCODED = "vcoded"
#: the tag of an array whose coded planes are Zstandard frames
ZSTD = "zstd"
#: arrays of fewer values are stored as they are (a few bytes could be saved, not worth it)
MIN_CODED = 256
#: a plane is compressed only if the order-0 entropy of a sample of at most ``_SAMPLE`` of its
#: bytes (evenly spaced) is below ``_GAIN`` of 8 bits a byte: Huffman coding cannot go below
#: that entropy, so the planes it skips would save less than 3 %
_SAMPLE = 1 << 14
_GAIN = 0.97
#: planes up to this many bytes are coded as a trial instead (module docstring)
_TRIAL_BYTES = 1 << 18
#: planes of at least this many bytes are (de)compressed in threads: zlib releases the GIL
THREADED_BYTES = 1 << 20


#: planes of at least this many bytes are coded with zstd, shorter ones deflated (module
#: docstring): at the default, every plane that is coded at all
ZSTD_BYTES = MIN_CODED
#: zstd's parameters: level 1 with longer minimal matches (a plane's rare matches cost more
#: than its Huffman-coded literals), a small window and the smallest hash table: it stays in
#: the first-level cache, and its few, recent matches are the ones worth taking (on the top
#: planes of float32 and bfloat16 weights, 2.4-3.5x as fast to code and 1.5-2.2x to decode as a
#: 4096-entry table, and 4-5 % smaller); worker threads in jobs of a fixed size, so that the
#: frame does not depend on the thread count
_ZSTD_PARAMS = dict(compression_level=1, strategy=zstandard.STRATEGY_FAST, min_match=7,
                    window_log=17, hash_log=6, job_size=1 << 22, write_content_size=True)


def _deflate(data: np.ndarray) -> bytes:
    """One raw deflate stream of ``data``, Huffman coding only."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return c.compress(data) + c.flush()


def _zstd(data: np.ndarray) -> bytes:
    """One Zstandard frame of ``data``, its length in the frame header: in zstd's worker
    threads from ``THREADED_BYTES`` on, else in this thread by a compressor made once per
    thread (making one costs about what coding a small layer's plane does)."""
    if data.size >= THREADED_BYTES:
        params = zstandard.ZstdCompressionParameters(
            threads=max(1, min(os.cpu_count() or 1, 8)), **_ZSTD_PARAMS)
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    compressor = getattr(_THIS_THREAD, "zstd", None)
    if compressor is None:  # a compressor is not for two threads at once
        params = zstandard.ZstdCompressionParameters(**_ZSTD_PARAMS)
        compressor = _THIS_THREAD.zstd = zstandard.ZstdCompressor(compression_params=params)
    return compressor.compress(data)


#: each thread's own single-threaded compressor (``_zstd``)
_THIS_THREAD = threading.local()


def worth_coding(plane: np.ndarray) -> bool:
    """Whether the byte plane's sampled order-0 entropy is below ``_GAIN`` * 8 bits a byte."""
    sample = plane[:: -(-plane.size // _SAMPLE)] if plane.size > _SAMPLE else plane
    counts = np.bincount(sample, minlength=256)
    p = counts[counts > 0] / sample.size
    return float(-(p * np.log2(p)).sum()) < 8 * _GAIN


def _code_plane(column: np.ndarray, coder) -> bytes | None:
    """The plane (``column``: a strided view of it) coded by ``coder``, or ``None`` where that
    saves less than 3 % (``_GAIN``): a plane of more than ``_TRIAL_BYTES`` is first checked
    by its sampled entropy (module docstring)."""
    if column.size > _TRIAL_BYTES and not worth_coding(column):
        return None
    coded = coder(np.ascontiguousarray(column))
    return coded if len(coded) < _GAIN * column.size else None


def byte_columns(arr: np.ndarray) -> np.ndarray:
    """``(count, width)`` view of ``arr``'s bytes: column j is plane j (no copy)."""
    return arr.view(np.uint8).reshape(-1, arr.dtype.itemsize)


def split_planes(arr: np.ndarray) -> np.ndarray:
    """``(width, count)`` bytes: row j is byte j (little-endian) of every value of ``arr``."""
    return np.ascontiguousarray(byte_columns(arr).T)


def join_planes(planes: np.ndarray) -> np.ndarray:
    """The inverse of ``split_planes``: the values (``<u{width}``) from their byte planes."""
    width, count = planes.shape
    out = np.empty(count, f"<u{width}")
    for j in range(width):
        byte_columns(out)[:, j] = planes[j]
    return out


def _map(fn, items: list, big: bool) -> list:
    """``[fn(x) for x in items]``, in threads where the items are big enough to gain."""
    if not big or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def code_values(enc: EncodedTensor) -> EncodedTensor:
    """``enc`` with each payload array of raw values stored as coded byte planes where that is
    smaller (``enc`` itself where nothing gains)."""
    payload, info = dict(enc.payload), {}
    for name, arr in enc.payload.items():
        if arr.ndim != 1 or arr.dtype.kind != "u" or arr.size < MIN_CODED:
            continue
        columns = byte_columns(arr)
        zstd = arr.size >= ZSTD_BYTES  # every plane of an array has its length: one coder
        coder = _zstd if zstd else _deflate
        coded = _map(partial(_code_plane, coder=coder), list(columns.T),
                     arr.size >= THREADED_BYTES)
        lengths = [-1 if c is None else len(c) for c in coded]
        sizes = [arr.size if c is None else len(c) for c in coded]
        if sum(sizes) < arr.nbytes:
            # each plane copied once, straight from the values' bytes or the coded stream
            out, at = np.empty(sum(sizes), np.uint8), 0
            for j, (c, n) in enumerate(zip(coded, sizes, strict=True)):
                out[at: at + n] = columns[:, j] if c is None else np.frombuffer(c, np.uint8)
                at += n
            del payload[name]
            payload[f"{name}_planes"] = out
            info[name] = [int(arr.size), lengths] + ([ZSTD] if zstd else [])
    if not info:
        return enc
    return replace(enc, payload=payload, meta={**enc.meta, VCODED: info})


def decode_values(enc: EncodedTensor, limit: int) -> EncodedTensor:
    """The inverse of ``code_values``: payload arrays of raw values again, one plane per byte
    of their elements (each encoding then checks them as it checks uncoded arrays). ``limit``
    bounds each array's element count before anything is inflated."""
    info = enc.meta.get(VCODED)
    if not isinstance(info, dict):
        raise StorageError(f"{enc.encoding}: stored value coding {str(info)[:80]} is not a dict")
    payload = dict(enc.payload)
    for name, entry in info.items():
        if not (isinstance(entry, list) and len(entry) in (2, 3) and _is_int(entry[0])
                and 0 <= entry[0] <= limit and isinstance(entry[1], list)
                and len(entry[1]) in (1, 2, 4, 8)
                and all(_is_int(n) and n >= -1 for n in entry[1])
                and entry[2:] in ([], [ZSTD])):
            raise StorageError(f"{enc.encoding}: stored value coding of {name[:40]!r} "
                               f"({str(entry)[:80]}) is not [count <= {limit}, 1, 2, 4 or 8 "
                               f"plane lengths] or that and {ZSTD!r}")
        count, lengths = entry[:2]
        decode = _unzstd if entry[2:] == [ZSTD] else _inflate
        width = len(lengths)
        data = stored_array(enc.payload, f"{name}_planes", enc)
        sizes = [count if n == -1 else n for n in lengths]
        if data.dtype != np.uint8 or data.ndim != 1 or data.size != sum(sizes):
            raise StorageError(f"{enc.encoding}: the planes of {name[:40]!r} take {data.size} "
                               f"bytes; their lengths say {sum(sizes)}")
        out = np.empty(count, f"<u{width}")
        if count:
            _fill_planes(out, data, lengths, decode, enc.encoding)
        del payload[f"{name}_planes"]
        payload[name] = out
    # the decoded arrays are new: only this decode holds them
    return replace(enc, payload=payload, meta={k: v for k, v in enc.meta.items() if k != VCODED},
                   fresh=enc.fresh | set(info))


def _fill_planes(out: np.ndarray, data: np.ndarray, lengths: list[int], decode,
                 what: str) -> None:
    """Each plane of ``data`` (stored raw where its length is -1, else coded: ``decode``)
    written straight into its byte column of ``out``: a strided write is faster than joining
    whole planes by a transposed copy. In threads for large arrays (they write disjoint
    bytes)."""
    columns, count = byte_columns(out), out.size
    sizes = [count if n == -1 else n for n in lengths]
    ends = np.cumsum(sizes).tolist()

    def plane(j: int) -> None:
        part = data[ends[j] - sizes[j]: ends[j]]
        columns[:, j] = part if lengths[j] == -1 else decode(part, count, what)

    _map(plane, list(range(len(lengths))), count >= THREADED_BYTES)


def _inflate(part: np.ndarray, count: int, what: str) -> np.ndarray:
    """A plane of exactly ``count`` bytes from its deflate stream (never inflating more)."""
    d = zlib.decompressobj(-15)
    try:
        raw = d.decompress(part, count)
        # the stream's end may not have been read yet: one more byte of room must give nothing
        more = b"" if d.eof else d.decompress(d.unconsumed_tail, 1)
        exact = len(raw) == count and not more and d.eof and not d.unused_data
    except zlib.error as err:
        raise StorageError(f"{what}: a coded value plane does not inflate ({err})") from err
    if not exact:
        raise StorageError(f"{what}: a coded value plane does not inflate to {count} bytes")
    return np.frombuffer(raw, np.uint8)


def _unzstd(part: np.ndarray, count: int, what: str) -> np.ndarray:
    """A plane of exactly ``count`` bytes from its Zstandard frame (``decode_frame``)."""
    raw = decode_frame(part, count, f"{what}: a coded value plane")
    if len(raw) != count:
        raise StorageError(f"{what}: a coded value plane's frame declares {len(raw)} bytes, "
                           f"not {count}")
    return np.frombuffer(raw, np.uint8)


def decode_frame(part: np.ndarray, most: int, what: str) -> bytes:
    """The bytes of the one Zstandard frame that ``part`` (uint8) is. The frame must declare
    its length, at most ``most``, and end where ``part`` does (its block headers walked,
    nothing decoded) before it is decoded into a buffer of that length, which the decoder
    cannot overrun; ``what`` names it in the errors."""
    try:
        declared = zstandard.frame_content_size(part)
        if not 0 <= declared <= most:  # -1: not declared
            raise StorageError(f"{what}'s frame declares {declared} bytes; at most {most} "
                               "are allowed here")
        if _frame_length(part, what) != part.size:
            raise StorageError(f"{what} holds bytes after its frame")
        # (a limit of 0 would mean none to zstandard: an empty frame gets 1)
        raw = zstandard.ZstdDecompressor().decompress(part, max_output_size=max(declared, 1))
    except zstandard.ZstdError as err:
        raise StorageError(f"{what} does not decode ({err})") from err
    if len(raw) != declared:
        raise StorageError(f"{what} does not decode to the {declared} bytes its frame declares")
    return raw


def _frame_length(part: np.ndarray, what: str) -> int:
    """Bytes of the Zstandard frame that ``part`` starts with: its header, then blocks of a
    3-byte header (last-block flag, type, size; an RLE block stores one byte) each, then the
    checksum where the header announces one (the format's RFC 8878, section 3.1)."""
    at = zstandard.frame_header_size(part)
    while True:
        if at + 3 > part.size:
            raise StorageError(f"{what}'s frame is cut short")
        head = int.from_bytes(part[at: at + 3].tobytes(), "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3:
            raise StorageError(f"{what}'s frame has a reserved block type")
        at += 3 + (1 if kind == 1 else size)
        if last:
            break
    return at + (4 if zstandard.get_frame_parameters(part).has_checksum else 0)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
