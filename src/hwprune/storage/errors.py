"""The storage package's error type (kept here so ``hwprune.errors`` stays untouched)."""

from ..errors import HwpruneError

__all__ = ["StorageError"]


class StorageError(HwpruneError):
    """A tensor cannot take an encoding, or a file is not an intact hwprune container.

    Loading raises it for every damaged, truncated, foreign or unsafe file, before any tensor
    is handed back: a model is loaded whole or not at all.
    """
