"""Where the CLI writes: output paths checked before any work, so that a wrong path is one line
that says what is wrong with it (a file where a folder must be, a folder where a file must be)
instead of the operating system's bare "File exists" or "Not a directory" after minutes of work.

Whatever else the operating system refuses (no permission, a read-only or full disk) still
reaches ``hwprune.app.cli.main``, which prints it as one line naming the path and the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

__all__ = ["output_file", "output_folder", "os_error_line"]


def _file_above(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (None: there is none)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def output_folder(flag: str, path: str | Path) -> Path:
    """``path`` as a folder to write into: it must be a folder or not exist yet, below a
    folder (``ConfigError`` naming ``flag`` otherwise)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; allowed: a folder or a path "
                          "that does not exist yet")
    above = _file_above(path)
    if above is not None:
        raise ConfigError(f"{flag} {path}: {above} is a file, not a folder")
    return path


def output_file(flag: str, path: str | Path) -> Path:
    """``path`` as a file to write: it must not be a folder, and it must sit below a folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; allowed: a file name")
    above = _file_above(path)
    if above is not None:
        raise ConfigError(f"{flag} {path}: {above} is a file, not a folder")
    return path


def os_error_line(e: OSError) -> str:
    """One line for an ``OSError``: the path(s) it names and the cause in words."""
    cause = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    if not paths:
        return cause or type(e).__name__
    return f"{' -> '.join(paths)}: {cause}"
