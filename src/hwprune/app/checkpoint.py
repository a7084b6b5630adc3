"""Run checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one ``torch.save`` file holding plain containers and tensors only (it loads with
``torch.load(weights_only=True)``: nothing is unpickled but tensors): the model's, optimizer's,
LR scheduler's and pruner's ``state_dict()``, the RNG states (torch, numpy, python), the
position (completed epochs, steps into the current epoch, the phase) and the metrics so far.

Writes are atomic (a temporary file beside the target, fsync, then rename), so a crash or a
second Ctrl-C while saving leaves the previous checkpoint intact, never a half-written one.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HwpruneError
from ..files import write_atomic

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state"]

FORMAT = "hwprune-run-checkpoint"
VERSION = 1
#: the first bytes of a torch.save file (a zip archive)
_ZIP = b"PK\x03\x04"


class CheckpointError(HwpruneError):
    """A run checkpoint cannot be written or read (named, with the cause)."""


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain containers and tensors) to ``path`` atomically."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())
    except OSError as e:  # the temporary file's name would mislead: name the checkpoint
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint yet"
        raise CheckpointError(f"cannot write checkpoint {path}: "
                              f"{e.strerror or e}; {kept}") from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint ``save_checkpoint`` wrote (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot read checkpoint {path}: no such file")
    with path.open("rb") as f:  # torch's own messages for a damaged archive say nothing
        head = f.read(len(_ZIP))
    if head != _ZIP:
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch.save archive "
                              f"({path.stat().st_size} bytes, starting {head!r}); allowed: "
                              "the checkpoint.pt of a run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: {_damage(path, e)}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hwprune run checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}; this "
                              f"hwprune reads version {VERSION}")
    return state


def _damage(path: Path, e: Exception) -> str:
    """What is wrong with an archive ``torch.load`` refused, in words."""
    if not zipfile.is_zipfile(path):  # the archive's directory at its end is missing
        return (f"the file is truncated or damaged ({path.stat().st_size} bytes, and the "
                "archive directory a complete file ends with is missing)")
    detail = " ".join(str(e).split())
    return f"the archive is damaged ({type(e).__name__}: {detail})"
