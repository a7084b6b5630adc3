"""The container: a model's tensors, each in its smallest exact encoding, in one safe file.

``save(obj, path)`` writes a state dict (or an ``nn.Module``'s) and ``load(path)`` gives back the
exact tensors: same names (in order), dtypes, shapes and bits. The file is a safetensors file, so
it holds only arrays and strings: nothing in it is ever unpickled or executed. Any damage (a
flipped byte, a truncation, trailing bytes, a foreign file) raises ``StorageError`` before a
single tensor is returned (in a version 7 or older file the one flip that loads changes
nothing: the padding bits of the document's last deflate byte, which zlib ignores).

File layout, uncompressed (the default): a safetensors file with two uint8 arrays.

=============  ==========================================================================
bytes          content
=============  ==========================================================================
[0, 8)         ``H``: u64 little-endian, length of the JSON header (safetensors)
[8, 8+H)       the JSON header: the two arrays' entries (dtype U8, shape, offsets) and
               ``"__metadata__"``, whose one key ``"hwprune"`` holds the JSON
               ``{"format":"hwprune.storage","version":8}``; safetensors pads the header with
               spaces to a multiple of 8 bytes
then           ``hwprune.doc``: the document, compact JSON as one Zstandard frame
               (its length and checksum in it; zlib up to version 7):
               ``blake3`` (the checksum, ``packing.checksum``), ``tensors`` (one record
               per tensor in state-dict order: name, encoding, dtype, shape, the
               encoding's parameters ``meta``, and the names of its ``payload`` and
               ``index`` arrays; a tied entry's record is an alias of the earlier one,
               ``aliases``) and ``arrays`` (``[key, dtype, count]`` per array, keys
               ``"<name>/<array>"``, in the order of the data)
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

The checksum (``blake3`` in the document: BLAKE3; version 6 and older files, ``sha256``) covers
the format, version and tensors JSON, and every array's key, dtype, shape and bytes (an array
over 4 KiB by its own digest, so that the arrays are hashed in threads), so a changed byte in
the data or in hwprune's metadata is caught even where safetensors would still parse the file;
the document itself is guarded by its frame's checksum (zlib's up to version 7). Writes are
atomic: a temporary file in the same folder, fsync, then ``os.replace``; a large model's arrays
go to that file as each tensor is chosen (``streaming``), the same bytes as ``plan``'s.
``load`` trusts nothing it reads: ``reading`` checks every size against a bound
(``max_bytes``, the data section, the declared lengths) before it allocates.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from torch import Tensor, nn

from ..files import atomic_file, check_file_path, write_atomic
from .aliases import ALIAS, alias_of, find_aliases
from .bits import dtype_from_name
from .encodings import (
    EncodedTensor,
    Hints,
    TensorView,
    decode,
    saved_encodings,
    small_vector_choice,
)
from .encodings.base import check_storable
from .encodings.chooser import choose_view
from .errors import StorageError
from .fileformat import (
    CODECS,
    COMPRESSED_HEADER,
    COMPRESSED_HEADER_SIZE,
    DATA_KEY,
    DEFAULT_MAX_BYTES,
    DOC_KEY,
    FORMAT,
    MAGIC,
    META_KEY,
    PREFIX_SIZE,
    VERSION,
    WRAPPER_VERSION,
)
from .packing import checksum, checksum_key, pack, pack_parts, tensor_record
from .reading import (
    check_max_bytes,
    check_records,
    cut_arrays,
    parse_header,
    read_regular,
    unpack,
    unwrap,
)
from .streaming import write_container

__all__ = ["save", "load", "plan", "pack", "pack_parts", "FilePlan", "file_layout", "FORMAT",
           "VERSION", "COMPRESSED_HEADER_SIZE", "DEFAULT_MAX_BYTES", "DOC_KEY", "DATA_KEY",
           "META_KEY"]


def save(obj: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
         compress: str | None = None, hints: Mapping[str, Hints] | None = None,
         code_values: bool = True, sync: bool = True) -> int:
    """Write ``obj`` (a module's ``state_dict()`` or a dict of tensors) to ``path``.

    Each tensor takes ``choose(t, hints.get(name), code_values)``, its smallest exact
    encoding (``code_values``: its values as Huffman-coded byte planes where that is smaller).
    ``compress`` (``None``, ``"zlib"``, ``"lzma"``) wraps the file in the compressed layout.
    The file is written beside ``path`` and renamed into place (never half-written);
    ``sync=True`` flushes it to the disk first, so that a power loss after the return cannot
    lose it (``False``: the OS flushes it later, as after ``torch.save``).
    Returns the number of bytes written.
    """
    if compress is not None and compress not in CODECS:
        raise StorageError(f"compress must be None, 'zlib' or 'lzma'; got {compress!r}")
    check_file_path(Path(path))  # before the encoding, which can take a while
    if compress is not None:
        _, parts = _encode(obj, hints, code_values)
        data = _wrap(b"".join(parts), compress)
        write_atomic(Path(path), data, sync=sync)
        return len(data)
    state = _state(obj)
    # the arrays go to the file as they are (no joined copy of the whole file), and those of
    # a large model as each tensor is chosen (``streaming``): the same bytes as ``plan``'s
    raw = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_file(Path(path), sync) as f:
        return write_container(f, _encoded(state, hints or {}, code_values), Path(path), raw,
                               len(state))


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
         hints: Mapping[str, Hints] | None = None, code_values: bool = True) -> FilePlan:
    """Encode ``obj`` as ``save`` would (same choices, same bytes) and say how the file's
    bytes divide between the container header and the tensors' data."""
    encoded, parts = _encode(obj, hints, code_values)
    data = b"".join(parts)
    data_bytes = sum(e.total_bytes for e in encoded.values())
    return FilePlan(encoded, data, len(data) - data_bytes, data_bytes)


def _encode(obj: nn.Module | Mapping[str, Tensor], hints: Mapping[str, Hints] | None,
            code_values: bool) -> tuple[dict[str, EncodedTensor], list]:
    """Each tensor's chosen encoding, by name, and the file's bytes in parts (``pack_parts``)."""
    encoded, records, arrays = {}, [], {}
    for name, enc in _encoded(_state(obj), hints or {}, code_values):
        encoded[name] = enc
        records.append(tensor_record(name, enc, arrays))
    return encoded, pack_parts(records, arrays)


#: tensors of at least this many elements are encoded in threads (numpy and zlib release the
#: GIL on them); smaller ones are mostly Python and stay in the calling thread
PARALLEL_NUMEL = 1 << 20
#: tensors up to this many elements are compared by their bits before they are encoded
SAME_CHOICE_NUMEL = 1 << 12


def _encoded(state: Mapping[str, Tensor], hints: Mapping[str, Hints],
             code_values: bool) -> Iterator[tuple[str, EncodedTensor]]:
    """(name, chosen encoding) of every tensor, in the state's order; a tied entry is an
    alias of the first. The large tensors are chosen ahead in threads, one waiting per
    thread at most (``_in_order``, bounded: a streamed save lets each go once written): each
    choice depends on its tensor alone, so the result is that of one after the other."""
    aliases = find_aliases(state)  # tied tensors: stored once
    # small tensors with the same bits and hints (BatchNorm's ones and zeros at
    # initialisation, tied copies) have the same choice: made once (in the calling thread:
    # a large tensor has no such key)
    seen: dict[tuple, EncodedTensor] = {}

    def choose_one(name: str) -> EncodedTensor:
        # a trained small vector is dense, found without its bits as a key
        enc = small_vector_choice(state[name], hints.get(name))
        if enc is not None:
            return enc
        key = _same_choice_key(state[name], hints.get(name))
        if key is None or key not in seen:
            enc = _choose(state[name], hints.get(name), code_values)
            if key is None:
                return enc
            seen[key] = enc
        return seen[key]

    def one(name: str) -> EncodedTensor:
        return alias_of(state[name], aliases[name]) if name in aliases else choose_one(name)

    large = {n for n, t in state.items() if n not in aliases and t.numel() >= PARALLEL_NUMEL}
    yield from _in_order(list(state), large, one, bounded=True)


def _in_order(names: list[str], large: set[str], fn: Callable[[str], Any],
              bounded: bool = False) -> Iterator[tuple[str, Any]]:
    """``(name, fn(name))`` of every name, in the order of ``names``: those in ``large``
    computed ahead in a thread pool (numpy, zlib and zstd release the GIL on them), the
    others meanwhile in this thread. ``bounded``: at most one large result per thread waits
    ahead (what a caller that lets each result go before the next keeps in memory); else
    every large one is queued at once, so that no thread idles while an earlier one runs."""
    workers = max(1, min(len(large), os.cpu_count() or 1))
    ahead = workers if bounded else len(large)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue, futures = (n for n in names if n in large), {}

        def top_up() -> None:  # the next large ones in order
            while len(futures) < ahead and (n := next(queue, None)) is not None:
                futures[n] = pool.submit(fn, n)

        top_up()
        for name in names:
            if name in futures:
                result = futures.pop(name).result()
                top_up()
            else:
                result = fn(name)
            yield name, result


def _choose(t: Tensor, hint: Hints, code_values: bool) -> EncodedTensor:
    """``choose`` among the encodings ``save`` tries on ``t`` (``saved_encodings``)."""
    view = TensorView.of(t)
    return choose_view(view, hint, code_values, saved_encodings(view, hint))


def _same_choice_key(t: Any, hint: Hints) -> tuple | None:
    """What ``choose`` of a small strided CPU tensor depends on (dtype, shape, bits, hint);
    ``None`` where the tensor is not one to compare this way."""
    if (not isinstance(t, Tensor) or t.numel() > SAME_CHOICE_NUMEL or t.layout != torch.strided
            or t.device.type != "cpu" or not isinstance(hint, (type(None), str))):
        return None
    try:  # numpy's view of the tensor gives its bytes in flat order, contiguous or not
        raw = t.detach().numpy().tobytes()
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16, float8), a conj view
        raw = (t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
               .view(torch.uint8).numpy().tobytes())
    return (t.dtype, tuple(t.shape), hint, raw)



