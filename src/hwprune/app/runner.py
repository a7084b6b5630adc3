"""Run a resolved recipe: build, train through the phases, checkpoint, finish, write results.

``Run(cfg).execute(out)``. Everything a recipe can get wrong (the data folder, the model, the
pretrained checkpoint, every method parameter) is checked in ``Run(cfg)``, by building the real
objects, *before* the output folder is touched.

Phases, in order (any may have 0 epochs):

1. ``dense``: the model trains alone (no pruner yet).
2. ``prune``: the pruner is created on the model as it is now (a pretrained or dense-trained
   model) and trains with it: ``loss + pruner.penalty()``, ``pruner.step()`` after every
   optimizer step, ``pruner.epoch_end()`` after every epoch.
3. ``finetune``: ``train.phase_hook`` is called on the pruner if it has that method (default
   ``hard_project``: ADMM ends its ADMM phase and fixes the pattern), then training continues.

Every phase starts a fresh optimizer and LR schedule from ``pruner.param_groups()`` (a phase
switch may change the method's learnable parameters).

Exact resume. Batches are drawn from a permutation seeded by ``(seed, epoch)`` and augmentation
by ``(seed, epoch, step)``, so a run's position is just (epoch, step); the checkpoint adds the
model, optimizer, scheduler and pruner states, the global RNG states and the running sums of
the epoch in progress. On SIGINT the current step finishes, a checkpoint is written, and the
process exits with code 130; ``--resume`` rebuilds the run (replaying the phase switches
structurally: creating the pruner, calling the hook), then loads every state and continues at
that step. On CPU the resumed run is bitwise identical to an uninterrupted one. On GPU,
non-deterministic kernels (cuDNN autotuning, atomics) can make any two runs differ; set
``torch.use_deterministic_algorithms(True)`` for the same guarantee there.
"""

from __future__ import annotations

import copy
import csv
import gc
import json
import math
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from .. import data as hdata
from .. import distributed
from .. import models as hmodels
from ..errors import ConfigError, HwpruneError
from ..training import recalibrate_batchnorm
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .machine import machine
from .recipe import RecipeError, dump, import_factory, method_class, method_kwargs

__all__ = ["Run", "RESULT_FILES", "Interrupted"]

PHASES = ("dense", "prune", "finetune")
#: what a run writes into its output folder (``--force`` removes exactly these)
RESULT_FILES = ("recipe.yaml", "run.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt",
                "report.md", "report.json", "summary.json", "model.hwp", "plots")
METRIC_FIELDS = ("epoch", "phase", "lr", "train_loss", "train_accuracy", "test_loss",
                 "test_accuracy", "sparsity", "steps", "seconds")
#: data sets read from the data folder with ``hwprune.data.load_<name>(root, train)``
_FOLDER_DATA = {"cifar10": "load_cifar10", "mnist": "load_mnist"}


class Interrupted(HwpruneError):
    """The run stopped on SIGINT after writing a checkpoint (exit code 130)."""


def _field_error(field: str, e: Exception) -> RecipeError:
    return RecipeError(f"recipe field {field}: {' '.join(str(e).split())}")


def _loss_correct(logits: Tensor, y: Tensor) -> tuple[Tensor, int, int]:
    """Cross-entropy, correct count and count; (B, T, V) sequence logits are flattened."""
    if logits.dim() == 3:
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    loss = F.cross_entropy(logits, y)
    return loss, int((logits.argmax(1) == y).sum()), y.numel()


