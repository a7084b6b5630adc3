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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HwpruneError
from ..files import write_atomic

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

FORMAT = "hwprune-run-checkpoint"
VERSION = 1


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
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint ``save_checkpoint`` wrote (tensors and plain containers only)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise HwpruneError(f"cannot read checkpoint {path}: {' '.join(str(e).split())}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise HwpruneError(f"{path} is not an hwprune run checkpoint")
    if state.get("version") != VERSION:
        raise HwpruneError(f"{path}: checkpoint version {state.get('version')}; this hwprune "
                           f"reads version {VERSION}")
    return state
