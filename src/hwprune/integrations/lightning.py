"""``PruningCallback``: any hwprune method inside a PyTorch Lightning ``Trainer.fit``
(docs/integrations-lightning.md).

::

    trainer = L.Trainer(max_epochs=10, callbacks=[PruningCallback(hp.DPP, structure="2:4")])
    trainer.fit(module, loader)

Where each verb of the lifecycle runs (Lightning 2.x hooks):

- ``setup("fit")``: the pruner is built on the bare module (before a DDP strategy wraps it and
  before ``configure_optimizers`` runs, so the optimizer sees the parametrized weights);
- ``on_fit_start`` (after ``configure_optimizers``, before a checkpoint's optimizer state is
  restored): the method's parameter groups join the optimizer that trains the pruned weights;
  LR schedulers learn about them;
- ``on_before_optimizer_step`` (once per optimizer step, after gradient accumulation and AMP
  unscaling, before gradient clipping): the gradient of ``pruner.penalty()`` is added, so the
  user's ``training_step`` returns the task loss only;
- ``on_train_batch_end``: ``pruner.step()`` once for every optimizer step taken;
- ``on_train_epoch_end``: ``pruner.epoch_end()``, then the pruner's facts are logged
  (``hwprune/sparsity``, ``hwprune/temperature``, ...);
- ``state_dict``/``load_state_dict``: the pruner's state rides in Lightning's checkpoints;
- ``on_fit_end``: on request, finalize, shrink, save, report (``Finish``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import nn

from ..errors import ConfigError
from ..methods import Pruner
from .lifecycle import (
    Finish,
    Finished,
    MethodChoice,
    add_method_groups,
    check_fix_at,
    check_method_groups,
    extend_schedulers,
    facts,
    fix_when_due,
)

__all__ = ["PruningCallback"]


class PruningCallback(pl.Callback):
    """Prune the ``LightningModule`` (or its submodule ``module``) while it trains.

    Args:
        method: a hwprune method class (``hp.DPP``), a registered method's name (``"DPP"``),
            or a recipe's method block (``{"name": "DPP", "structure": "2:4"}``).
        module: the attribute of the ``LightningModule`` to prune (``"model"``); ``None``
            prunes the ``LightningModule`` itself.
        add_param_groups: put the method's parameter groups into the optimizer (default). With
            ``False`` your ``configure_optimizers`` builds it over
            ``callback.pruner.param_groups(...)``, and the callback checks that it did.
        finish: what to do when fitting ends (``Finish(finalize=True, save="m.hwp")``); the
            result is ``callback.finished``.
        log_facts: log the pruner's facts at every epoch end.
        fix_pattern_at: after this many epochs, ``pruner.fix_pattern()``: the pattern the
            method would keep is fixed and the epochs left fine-tune the weights for it
            (``None``: the method learns its pattern to the end).
        **kwargs: the method's arguments (with a class or a name).

    ``callback.pruner`` is the pruner once fitting has started.
    """

    def __init__(self, method: type | str | Mapping[str, Any], *, module: str | None = None,
                 add_param_groups: bool = True, finish: Finish | None = None,
                 log_facts: bool = True, fix_pattern_at: int | None = None, **kwargs: Any):
        self.choice = MethodChoice(method, kwargs)
        self.fix_pattern_at = check_fix_at(fix_pattern_at)
        self.module = module
        self.add_param_groups = add_param_groups
        self.finish = finish or Finish()
        self.log_facts = log_facts
        self.pruner: Pruner | None = None
        self.finished: Finished | None = None
        self._pending: dict[str, Any] | None = None  # state loaded before the pruner existed
        self._steps_seen = 0

    @property
    def state_key(self) -> str:
        return f"hwprune.PruningCallback[{self.choice.cls.__name__}, {self.module}]"

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        target = getattr(pl_module, self.module, None)
        if not isinstance(target, nn.Module):
            raise ConfigError(f"PruningCallback(module={self.module!r}): "
                              f"{type(pl_module).__name__}.{self.module} is "
                              f"{type(target).__name__}; allowed: an attribute holding the "
                              "torch.nn.Module to prune, or None (the LightningModule)")
        return target

    # -- building ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.pruner is not None:
            return
        self.pruner = self.choice.build(self._target(pl_module))
        if self._pending is not None:
            self.pruner.load_state_dict(self._pending)
            self._pending = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = self._optimizer(trainer)
        if not self.add_param_groups:
            check_method_groups(optimizer, self.pruner, fix="build configure_optimizers' "
                                "optimizer over callback.pruner.param_groups(...), or let the "
                                "callback add them (add_param_groups=True)")
            return
        added = add_method_groups(optimizer, self.pruner)
        extend_schedulers([c.scheduler for c in trainer.lr_scheduler_configs], optimizer, added)

    def _optimizer(self, trainer: pl.Trainer) -> Any:
        """The optimizer that trains the pruned weights (one per model, also with several)."""
        weight = next(iter(self.pruner.layers.values())).original()
        for optimizer in trainer.optimizers:
            if any(p is weight for g in optimizer.param_groups for p in g["params"]):
                return optimizer
        raise ConfigError(f"no optimizer of configure_optimizers() trains the pruned weights "
                          f"({len(self.pruner.layers)} layers, e.g. "
                          f"{next(iter(self.pruner.layers))}); allowed: an optimizer over the "
                          "module's parameters (self.parameters()) or over "
                          "callback.pruner.param_groups(...)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_seen = trainer.global_step  # after a checkpoint's counters are restored

    # -- training ----------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if self.pruner is None or optimizer is not self._optimizer(trainer):
            return
        penalty = self.pruner.penalty()
        if penalty.requires_grad:  # methods without a penalty give a constant zero
            penalty.backward()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # an accumulating batch takes no step: global_step counts optimizer steps
        for _ in range(trainer.global_step - self._steps_seen):
            self.pruner.step()
        self._steps_seen = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruner.epoch_end()
        fix_when_due(self.pruner, self.fix_pattern_at)
        if self.log_facts:
            pl_module.log_dict({f"hwprune/{k}": v for k, v in facts(self.pruner).items()},
                               on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None:  # fit() stops with every rank here (DDP wrapper gone)
            self.finished = self.finish(self.pruner, trainer.is_global_zero)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.pruner is None or self.pruner.finalized:
            return {}
        return {"pruner": self.pruner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "pruner" not in state_dict:
            return
        if self.pruner is None:
            self._pending = state_dict["pruner"]
        else:
            self.pruner.load_state_dict(state_dict["pruner"])