class Run:
    """One recipe run. Building it validates everything; ``execute`` writes the results."""

    def __init__(self, cfg: dict[str, Any], console: Console | None = None,
                 on_step: Callable[[int], object] | None = None):
        self.cfg = copy.deepcopy(cfg)
        self.console = console or Console()
        self.on_step = on_step  # called with the global step after every step (tests, hooks)
        self._stop = False
        self._stop_requested = False  # by SIGINT; distributed ranks agree on _stop per step
        # under torchrun (the runner trains on the CPU); close() ends what this started
        self._owns_group = distributed.init_from_env("gloo")
        if not distributed.is_main():
            self.console.quiet = True  # rank 0 speaks for the run
        self.ddp: nn.Module | None = None  # the DistributedDataParallel wrapper that trains
        self._build()

    # -- building (validation) -------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg["seed"])
        self.train_x, self.train_y, self.test_x, self.test_y, info = self._load_data()
        self.factory = self._factory()
        args = cfg["model"]["args"]
        for key, value in info.items():  # e.g. the vocabulary size of a text data set
            if key not in args and key in self._factory_params():
                args[key] = value
        self.model = self._new_model()
        if cfg["model"]["pretrained"]:
            self._load_pretrained(self.model, cfg["model"]["pretrained"])
        self.example = self.test_x[:1]
        self.method_cls = method_class(cfg["method"]["name"]) if cfg["method"] else None
        self.method_kwargs = method_kwargs(cfg["method"]) if cfg["method"] else {}
        if self.method_cls is not None:  # every method parameter is checked here, on a copy
            self._make_pruner(copy.deepcopy(self.model))
        self.pruner = None
        self.phase: str | None = None
        self.history: list[dict[str, Any]] = []
        self.dense_accuracy: float | None = None

    def _data_root(self) -> Path:
        try:
            return hdata.data_dir(self.cfg["data"]["dir"])
        except HwpruneError as e:
            raise _field_error("data.dir", e) from None

    def _load_data(self) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        d = self.cfg["data"]
        name = d["name"]
        info: dict[str, Any] = {}
        try:
            if name == "digits":
                train, test = hdata.load_digits(seed=self.cfg["seed"])
            elif name == "tinyshakespeare" and hasattr(hdata, "load_tinyshakespeare"):
                train, test, vocab = self._text(hdata.load_tinyshakespeare(self._data_root()))
                info["vocab_size"] = vocab
            else:
                loader = getattr(hdata, _FOLDER_DATA.get(name, f"load_{name}"), None)
                if loader is None:
                    known = ["digits", *_FOLDER_DATA] + (
                        ["tinyshakespeare"] if hasattr(hdata, "load_tinyshakespeare") else [])
                    raise RecipeError(f"recipe field data.name: got {name!r}; allowed: "
                                      f"{', '.join(known)} (or any hwprune.data.load_<name>)")
                root = self._data_root()
                train, test = loader(root, train=True), loader(root, train=False)
        except RecipeError:
            raise
        except HwpruneError as e:
            raise _field_error("data", e) from None
        tensors = []
        for split, ds in (("train", train), ("test", test)):
            if not hasattr(ds, "tensors") or len(ds.tensors) != 2:
                raise RecipeError(f"recipe field data.name: {name!r} gave a {split} set of "
                                  f"{type(ds).__name__}; allowed: a TensorDataset of (x, y)")
            x, y = ds.tensors
            n = d[f"{split}_subset"]
            if n is not None and n < len(x):
                g = torch.Generator().manual_seed(self.cfg["seed"] + (split == "test"))
                idx = torch.randperm(len(x), generator=g)[:n].sort().values
                x, y = x[idx], y[idx]
            tensors += [x, y]
        if y.dim() == 1 and "num_classes" not in info and name != "tinyshakespeare":
            info["num_classes"] = int(max(int(tensors[1].max()), int(tensors[3].max())) + 1)
        return (*tensors, info)

    def _text(self, loaded: tuple[Tensor, Tensor, str]) -> tuple[Any, Any, int]:
        """A character stream -> non-overlapping (seq_len) windows of next-character targets."""
        from torch.utils.data import TensorDataset

        train_ids, val_ids, vocab = loaded
        t = self.cfg["data"]["seq_len"]

        def windows(ids: Tensor) -> TensorDataset:
            n = (len(ids) - 1) // t
            if n < 1:
                raise RecipeError(f"recipe field data.seq_len: got {t}; allowed: < {len(ids)}")
            return TensorDataset(ids[:n * t].view(n, t), ids[1:n * t + 1].view(n, t))

        return windows(train_ids), windows(val_ids), len(vocab)

    def _factory(self) -> Callable[..., nn.Module]:
        name = self.cfg["model"]["name"]
        if ":" in name:
            return import_factory(name)
        if name not in hmodels.MODELS:
            raise RecipeError(f"recipe field model.name: got {name!r}; allowed: "
                              f"{', '.join(sorted(hmodels.MODELS))}, or 'package.module:factory'")
        return hmodels.MODELS[name]

    def _factory_params(self) -> set[str]:
        import inspect

        try:
            return set(inspect.signature(self.factory).parameters)
        except (TypeError, ValueError):
            return set()

    def _new_model(self) -> nn.Module:
        try:
            model = self.factory(**self.cfg["model"]["args"])
        except (TypeError, ValueError) as e:
            raise _field_error("model.args", e) from None
        if not isinstance(model, nn.Module):
            raise RecipeError(f"recipe field model.name: {self.cfg['model']['name']!r} returned "
                              f"{type(model).__name__}; allowed: a factory of torch.nn.Module")
        return model

    def _load_pretrained(self, model: nn.Module, spec: str) -> None:
        path = Path(spec).expanduser()
        if not path.is_absolute() and not path.is_file():
            path = self._data_root() / spec
        if not path.is_file():
            raise RecipeError(f"recipe field model.pretrained: got {spec!r}; no such file "
                              "(relative paths are looked up in the working folder, then in "
                              "data.dir)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign files
            raise _field_error("model.pretrained", e) from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise RecipeError(f"recipe field model.pretrained: {spec} holds "
                              f"{type(obj).__name__}; allowed: a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        mine = model.state_dict()
        # checkpoints from older PyTorch lack BatchNorm's step counter; it is not a weight
        missing = sorted(k for k in set(mine) - set(state)
                         if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(state) - set(mine))
        shapes = [k for k in set(mine) & set(state) if tuple(mine[k].shape) != tuple(
            getattr(state[k], "shape", ()))]
        if missing or unexpected or shapes:
            what = "; ".join(f"{label} {len(keys)} ({', '.join(keys[:3])}"
                             f"{', ...' if len(keys) > 3 else ''})"
                             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                 ("shape mismatch", sorted(shapes))) if keys)
            raise RecipeError(f"recipe field model.pretrained: {spec} does not fit model "
                              f"{self.cfg['model']['name']}: {what}")
        model.load_state_dict(state, strict=False)  # every key but the counters was checked

    def _make_pruner(self, model: nn.Module) -> Any:
        try:
            return self.method_cls(model, **self.method_kwargs)
        except HwpruneError as e:
            raise _field_error(f"method ({self.method_cls.__name__})", e) from None
        except TypeError as e:
            raise _field_error(f"method ({self.method_cls.__name__})", e) from None

    # -- the schedule ----------------------------------------------------------------------------
    def _epochs(self) -> dict[str, int]:
        t = self.cfg["train"]
        return {p: t[f"{p}_epochs"] for p in PHASES}

    @property
    def total_epochs(self) -> int:
        return sum(self._epochs().values())

    def _phase_of(self, epoch: int) -> str:
        end = 0
        for phase, n in self._epochs().items():
            end += n
            if epoch < end:
                return phase
        raise AssertionError(epoch)

    def _phase_epoch(self, epoch: int) -> int:
        """Epochs of ``epoch``'s phase that come before it."""
        start = 0
        for phase, n in self._epochs().items():
            if phase == self._phase_of(epoch):
                return epoch - start
            start += n
        raise AssertionError(epoch)

    def steps_per_epoch(self) -> int:
        n, bs = len(self.train_x), self.cfg["train"]["batch_size"]
        steps = n // bs if n % bs == 1 else math.ceil(n / bs)  # no batch of 1 (BatchNorm)
        cap = self.cfg["train"]["steps_per_epoch"]
        return min(steps, cap) if cap else steps

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        seed, bs = self.cfg["seed"], self.cfg["train"]["batch_size"]
        perm = torch.randperm(len(self.train_x),
                              generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for step in range(start, self.steps_per_epoch()):
            idx = perm[step * bs:(step + 1) * bs]
            x, y = self.train_x[idx], self.train_y[idx]
            if self.cfg["data"]["augment"]:
                g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + step)
                x = hdata.augment_cifar(x, generator=g)
            yield step, x, y

    def _enter(self, phase: str, fresh: bool) -> None:
        """Start ``phase``: create the pruner / call the hook, then a new optimizer."""
        if phase != "dense" and self.pruner is None and self.method_cls is not None:
            trained = self._epochs()["dense"] > 0 or self.cfg["model"]["pretrained"]
            if fresh and trained:  # the reference the pruned model is compared with
                self.dense_accuracy = self.evaluate()[1]
            self.ddp = None  # DDP registers parameters at wrap time: wrap again below
            self.pruner = self._make_pruner(self.model)
        hook = self.cfg["train"]["phase_hook"]
        if phase == "finetune" and self.pruner is not None and hook:
            fn = getattr(self.pruner, hook, None)
            if callable(fn):
                fn()
        o = self.cfg["optimizer"]
        lr = o["finetune_lr"] if phase == "finetune" and o["finetune_lr"] else o["lr"]
        settings: dict[str, Any] = {"lr": lr, "weight_decay": o["weight_decay"]}
        if o["name"] == "sgd":
            settings.update(momentum=o["momentum"], nesterov=o["nesterov"])
        if self.pruner is not None:
            groups = self.pruner.param_groups(**settings)
        else:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad],
                       **settings}]
        opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                   "adamw": torch.optim.AdamW}[o["name"]]
        self.optimizer = opt_cls(groups, lr=lr)
        n = self._epochs()[phase]
        if o["lr_schedule"] == "cosine":
            self.scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, n)
        elif o["lr_schedule"] == "step":
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, o["milestones"], o["gamma"])
        else:
            self.scheduler = torch.optim.lr_scheduler.ConstantLR(self.optimizer, 1.0, 0)
        self.phase = phase
        self.ddp = distributed.wrap_ddp(self.model)  # after the pruner: its parameters too

    # -- training --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) on the test split, in eval mode."""
        model = model or self.model
        was = model.training
        model.eval()
        bs = self.cfg["train"]["eval_batch_size"]
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, len(self.test_x), bs):
            loss, c, n = _loss_correct(model(self.test_x[i:i + bs]), self.test_y[i:i + bs])
            loss_sum, correct, seen = loss_sum + loss.item() * n, correct + c, seen + n
        model.train(was)
        return loss_sum / seen, correct / seen

    def _state(self, epoch: int, step: int, running: dict[str, float]) -> dict[str, Any]:
        return {
            "epoch": epoch, "step": step, "phase": self.phase, "running": dict(running),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "rng": rng_state(), "history": list(self.history),
            "dense_accuracy": self.dense_accuracy,
        }

    def _restore(self, ckpt: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
        target = ckpt["phase"]
        for phase in PHASES[:PHASES.index(target) + 1]:  # replay the switches structurally
            if self._epochs()[phase] or phase == target:
                self._enter(phase, fresh=False)
        self.model.load_state_dict(ckpt["model"])
        if self.pruner is not None:
            self.pruner.load_state_dict(ckpt["pruner"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.history = list(ckpt["history"])
        self.dense_accuracy = ckpt["dense_accuracy"]
        return ckpt["epoch"], ckpt["step"], dict(ckpt["running"])

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # a second Ctrl-C: stop now (the last checkpoint stays intact)
            raise KeyboardInterrupt
        self._stop_requested = True
        # one process stops after this step; ranks stop together at the step whose
        # all-reduce (in _train_step) first sees a request from any of them
        self._stop = self._stop or not distributed.is_distributed()
        # nothing more here: the handler may run in the middle of anything (even an import)
        sys.stderr.write("interrupt: finishing this step, then writing a checkpoint "
                         "(Ctrl-C again to stop at once)\n")

    def train(self, out: Path, resume: dict[str, Any] | None) -> None:
        """Run the epochs (from ``resume`` if given), checkpointing after each one."""
        epoch, start, running = 0, 0, {"loss": 0.0, "correct": 0, "seen": 0}
        if resume is not None:
            epoch, start, running = self._restore(resume)
        self._write_metrics(out)  # the header; after a resume, exactly the checkpoint's epochs
        total, per_epoch = self.total_epochs, self.steps_per_epoch()
        live = self.console.is_terminal
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console,
                            disable=not live, transient=False)
        previous = None
        if threading_main():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with progress:
                epochs_bar = progress.add_task("epochs", total=total, completed=epoch, info="")
                steps_bar = progress.add_task("steps", total=per_epoch, info="")
                while epoch < total:
                    phase = self._phase_of(epoch)
                    if phase != self.phase:
                        self._enter(phase, fresh=True)
                    t0 = time.perf_counter()
                    progress.reset(steps_bar, total=per_epoch, completed=start,
                                   description=f"epoch {epoch + 1} ({phase})", info="")
                    for step, x, y in self._batches(epoch, start):
                        self._train_step(x, y, running)
                        global_step = epoch * per_epoch + step + 1
                        if self.on_step is not None:
                            self.on_step(global_step)
                        if live:
                            progress.update(steps_bar, completed=step + 1, info=(
                                f"loss {running['loss'] / running['seen']:.3f}  "
                                f"acc {running['correct'] / running['seen']:.1%}"))
                        if self._stop:
                            self._save_checkpoint(out, self._state(epoch, step + 1, running))
                            raise Interrupted(
                                f"interrupted at epoch {epoch + 1}, step {step + 1}; checkpoint "
                                f"written to {out / 'checkpoint.pt'}: continue with --resume")
                    self._end_epoch(epoch, running, time.perf_counter() - t0)
                    epoch, start = epoch + 1, 0
                    running = {"loss": 0.0, "correct": 0, "seen": 0}
                    self._save_checkpoint(out, self._state(epoch, 0, running))
                    self._write_metrics(out)
                    progress.update(epochs_bar, completed=epoch,
                                    info=f"test acc {self.history[-1]['test_accuracy']:.2%}  "
                                         f"sparsity {self.history[-1]['sparsity']:.1%}")
                    if not live:
                        self.console.print(_epoch_line(self.history[-1], total),
                                           soft_wrap=True)
                    if self._stop:
                        raise Interrupted(f"interrupted after epoch {epoch}; checkpoint written "
                                          f"to {out / 'checkpoint.pt'}: continue with --resume")
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _train_step(self, x: Tensor, y: Tensor, running: dict[str, float]) -> None:
        self.model.train()
        x, y = distributed.shard(x, y)  # the batch is global: each rank trains on its rows
        loss, correct, n = _loss_correct((self.ddp or self.model)(x), y)
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
                [loss_sum, correct, n, self._stop_requested])
            correct, n, self._stop = int(correct), int(n), stop > 0
        running["loss"] += loss_sum
        running["correct"] += correct
        running["seen"] += n

    def _end_epoch(self, epoch: int, running: dict[str, float], seconds: float) -> None:
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
            "steps": (epoch + 1) * self.steps_per_epoch(), "seconds": round(seconds, 3),
        })

    def _save_checkpoint(self, out: Path, state: dict[str, Any]) -> None:
        if distributed.is_main():  # the other ranks hold the same state
            save_checkpoint(out / "checkpoint.pt", state)

    def _write_metrics(self, out: Path) -> None:
        """metrics.jsonl and metrics.csv from the history (rewritten whole: after a resume they
        hold exactly the epochs of the checkpoint, never an epoch twice). Rank 0 only."""
        if not distributed.is_main():
            return
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        (out / "metrics.jsonl").write_text(lines)
        with (out / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(self.history)

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, out: Path, info: dict[str, Any]) -> dict[str, Any]:
        """Finalize, (recalibrate,) evaluate, (shrink, fold BatchNorm,) report, save, time;
        write the results."""
        end, model = self.cfg["end"], self.model
        if self.pruner is not None and end["finalize"]:
            self.pruner.finalize()
        if end["recalibrate_bn"]:
            batches = ((x, y) for _, x, y in self._batches(self.total_epochs, 0))
            recalibrate_batchnorm(model, batches, end["recalibrate_bn"])
        test_loss, accuracy = self.evaluate(model)
        model.eval()
        deployable = model
        if end["shrink"]:
            import hwprune

            deployable = hwprune.deploy.shrink(model, self.example)
        if end["fold_batchnorm"]:  # inference BatchNorm into the layer before it
            from ..deploy.fold import fold_batchnorm

            deployable = fold_batchnorm(deployable, self.example)
        dense = self._new_model().eval()
        summary: dict[str, Any] = {
            "name": self.cfg["name"], "model": self.cfg["model"]["name"],
            "data": self.cfg["data"]["name"],
            "method": self.cfg["method"]["name"] if self.cfg["method"] else "dense",
            "structure": str(self.pruner.structure) if self.pruner is not None else "dense",
            "dense_accuracy": self.dense_accuracy, "accuracy": accuracy, "test_loss": test_loss,
            "sparsity": self.pruner.sparsity() if self.pruner is not None else 0.0,
            "epochs": self.total_epochs, "steps": self.total_epochs * self.steps_per_epoch(),
        }
        if end["report"]:
            from ..report.measure import report

            rep = report(deployable, self.example, baseline=dense, pruner=self.pruner,
                         name=self.cfg["name"])
            (out / "report.md").write_text(rep.to_markdown() + "\n")
            rep.to_json(out / "report.json")
            t = rep.total
            summary.update({k: t[k] for k in ("params", "kept_params", "pruning_ratio",
                                              "stored_bytes", "index_bytes", "dense_bytes",
                                              "compression_ratio", "model_macs",
                                              "model_macs_remaining", "model_params")})
            summary["dense_model_macs"] = rep.baseline["model_macs"]
        if end["save"]:
            from ..storage import save

            summary["file_bytes"] = save(deployable, out / "model.hwp")
        if end["latency"]:
            summary["latency_ms"], summary["dense_latency_ms"] = _latencies_ms(
                [deployable, dense], self.example)
        summary.update(info)
        if end["plots"] and end["report"]:
            self._plots(out, rep)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _plots(self, out: Path, rep: Any) -> None:
        from ..report import plots

        try:
            plots.kept_fraction_bars(rep, out / "plots" / "kept_fractions.png")
            extras = self.pruner.layer_extras() if self.pruner is not None else {}
            if any(e.get("alpha") for e in extras.values()):
                plots.alpha_histograms(extras, out / "plots" / "alphas.png")
            from .compare import training_curves

            training_curves(self.history, out / "plots" / "training.png", self.cfg["name"])
        except HwpruneError as e:  # matplotlib missing: the rest of the results stand
            self.console.print(f"plots skipped: {e}")

    # -- the whole run ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the distributed state: the DDP wrapper, then (under torchrun) the process
        group this run initialised. Call it once the run is over, on every rank."""
        self.ddp = None
        gc.collect()  # DDP's reducer must be gone before its process group
        if self._owns_group:
            distributed.shutdown()

    def execute(self, out: str | Path, resume: bool = False, force: bool = False,
                command: str | None = None) -> dict[str, Any]:
        """Write the run into ``out``; returns the summary. See ``prepare_out`` for the rules
        on existing folders.

        Distributed (under torchrun): only rank 0 reads and writes ``out``; the other ranks get
        its checkpoint (or its error) by broadcast, train their shards, finalize their pruner
        (so their ``model`` holds the same pruned weights) and return rank 0's summary.
        """
        out = Path(out)
        info = {"command": command or " ".join(["hwprune", *sys.argv[1:]]),
                "machine": machine()}
        if distributed.world_size() > 1:
            info["world_size"] = distributed.world_size()
        status = {"status": "running", "name": self.cfg["name"], **info}

        def start() -> tuple[bool, Any]:
            """(finished, its summary) or (not finished, the checkpoint to resume from)."""
            if resume and not force and _status(out) == "finished":
                self.console.print(f"{out} holds a finished run; nothing to resume")
                return True, json.loads((out / "summary.json").read_text())
            ckpt = prepare_out(out, self.cfg, resume, force)
            if ckpt is None:
                (out / "recipe.yaml").write_text(dump(self.cfg))
            _write_json(out / "run.json", status)
            return False, ckpt

        def end(seconds: float) -> dict[str, Any]:
            summary = self.finish(out, {**info, "seconds": seconds})
            _write_json(out / "run.json", {**status, "status": "finished"})
            return summary

        finished, ckpt = distributed.main_only(start)
        if finished:
            return ckpt
        t0 = time.perf_counter()
        try:
            self.train(out, ckpt)
        except Interrupted:
            if distributed.is_main():
                _write_json(out / "run.json", {**status, "status": "interrupted"})
            raise
        if not distributed.is_main() and self.pruner is not None and self.cfg["end"]["finalize"]:
            # rank 0 finalizes in finish(); finalize's collectives (ADMM's hard_project) pair up
            self.pruner.finalize()
        return distributed.main_only(end, round(time.perf_counter() - t0, 2))


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _epoch_line(h: dict[str, Any], total: int) -> str:
    return (f"epoch {h['epoch']}/{total} ({h['phase']}): loss {h['train_loss']:.4f}, "
            f"train acc {h['train_accuracy']:.2%}, test acc {h['test_accuracy']:.2%}, "
            f"sparsity {h['sparsity']:.1%}, {h['seconds']:.1f}s")


@torch.no_grad()
def _latencies_ms(models: list[nn.Module], example: Tensor, repeats: int = 50) -> list[float]:
    """Median wall time of one forward pass of ``example`` (batch 1) per model, in ms.

    The models are timed in turns within each repeat, so load from other processes on a
    shared machine falls on all of them alike and their ratio stays meaningful."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
        for _ in range(3):  # warm-up
            m(example)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, t in zip(models, times, strict=True):
            t0 = time.perf_counter()
            m(example)
            t.append(time.perf_counter() - t0)
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    return [round(statistics.median(t) * 1e3, 4) for t in times]


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if d is not None:
                return d
        return None
    return None if a == b else (path, a, b)


