"""One writer per run folder: ``RunLock`` holds ``OUT/.hwprune.lock`` while a run reads or
writes the folder, and a second ``hwprune run`` into it is refused with one line.

The lock is an exclusive ``flock`` on the lock file, which the kernel releases when its owner
ends in any way (exit, crash, SIGKILL): a lock file left behind by a process that is gone is
stale, and the next run takes it over. The file holds the owner's pid and host, so the refusal
names who holds the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from contextlib import suppress
from pathlib import Path

from ..errors import ConfigError

__all__ = ["LOCK_NAME", "RunLock"]

#: the lock file in a run folder (not a result file: --force leaves it to its owner)
LOCK_NAME = ".hwprune.lock"


def owner_text(path: Path) -> str:
    """Who a lock file names: 'pid N on host H', or what is wrong with it."""
    try:
        owner = json.loads(path.read_text())
        return f"pid {int(owner['pid'])} on host {owner['host']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "an unknown owner"


class RunLock:
    """The lock on one run folder; ``acquire`` before reading or changing it, ``release`` when
    done (also after an error). ``stale``: the owner a stale lock named, once taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None
        self.stale: str | None = None

    def acquire(self) -> None:
        """Take the lock (the folder must exist); a ``ConfigError`` if a live run holds it."""
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"--out {self.path.parent}: cannot lock {self.path} "
                                      f"({e.strerror}); allowed: a folder on a file system "
                                      "with file locks") from None
                raise ConfigError(
                    f"--out {self.path.parent} is in use by another hwprune run "
                    f"({owner_text(self.path)}); wait for it to end, or choose another --out"
                ) from None
            if not self._still_at_path(fd):  # its owner removed it while we waited: again
                os.close(fd)
                continue
            previous = os.read(fd, 4096)
            if previous:  # a lock file whose owner is gone without removing it
                self.stale = owner_text(self.path)
            os.ftruncate(fd, 0)
            # who holds it, for the message a second writer gets; the flock is the lock, so
            # the text needs no fsync (a crash ends the owner and its flock alike)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
                      .encode(), 0)
            self.fd = fd

    def _still_at_path(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing if it is not held)."""
        if self.fd is None:
            return
        with suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiting run then makes a new file
        os.close(self.fd)
        self.fd = None
