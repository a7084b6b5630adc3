"""The training loop of a run: epochs through the phases, a checkpoint after every epoch,
exact resume, SIGINT as a checkpointed stop, and DistributedDataParallel under torchrun.

Phases, in order (any may have 0 epochs):

1. ``dense``: the model trains alone (no pruner yet).
2. ``prune``: the pruner is created on the model as it is now (a pretrained or dense-trained
   model) and trains with it: ``loss + pruner.penalty()``, ``pruner.step()`` after every
   optimizer step, ``pruner.epoch_end()`` after every epoch.
3. ``finetune``: ``train.phase_hook`` is called on the pruner (default ``fix_pattern``: the
   pattern the method would keep is fixed, DPP stops sampling and PSP re-ranking, ADMM ends
   its ADMM phase), then training continues on the weights alone.

Every phase starts a fresh optimizer and LR schedule from ``pruner.param_groups()`` (a phase
switch may change the method's learnable parameters).

Exact resume: the checkpoint holds the position (epoch, step; see ``phases``), the model,
optimizer, scheduler and pruner states, the global RNG states and the running sums of the epoch
in progress. ``restore`` rebuilds the phase switches structurally (creating the pruner, calling
the hook), then loads every state. On CPU the resumed run is bitwise identical to an
uninterrupted one; on GPU, non-deterministic kernels (cuDNN autotuning, atomics) can make any
two runs differ unless ``torch.use_deterministic_algorithms(True)`` is set.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from .. import distributed
from ..errors import HwpruneError
from .build import Parts, make_optimizer, make_pruner
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .outdir import write_metrics
from .phases import PHASES, Plan

__all__ = ["Diverged", "Interrupted", "StopRequest", "TrainingLoop", "loss_correct"]


class Interrupted(HwpruneError):
    """The run stopped on SIGINT after writing a checkpoint (exit code 130)."""


class Diverged(HwpruneError):
    """The training loss became infinite or NaN; the last checkpoint (of the last completed
    epoch) is the last good state, and nothing is written after the step that diverged."""


def loss_correct(logits: Tensor, y: Tensor) -> tuple[Tensor, int, int]:
    """Cross-entropy, correct count and count; (B, T, V) sequence logits are flattened."""
    if logits.dim() == 3:
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    loss = F.cross_entropy(logits, y)
    return loss, int((logits.argmax(1) == y).sum()), y.numel()


class StopRequest:
    """Ctrl-C as a request: the step in progress finishes, a checkpoint is written, the loop
    raises ``Interrupted``. Distributed ranks agree on ``now`` at every step (all-reduce)."""

    def __init__(self) -> None:
        self.requested = False  # asked for in this process
        self.now = False  # stop after this step

    def request(self) -> None:
        """Ask for the stop (what SIGINT does); a second request stops at once."""
        if self.requested:  # a second Ctrl-C: stop now (the last checkpoint stays intact)
            raise KeyboardInterrupt
        self.requested = True
        # one process stops after this step; ranks stop together at the step whose
        # all-reduce (in TrainingLoop.train_step) first sees a request from any of them
        self.now = self.now or not distributed.is_distributed()
        # nothing more here: the handler may run in the middle of anything (even an import)
        sys.stderr.write("interrupt: finishing this step, then writing a checkpoint "
                         "(Ctrl-C again to stop at once)\n")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request()

    @contextmanager
    def on_sigint(self) -> Iterator[None]:
        """This handler for SIGINT while the block runs (signals reach the main thread only)."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_signal)
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def epoch_line(h: dict[str, Any], total: int) -> str:
    return (f"epoch {h['epoch']}/{total} ({h['phase']}): loss {h['train_loss']:.4f}, "
            f"train acc {h['train_accuracy']:.2%}, test acc {h['test_accuracy']:.2%}, "
            f"sparsity {h['sparsity']:.1%}, {h['seconds']:.1f}s")


def _new_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0, "seen": 0}


