"""Writing a container whose encoded arrays need not all be in memory at once.

``write_container(f, items, path, raw_bytes, count)`` writes to the open file ``f`` exactly
the bytes ``packing.pack`` makes of the tensors that ``items`` yields (name and chosen
encoding, in order). While the tensors come to less than ``STREAM_BYTES`` their arrays are
held and written in one go, as ``pack_parts`` gives them. Past that, each tensor's arrays go
to the file as the tensor comes and are let go: memory holds the encodings of the tensors in
flight, not the whole file's (on a large model, the file's size less). The header, which
gives the data's size, is then written last: the data start where the header most likely
ends (laid out for the data's size at the ratio the tensors so far were encoded at, and a
document in proportion to their records), and in the rare case the real header is longer or
shorter (its numbers have other digit counts, beyond what the padding to 8 bytes absorbs),
the data are moved to where it ends before it is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..files import reserve
from .bits import element_size
from .encodings import EncodedTensor
from .errors import StorageError
from .fileformat import VERSION
from .packing import (
    array_digest,
    array_entry,
    canonical_json,
    check_key_free,
    checksum_of_entries,
    compress_document,
    document,
    file_header,
    needs_digest,
    pack_parts,
    tensor_record,
)

__all__ = ["write_container", "STREAM_BYTES"]

#: tensors of this many bytes in all (their own size, which bounds their encodings') are
#: held before the file is written array by array
STREAM_BYTES = 64 << 20
#: the file's blocks are reserved (``files.reserve``) at least this many bytes ahead
_RESERVE_STEP = 64 << 20
#: bytes copied per step where the data move
_MOVE_STEP = 4 << 20


def write_container(f: BinaryIO, items: Iterable[tuple[str, EncodedTensor]], path: Path,
                    raw_bytes: int, count: int) -> int:
    """Write the container of ``items`` to ``f`` (at its start); returns its size in bytes.
    ``path``: the file's name in errors; ``raw_bytes`` and ``count``: the tensors' own bytes
    and their number (what the first header is laid out for)."""
    records: list[dict] = []
    held: dict[str, np.ndarray] = {}  # arrays not written yet, in the data's order
    listed: dict[str, list] = {}  # once streaming: every array's [dtype, count], in order
    entries: dict[str, Future | bytes] = {}  # streamed arrays' checksum entries
    start = None  # where the data section starts, once the arrays go out as they come
    written = reserved = raw_seen = 0
    with ExitStack() as stack:  # the hashing threads, once the arrays are streamed
        for name, enc in items:
            if start is None:  # held with the others: tensor_record finds a shared key
                records.append(tensor_record(name, enc, held))
                if raw_bytes < STREAM_BYTES:  # the whole file is held: nothing to count
                    continue
                # the tensors' own bytes bound their encodings' (and cost less to count)
                raw_seen += math.prod(enc.shape) * element_size(enc.dtype)
                if raw_seen < STREAM_BYTES:
                    continue
                held_bytes = sum(a.nbytes for a in held.values())
                start = len(_first_header(records, held_bytes, raw_seen, raw_bytes, count))
                f.seek(start)
                hashing = stack.enter_context(ThreadPoolExecutor(os.cpu_count() or 1))
                listed = {k: [a.dtype.str, int(a.size)] for k, a in held.items()}
            else:
                records.append(tensor_record(name, enc, held))
                for key, a in held.items():  # tensor_record checks within one tensor
                    check_key_free(key, listed)
                    listed[key] = [a.dtype.str, int(a.size)]
            for key, a in held.items():
                end = start + written + a.nbytes
                if end > reserved:
                    reserved = max(end, reserved + _RESERVE_STEP)
                    reserve(f, reserved, path)
                f.write(a.view(np.uint8))
                written += a.nbytes
                # a large array enters the checksum by its SHA-256, hashed beside the encoding
                entries[key] = (hashing.submit(_entry, key, a) if needs_digest(a)
                                else array_entry(key, a, None))
            held.clear()
        if start is None:  # it all fitted: the file in one go
            parts = pack_parts(records, held)
            size = sum(memoryview(p).nbytes for p in parts)
            reserve(f, size, path)
            for part in parts:
                f.write(part)
            return size
        done = {k: e.result() if isinstance(e, Future) else e for k, e in entries.items()}
    tensors = canonical_json(records)
    body = document(tensors, [[k, *v] for k, v in listed.items()],
                    checksum_of_entries(tensors, VERSION, done))
    head = file_header(written, len(body))
    if len(head) != start:
        _move(f, start, len(head), written)
    f.seek(0)
    f.write(head)
    f.seek(len(head) + written)
    f.write(body)
    f.truncate()  # past the body: the reservation's rest, or what the data left moving down
    return len(head) + written + len(body)


def _first_header(records: list[dict], held_bytes: int, raw_seen: int, raw_bytes: int,
                  count: int) -> bytes:
    """The header the file will most likely need, from the tensors so far: the data's size
    at the ratio of their encoded to their own bytes, the document's at their records' share
    of it. Only the digit counts matter, and the padding to 8 bytes absorbs most of those."""
    data = round(held_bytes * raw_bytes / max(raw_seen, 1))
    doc = len(compress_document(canonical_json(records).encode())) * count // len(records)
    return file_header(max(data, held_bytes), max(doc, 1))


def _entry(key: str, a: np.ndarray) -> bytes:
    return array_entry(key, a, array_digest(a))


def _move(f: BinaryIO, src: int, dst: int, count: int) -> None:
    """Move ``count`` bytes of the file ``f`` (open for reading and writing) from offset
    ``src`` to ``dst`` in steps: from the front where they move down, from the back where they
    move up, so that no step overwrites bytes still to be moved."""
    steps = range(0, count, _MOVE_STEP)
    for at in (steps if dst < src else reversed(steps)):
        n = min(_MOVE_STEP, count - at)
        f.seek(src + at)
        chunk = f.read(n)
        if len(chunk) != n:
            raise StorageError(f"moving the data: read {len(chunk)} of {n} bytes")
        f.seek(dst + at)
        f.write(chunk)