def load(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Tensor]:
    """The exact tensors of a file ``save`` wrote, by name, in the order they were saved.

    Raises ``StorageError`` for anything else: a damaged, truncated or foreign file, or one
    that is not a regular file. Only ``json`` and the checked offsets of its header read it
    (version 1: safetensors); nothing is unpickled.
    ``max_bytes`` bounds memory: the file, its uncompressed form and the decoded tensors may
    each be at most ``max_bytes`` bytes, each checked before it is allocated (docs/storage.md,
    "Memory bound").
    """
    max_bytes = check_max_bytes(max_bytes)
    try:
        tensors, arrays = _read(path, max_bytes)
        return _decode_all(tensors, arrays)
    except StorageError as err:
        raise StorageError(f"{path}: {err}") from err


def _read(path: str | os.PathLike, max_bytes: int) -> tuple[list, dict[str, np.ndarray]]:
    """The checked tensor records and arrays of the file at ``path``."""
    data = read_regular(path, max_bytes)
    if data[: len(MAGIC)] == MAGIC:
        data = unwrap(data, max_bytes)
    header = parse_header(data)
    section = len(data) - PREFIX_SIZE - header.length
    if header.data_end != section:
        raise StorageError("the data section does not match the arrays it declares")
    if header.version == 1:
        try:
            stored = safetensors.numpy.load(data)
        except Exception as err:  # safetensors raises its own error types for a malformed file
            raise StorageError(f"not an intact hwprune file: {err}") from err
        if sum(int(a.nbytes) for a in stored.values()) != section:
            raise StorageError("the data section does not match the arrays it declares")
        doc, arrays = header.meta, stored
    else:  # the arrays are views of the file's bytes: no copy of the whole file
        doc, arrays = unpack(cut_arrays(data, header), max_bytes, header.version)
    del data
    tensors = doc["tensors"]
    check_records(tensors, max_bytes, header.version)
    if doc.get(checksum_key(header.version)) != checksum(tensors, arrays, header.version):
        raise StorageError("checksum mismatch; the file is damaged")
    return tensors, arrays


