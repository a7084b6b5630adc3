"""Writing files so that a crash or a full disk never leaves a half-written one."""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

_TMP = ".tmp"


def write_atomic(path: Path, data: bytes | Sequence[Any], sync: bool = True) -> None:
    """Write ``data`` (bytes, or buffers such as bytes and contiguous numpy arrays, written one
    after the other: no joined copy) to a temporary file beside ``path``, then rename: never a
    half-written file (``atomic_file``). ``sync``: the file's bytes reach the disk before the
    rename (a power loss after the return cannot lose them); ``False`` leaves the flush to the
    OS, as ``torch.save`` does (a crash of this process still leaves the old file or the new
    one)."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    with atomic_file(path, sync) as f:
        reserve(f, sum(memoryview(p).nbytes for p in parts), path)
        for part in parts:
            f.write(part)


@contextmanager
def atomic_file(path: Path, sync: bool = True) -> Iterator[BinaryIO]:
    """A new file opened for writing (and reading) beside ``path``, renamed over ``path``
    when the block ends without an error (flushed to the disk first where ``sync``), removed
    where it raises: the old file or the new one, never a half-written one.

    A process killed mid-write (SIGKILL, power loss) leaves the temporary file
    (``.NAME.*.tmp``) behind; ``remove_stale_temporaries`` removes it."""
    # readable too: a writer may move what it wrote
    with atomic_path(path) as tmp, open(tmp, "r+b") as f:
        yield f
        f.flush()
        if sync:
            os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path, keep_suffix: bool = False) -> Iterator[Path]:
    """The path of a new, empty temporary file beside ``path``, for a writer that takes a
    path: renamed over ``path`` when the block ends without an error, removed where it raises
    (what ``atomic_file`` writes through). ``keep_suffix``: the temporary name ends in
    ``path``'s suffix too, for writers that read the format from it."""
    path = Path(path)
    check_file_path(path)
    suffix = _TMP + (path.suffix if keep_suffix else "")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix,
                                   dir=path.parent or ".")
    except OSError as err:  # the folder takes no new file: say so with the user's path
        raise type(err)(err.errno, f"cannot create a file in {path.parent} "
                        f"({err.strerror})", str(path)) from err
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def reserve(f: BinaryIO, size: int, path: Path) -> None:
    """Allocate the first ``size`` bytes of ``f`` on the disk before writing them: a new file
    whose blocks the file system allocates as it goes (ext4's delayed allocation) was far
    slower to write than a file rewritten in place (docs/storage.md, "The file system"), and
    a full disk fails here, before those bytes are written. A file system without the call
    writes as before. The file's size becomes at least ``size``."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EFBIG):  # the file cannot be written at all
            raise type(err)(err.errno, f"no room for its {size:,} bytes ({err.strerror})",
                            str(path)) from err
        # EOPNOTSUPP, EINVAL, ENODEV: not offered here; the writes allocate as they go


def check_file_path(path: Path) -> None:
    """``OSError`` naming ``path`` where no file can be written there: it is a folder, or its
    folder does not exist (checked before any work that writes it, so none is done in vain)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give the path of a file to write",
                                str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder to write the file into",
                                str(path.parent))


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files this module's writers (``write_atomic``, ``atomic_file``,
    ``atomic_path``) left behind for ``path`` when their process was killed mid-write;
    returns them. Call it only when no write to ``path`` is in progress."""
    stale = sorted(Path(path).parent.glob(f".{glob.escape(Path(path).name)}.*{_TMP}*"))
    for tmp in stale:
        with suppress(FileNotFoundError):
            tmp.unlink()
    return stale