class TrainingLoop:
    """Trains ``parts.model`` through the recipe's phases; holds the pruner once it exists,
    the per-epoch history and the dense reference accuracy."""

    def __init__(self, cfg: dict[str, Any], parts: Parts, console: Console,
                 on_step: Callable[[int], object] | None = None):
        self.cfg, self.parts, self.console, self.on_step = cfg, parts, console, on_step
        self.model = parts.model
        self.plan = Plan(cfg, parts.data.train_x, parts.data.train_y, parts.augment)
        self.stop = StopRequest()
        self.pruner: Any = None
        self.phase: str | None = None
        self.history: list[dict[str, Any]] = []
        self.dense_accuracy: float | None = None
        self.ddp: nn.Module | None = None  # the DistributedDataParallel wrapper that trains
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) on the test split, in eval mode."""
        model = model or self.model
        was = model.training
        model.eval()
        bs = self.cfg["train"]["eval_batch_size"]
        x_all, y_all = self.parts.data.test_x, self.parts.data.test_y
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, len(x_all), bs):
            loss, c, n = loss_correct(model(x_all[i:i + bs]), y_all[i:i + bs])
            loss_sum, correct, seen = loss_sum + loss.item() * n, correct + c, seen + n
        model.train(was)
        return loss_sum / seen, correct / seen

    def enter(self, phase: str, fresh: bool) -> None:
        """Start ``phase``: create the pruner / call the hook, then a new optimizer."""
        if phase != "dense" and self.pruner is None and self.parts.method_cls is not None:
            trained = self.plan.epochs["dense"] > 0 or self.cfg["model"]["pretrained"]
            if fresh and trained:  # the reference the pruned model is compared with
                self.dense_accuracy = self.evaluate()[1]
            self.ddp = None  # DDP registers parameters at wrap time: wrap again below
            self.pruner = make_pruner(self.parts, self.model)
        hook = self.cfg["train"]["phase_hook"]
        if phase == "finetune" and self.pruner is not None and hook:
            getattr(self.pruner, hook)()  # one of the method's PHASE_HOOKS (recipe check)
        self.optimizer, self.scheduler = make_optimizer(
            self.cfg, phase, self.plan.epochs[phase], self.model, self.pruner)
        self.phase = phase
        self.ddp = distributed.wrap_ddp(self.model)  # after the pruner: its parameters too

    def state(self, epoch: int, step: int, running: dict[str, float]) -> dict[str, Any]:
        """What a checkpoint holds at (epoch, step)."""
        return {
            "epoch": epoch, "step": step, "phase": self.phase, "running": dict(running),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "rng": rng_state(), "history": list(self.history),
            "dense_accuracy": self.dense_accuracy,
        }

    def restore(self, ckpt: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
        """Replay the phase switches up to the checkpoint's phase, load every state; returns
        the position (epoch, step) and the running sums of the epoch in progress."""
        target = ckpt["phase"]
        for phase in PHASES[:PHASES.index(target) + 1]:  # replay the switches structurally
            if self.plan.epochs[phase] or phase == target:
                self.enter(phase, fresh=False)
        self.model.load_state_dict(ckpt["model"])
        if self.pruner is not None:
            self.pruner.load_state_dict(ckpt["pruner"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.history = list(ckpt["history"])
        self.dense_accuracy = ckpt["dense_accuracy"]
        return ckpt["epoch"], ckpt["step"], dict(ckpt["running"])

    def train(self, out: Path, resume: dict[str, Any] | None) -> None:
        """Run the epochs (from ``resume`` if given), checkpointing after each one."""
        epoch, start, running = 0, 0, _new_sums()
        if resume is not None:
            epoch, start, running = self.restore(resume)
        self._write_metrics(out)  # the header; after a resume, exactly the checkpoint's epochs
        total, per_epoch = self.plan.total_epochs, self.plan.steps_per_epoch()
        live = self.console.is_terminal
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console,
                            disable=not live, transient=False)
        with self.stop.on_sigint(), progress:
            epochs_bar = progress.add_task("epochs", total=total, completed=epoch, info="")
            steps_bar = progress.add_task("steps", total=per_epoch, info="")
            while epoch < total:
                phase = self.plan.phase_of(epoch)
                if phase != self.phase:
                    self.enter(phase, fresh=True)
                t0 = time.perf_counter()
                progress.reset(steps_bar, total=per_epoch, completed=start,
                               description=f"epoch {epoch + 1} ({phase})", info="")
                for step, x, y in self.plan.batches(epoch, start):
                    self.train_step(x, y, running)
                    # the running sum is non-finite from the first non-finite loss on; it is
                    # the all-reduced sum, so every rank of a distributed run stops together
                    if not math.isfinite(running["loss"]):
                        raise Diverged(self._diverged(out, epoch, step, running["loss"]))
                    if self.on_step is not None:
                        self.on_step(epoch * per_epoch + step + 1)
                    if live:
                        progress.update(steps_bar, completed=step + 1, info=(
                            f"loss {running['loss'] / running['seen']:.3f}  "
                            f"acc {running['correct'] / running['seen']:.1%}"))
                    if self.stop.now:
                        self._save_checkpoint(out, self.state(epoch, step + 1, running))
                        raise Interrupted(
                            f"interrupted at epoch {epoch + 1}, step {step + 1}; checkpoint "
                            f"written to {out / 'checkpoint.pt'}: continue with --resume")
                self.end_epoch(epoch, running, time.perf_counter() - t0)
                epoch, start, running = epoch + 1, 0, _new_sums()
                self._save_checkpoint(out, self.state(epoch, 0, running))
                self._write_metrics(out)
                progress.update(epochs_bar, completed=epoch,
                                info=f"test acc {self.history[-1]['test_accuracy']:.2%}  "
                                     f"sparsity {self.history[-1]['sparsity']:.1%}")
                if not live:
                    self.console.print(epoch_line(self.history[-1], total), soft_wrap=True)
                if self.stop.now:
                    raise Interrupted(f"interrupted after epoch {epoch}; checkpoint written "
                                      f"to {out / 'checkpoint.pt'}: continue with --resume")

    def train_step(self, x: Tensor, y: Tensor, running: dict[str, float]) -> None:
        """One optimizer step on the global batch (x, y); adds to the running sums."""
        self.model.train()
        x, y = distributed.shard(x, y)  # the batch is global: each rank trains on its rows
        loss, correct, n = loss_correct((self.ddp or self.model)(x), y)
        if self.pruner is not None:
            loss = loss + self.pruner.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.pruner is not None:
            self.pruner.step()
        loss_sum = loss.item() * n
        if distributed.is_distributed():  # the sums of the global batch, the stop agreed
            loss_sum, correct, n, stop = distributed.all_reduce_sum(
                [loss_sum, correct, n, self.stop.requested])
            correct, n, self.stop.now = int(correct), int(n), stop > 0
        running["loss"] += loss_sum
        running["correct"] += correct
        running["seen"] += n

    def end_epoch(self, epoch: int, running: dict[str, float], seconds: float) -> None:
        """The pruner's and the scheduler's epoch end, evaluation, the history record."""
        # BatchNorm statistics of the last step are rank-local: take rank 0's, as DDP does
        # before each forward, so every rank evaluates (and finishes with) the same model
        distributed.broadcast_tensors(list(self.model.buffers()))
        if self.pruner is not None:
            self.pruner.epoch_end()
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # a run resumed at an epoch's last step steps the scheduler before the (restored)
            # optimizer has stepped in this process; the order in the run was right
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()
        test_loss, test_acc = self.evaluate()
        self.history.append({
            "epoch": epoch + 1, "phase": self.phase, "lr": lr,
            "train_loss": running["loss"] / max(running["seen"], 1),
            "train_accuracy": running["correct"] / max(running["seen"], 1),
            "test_loss": test_loss, "test_accuracy": test_acc,
            "sparsity": self.pruner.sparsity() if self.pruner is not None else 0.0,
            "steps": (epoch + 1) * self.plan.steps_per_epoch(), "seconds": round(seconds, 3),
        })

    def _diverged(self, out: Path, epoch: int, step: int, loss: float) -> str:
        ckpt = out / "checkpoint.pt"
        kept = (f"{ckpt} (written before this step) is kept" if ckpt.is_file()
                else "no checkpoint was written before it")
        return (f"training loss became {'NaN' if math.isnan(loss) else 'infinite'} at epoch "
                f"{epoch + 1}, step {step + 1} ({self.phase} phase); {kept}; lower "
                "optimizer.lr (or finetune_lr) and start over with --force")

    def _save_checkpoint(self, out: Path, state: dict[str, Any]) -> None:
        if distributed.is_main():  # the other ranks hold the same state
            save_checkpoint(out / "checkpoint.pt", state)

    def _write_metrics(self, out: Path) -> None:
        if distributed.is_main():
            write_metrics(out, self.history)