def file_layout(path: str | os.PathLike) -> dict[str, Any]:
    """How a file's bytes divide: ``{"compressed", "header_bytes", "data_bytes", "size"}``.

    Uncompressed: ``header_bytes = 8 + H + len(doc)`` (version 1: ``8 + H``) and
    ``data_bytes`` = the arrays' bytes (= the sum of the tensors' ``total_bytes``).
    Compressed: ``header_bytes = 56``, ``data_bytes`` = the compressed body. Reads headers
    only; use ``load`` to verify a file.
    """
    try:
        data = read_regular(path, DEFAULT_MAX_BYTES)
        if data[: len(MAGIC)] == MAGIC:
            return {"compressed": True, "header_bytes": COMPRESSED_HEADER_SIZE,
                    "data_bytes": len(data) - COMPRESSED_HEADER_SIZE, "size": len(data)}
        header = parse_header(data)
    except StorageError as err:
        raise StorageError(f"{path}: {err}") from err
    data_bytes = header.data_end
    if header.version >= 2:
        start, end = header.entries[DATA_KEY]["data_offsets"]
        data_bytes = end - start
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
        try:  # every tensor checked before any is encoded: no time lost on a file never written
            check_storable(t)
        except StorageError as err:
            raise StorageError(f"{name!r}: {err}") from None
    return dict(obj)


