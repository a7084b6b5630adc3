"""The model behind saved work, for the commands that read it (``report``, ``shrink``,
``export``).

What a command is given (``CKPT``) is one of:

* a run folder written by ``hwprune run``, or its ``checkpoint.pt``: the run is rebuilt from
  the folder's ``recipe.yaml`` and the checkpoint (data, model, pruner and history as they
  stood; nothing is trained or written);
* a file ``hwprune.save`` wrote (``model.hwp``): its tensors, and with ``--model NAME`` a zoo
  model (default arguments) holding them, fed examples of ``--input-shape``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["Saved", "load_saved", "add_model_arguments", "parse_shape", "zoo_model"]

#: the first bytes of a torch.save file (a zip archive): a run checkpoint, not an .hwp file
_ZIP = b"PK\x03\x04"


@dataclass
class Saved:
    """What ``load_saved`` found. ``run``: the rebuilt run (a run folder or checkpoint), else
    None; ``state``: an .hwp file's tensors, else None; ``model`` and ``example``: the model
    (the run's, or the zoo model holding the tensors) and one batch of inputs, None for an
    .hwp file read without ``--model``; ``name``: what the outputs call it."""

    name: str
    model: nn.Module | None = None
    example: Tensor | None = None
    run: Any = None
    state: dict[str, Tensor] | None = None


def load_saved(ckpt: str | Path, command: str, model: str | None = None,
               input_shape: str = "3,32,32") -> Saved:
    """The saved work at ``ckpt`` (see the module doc); errors name ``command``."""
    path = Path(ckpt)
    if path.is_dir():
        if not (path / "checkpoint.pt").is_file():
            raise ConfigError(f"{command}: {path} is a folder without checkpoint.pt; allowed: "
                              "a run folder of 'hwprune run', its checkpoint.pt, or a .hwp file")
        path = path / "checkpoint.pt"
    elif not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"{command}: {path} {what}; allowed: a .hwp file, a run folder "
                          "or its checkpoint.pt")
    with path.open("rb") as f:
        is_checkpoint = f.read(len(_ZIP)) == _ZIP
    if is_checkpoint:
        if model is not None:
            raise ConfigError(f"{command}: --model applies to .hwp files; a run checkpoint "
                              "names its model in the run's recipe.yaml")
        run = _rebuild_run(path, command)
        return Saved(run.cfg["name"], run.model, run.example, run=run)
    from ..storage import load

    state = load(path)  # StorageError (one line) for anything but an intact hwprune file
    if model is None:
        return Saved(path.name, state=state)
    example = torch.zeros(1, *parse_shape(input_shape, command))
    return Saved(f"{path.name} ({model})", zoo_model(model, state, command), example,
                 state=state)


def add_model_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    """``--model`` and ``--input-shape``, what ``load_saved`` takes for an .hwp file."""
    p.add_argument("--model", metavar="NAME", help=model_help)
    p.add_argument("--input-shape", metavar="SHAPE", default="3,32,32",
                   help="with --model: one example's shape, comma-separated (default 3,32,32)")


def parse_shape(text: str, command: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``: one example's shape, positive ints."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ConfigError(f"{command}: --input-shape must be positive ints separated by commas "
                          f"(e.g. 3,32,32); got {text!r}")
    return shape


def zoo_model(name: str, state: dict[str, Tensor], command: str) -> nn.Module:
    """The zoo model ``name`` (default arguments) holding ``state``, in eval mode."""
    from ..models import MODELS

    if name not in MODELS:
        raise ConfigError(f"{command}: --model {name!r} is not a zoo model; allowed: "
                          f"{', '.join(sorted(MODELS))}")
    net = MODELS[name]()
    mine = net.state_dict()
    bad = sorted(set(mine) ^ set(state)) + sorted(
        k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if bad:
        raise ConfigError(f"{command}: the file's tensors do not fit --model {name} (default "
                          f"arguments; a shrunk model has other shapes): {', '.join(bad[:4])}"
                          f"{', ...' if len(bad) > 4 else ''}")
    net.load_state_dict(state)
    return net.eval()


def _rebuild_run(checkpoint: Path, command: str) -> Any:
    """The run of ``checkpoint``'s folder, rebuilt from its recipe.yaml and brought to the
    checkpoint's state."""
    from .checkpoint import load_checkpoint
    from .recipe import load_recipe
    from .runner import Run

    recipe = checkpoint.parent / "recipe.yaml"
    if not recipe.is_file():
        raise ConfigError(f"{command}: {checkpoint} has no recipe.yaml beside it; a run "
                          "checkpoint is read together with the recipe of its run folder")
    state = load_checkpoint(checkpoint)
    run = Run(load_recipe(str(recipe)), console=Console(quiet=True))
    run.restore(state)
    return run
