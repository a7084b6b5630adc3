"""write_atomic reserves the new file's blocks before writing (and writes anyway where the file
system cannot), fails early on a full disk with the old file intact and no temporary left."""

import errno
import os

import numpy as np
import pytest

from hwprune import files
from hwprune.files import write_atomic

PARTS = [b"header", np.arange(1000, dtype=np.uint8), bytearray(b"tail")]
CONTENT = b"header" + bytes(np.arange(1000, dtype=np.uint8)) + b"tail"


def test_the_whole_size_is_reserved_before_the_bytes_are_written(tmp_path, monkeypatch):
    calls = []
    real = os.posix_fallocate

    def record(fd, offset, length):
        calls.append((offset, length, os.fstat(fd).st_size))
        real(fd, offset, length)

    monkeypatch.setattr(files.os, "posix_fallocate", record)
    write_atomic(tmp_path / "f.bin", PARTS)
    assert calls == [(0, len(CONTENT), 0)]  # once, all of it, before any write
    assert (tmp_path / "f.bin").read_bytes() == CONTENT


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV])
def test_a_file_system_without_reservation_still_gets_the_file(tmp_path, monkeypatch, code):
    def refuse(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "posix_fallocate", refuse)
    write_atomic(tmp_path / "f.bin", PARTS)
    assert (tmp_path / "f.bin").read_bytes() == CONTENT


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_fails_before_writing_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def full(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "posix_fallocate", full)
    with pytest.raises(OSError) as err:
        write_atomic(path, [memoryview(b"x" * 10)] * 3)
    assert err.value.errno == code and err.value.filename == str(path)  # the user's path
    assert "30 bytes" in str(err.value)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left