def _status(out: Path) -> str | None:
    """The status in ``out/run.json`` (None: no run there)."""
    try:
        return json.loads((out / "run.json").read_text()).get("status", "unknown")
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError, OSError):
        return "unknown"


def prepare_out(out: Path, cfg: dict[str, Any], resume: bool, force: bool) -> dict | None:
    """Check the output folder against the request; returns the checkpoint to resume from.

    A finished run is never overwritten without ``force``; an unfinished one needs ``resume``
    (continue, with the same recipe) or ``force`` (start over). ``force`` removes only the files
    a run writes (``RESULT_FILES``).
    """
    status = _status(out)
    if force:
        import shutil

        for name in RESULT_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        status = None
    elif status == "finished":
        raise ConfigError(f"--out {out} holds a finished run; pass --force to overwrite it, "
                          "or choose another --out")
    if resume:
        if status is None or not (out / "checkpoint.pt").is_file():
            raise ConfigError(f"--resume: {out} holds no checkpoint to continue; run without "
                              "--resume to start")
        from .recipe import parse_yaml

        saved = parse_yaml((out / "recipe.yaml").read_text(), f"{out / 'recipe.yaml'}")
        diff = _first_difference(saved, cfg)
        if diff is not None:
            raise ConfigError(f"--resume: recipe field {diff[0]} is {diff[2]!r} here but "
                              f"{diff[1]!r} in the run in {out}; allowed: the same recipe, "
                              "or --force to start over")
        return load_checkpoint(out / "checkpoint.pt")
    if status is not None:
        raise ConfigError(f"--out {out} holds an unfinished run; pass --resume to continue it "
                          "or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    return None