def _wrap(data: bytes, codec: str) -> bytes:
    body = zlib.compress(data, 9) if codec == "zlib" else lzma.compress(data)
    head = COMPRESSED_HEADER.pack(MAGIC, WRAPPER_VERSION, CODECS[codec], bytes(6), len(data),
                        hashlib.sha256(body).digest())
    return head + body


# -- decoding -------------------------------------------------------------------------------
def _decode_all(tensors: list, arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Every record decoded (``check_records`` has bounded their shapes and sizes); the large
    tensors in a thread pool, as ``_encoded`` chooses them: each depends on its own arrays
    alone."""
    encoded: dict[str, EncodedTensor] = {}
    aliases: dict[str, str] = {}  # checked by check_records: each names a tensor before it
    used: set[str] = set()
    for rec in tensors:
        if rec["encoding"] == ALIAS:
            aliases[rec["name"]] = rec["meta"]["of"]
            continue
        with _naming(rec["name"]):
            encoded[rec["name"]] = _record_encoding(rec, arrays, used)
    large = {n for n, e in encoded.items() if math.prod(e.shape) >= PARALLEL_NUMEL}
    out = dict(_in_order(list(encoded), large, lambda n: _decode_one(n, encoded[n])))
    if used != set(arrays):
        raise StorageError("arrays and tensor records do not match")
    # tied entries are one tensor again, as torch.load gives them; in the order saved
    return {rec["name"]: out[aliases.get(rec["name"], rec["name"])] for rec in tensors}


def _record_encoding(rec: dict, arrays: dict[str, np.ndarray], used: set[str]) -> EncodedTensor:
    """The ``EncodedTensor`` a record describes, its arrays taken from ``arrays`` (their keys
    added to ``used``)."""
    name, groups = rec["name"], {}
    for role in ("payload", "index"):
        groups[role] = {a: arrays[f"{name}/{a}"] for a in rec[role]}
        used.update(f"{name}/{a}" for a in rec[role])
    return EncodedTensor(rec["encoding"], dtype_from_name(rec["dtype"]), tuple(rec["shape"]),
                         groups["payload"], groups["index"], dict(rec["meta"]))


def _decode_one(name: str, enc: EncodedTensor) -> Tensor:
    with _naming(name):
        t = decode(enc)
        if t.numel() != math.prod(enc.shape):
            raise StorageError("decoded the wrong number of elements")
        return t


@contextmanager
def _naming(name: object) -> Iterator[None]:
    """Any error inside becomes a ``StorageError`` that names the tensor."""
    try:
        yield
    except StorageError as err:
        raise StorageError(f"tensor {str(name)[:80]!r}: {err}") from err
    except MemoryError:
        raise  # the checks came first: a file within max_bytes that this machine cannot hold
    except Exception as err:  # a record that passed the checksum but is malformed
        raise StorageError(f"tensor {str(name)[:80]!r}: malformed record "
                           f"({type(err).__name__}: {err})") from err
