"""Run a resolved recipe: build, train through the phases, checkpoint, finish, write results.

``Run(cfg).execute(out)``. Everything a recipe can get wrong (the data folder, the model, the
pretrained checkpoint, every method parameter) is checked in ``Run(cfg)``, by building the real
objects, *before* the output folder is touched.

``Run`` ties the parts together, each in its own module: ``build`` (data, model, pruner,
optimizer), ``loop`` (the phases, checkpoints, resume, SIGINT, DDP), ``finish`` (finalize,
shrink, report, save, plots, latency) and ``outdir`` (the output folder's files and rules).
"""

from __future__ import annotations

import copy
import gc
import json
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import Tensor, nn

from .. import distributed
from .build import build
from .finish import finish
from .loop import Diverged, Interrupted, TrainingLoop
from .machine import machine
from .outdir import (
    RESULT_FILES,
    check_flags,
    check_same_recipe,
    prepare_out,
    run_status,
    write_json,
)
from .outputs import output_folder
from .recipe import dump
from .runlock import RunLock

__all__ = ["Diverged", "Run", "RESULT_FILES", "Interrupted"]


class Run:
    """One recipe run. Building it validates everything; ``execute`` writes the results."""

    def __init__(self, cfg: dict[str, Any], console: Console | None = None,
                 on_step: Callable[[int], object] | None = None):
        """``on_step``: called with the global step after every step (tests, hooks)."""
        self.cfg = copy.deepcopy(cfg)
        self.console = console or Console()
        # under torchrun (the runner trains on the CPU); close() ends what this started
        self._owns_group = distributed.init_from_env("gloo")
        if not distributed.is_main():
            self.console.quiet = True  # rank 0 speaks for the run
        self.parts = build(self.cfg)
        self.loop = TrainingLoop(self.cfg, self.parts, self.console, on_step)
        self.model: nn.Module = self.parts.model  # trained, then finalized, in place
        self.example: Tensor = self.parts.example
        d = self.parts.data
        self.train_x, self.train_y, self.test_x, self.test_y = (
            d.train_x, d.train_y, d.test_x, d.test_y)

    # -- what tests, the CLI and the report read ---------------------------------------------------
    @property
    def pruner(self) -> Any:
        """The method's pruner once the prune phase has started (None before, and in a dense
        run)."""
        return self.loop.pruner

    @property
    def history(self) -> list[dict[str, Any]]:
        """The per-epoch records (``metrics.jsonl``)."""
        return self.loop.history

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Bring the run to the state of ``checkpoint`` (a run's ``checkpoint.pt``, loaded):
        the phase switches replayed, model, pruner, optimizer and history loaded."""
        self.loop.restore(checkpoint)

    def request_stop(self) -> None:
        """What SIGINT does: finish the current step, write a checkpoint, raise Interrupted."""
        self.loop.stop.request()

    # -- the whole run ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the distributed state: the DDP wrapper, then (under torchrun) the process
        group this run initialised. Call it once the run is over, on every rank."""
        self.loop.ddp = None
        gc.collect()  # DDP's reducer must be gone before its process group
        if self._owns_group:
            distributed.shutdown()

    def execute(self, out: str | Path, resume: bool = False, force: bool = False,
                command: str | None = None) -> dict[str, Any]:
        """Write the run into ``out``; returns the summary. See ``prepare_out`` for the rules
        on existing folders; ``out`` is locked (``RunLock``) for the whole call, so a second
        writer is refused.

        Distributed (under torchrun): only rank 0 reads and writes ``out``; the other ranks get
        its checkpoint (or its error) by broadcast, train their shards, finalize their pruner
        (so their ``model`` holds the same pruned weights) and return rank 0's summary.
        """
        out = Path(out)
        check_flags(out, resume, force)  # before anything is read or deleted
        info = {"command": command or " ".join(["hwprune", *sys.argv[1:]]),
                "machine": machine()}
        if distributed.world_size() > 1:
            info["world_size"] = distributed.world_size()
        status = {"status": "running", "name": self.cfg["name"], **info}

        lock = RunLock(out)
        created = not out.exists()  # removed again if the run is refused before writing

        def start() -> tuple[bool, Any]:
            """(finished, its summary) or (not finished, the checkpoint to resume from)."""
            output_folder("--out", out)  # a file there is named as one, not as a run
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()  # held until the run ends: one writer per folder
            if lock.stale:
                self.console.print(f"took over the stale lock of {lock.stale} in {out}",
                                   markup=False)
            if resume and run_status(out) == "finished":
                check_same_recipe(out, self.cfg)  # never another recipe's numbers as these
                self.console.print(f"{out} holds a finished run; nothing to resume", markup=False)
                return True, json.loads((out / "summary.json").read_text())
            ckpt = prepare_out(out, self.cfg, resume, force)
            if ckpt is None:
                (out / "recipe.yaml").write_text(dump(self.cfg))
            write_json(out / "run.json", status)
            return False, ckpt

        try:
            return self._train_and_finish(out, start, status, info)
        finally:
            if distributed.is_main():
                lock.release()
                if created:
                    with suppress(OSError):  # only an empty folder: a refused run wrote nothing
                        out.rmdir()

    def _train_and_finish(self, out: Path, start: Callable[[], tuple[bool, Any]],
                          status: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        def end(seconds: float) -> dict[str, Any]:
            summary = finish(self.loop, out, {**info, "seconds": seconds}, self.console)
            write_json(out / "run.json", {**status, "status": "finished"})
            return summary

        finished, ckpt = distributed.main_only(start)
        if finished:
            return ckpt
        t0 = time.perf_counter()
        try:
            self.loop.train(out, ckpt)
        except Interrupted:
            if distributed.is_main():
                write_json(out / "run.json", {**status, "status": "interrupted"})
            raise
        except Diverged as e:
            if distributed.is_main():
                write_json(out / "run.json", {**status, "status": "failed", "error": str(e)})
            raise
        if not distributed.is_main() and self.pruner is not None and self.cfg["end"]["finalize"]:
            # rank 0 finalizes in finish(); finalize's collectives (ADMM's hard_project) pair up
            self.pruner.finalize()
        return distributed.main_only(end, round(time.perf_counter() - t0, 2))
