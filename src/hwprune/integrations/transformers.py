"""``PruningCallback``: any hwprune method inside a Hugging Face ``Trainer``
(docs/integrations-transformers.md).

::

    callback = PruningCallback(hp.DPP, structure="2:4", targets="bert.encoder.*")
    trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
    callback.create_optimizer(trainer)
    trainer.train()

Where each verb of the lifecycle runs (transformers 5.x events):

- ``on_init_end`` (inside ``Trainer(...)``, given the callback in ``callbacks=``): the pruner
  is built on the bare model, before the Trainer creates an optimizer or wraps the model;
- ``create_optimizer(trainer)``: the optimizer the Trainer would build from its arguments
  (class, learning rate, betas, weight decay split), over ``pruner.param_groups(...)``. The
  Trainer creates its optimizer and its LR scheduler together inside ``train()`` with no event
  in between, and loads a checkpoint's optimizer state right after, so groups added later would
  neither be scheduled nor fit the saved state: the method's groups must be there from the
  start. ``on_train_begin`` checks that they are;
- ``on_step_begin`` (before the first micro-batch of each optimizer step, gradients empty): the
  gradient of ``pruner.penalty()`` is added; the task's micro-batches then accumulate onto it,
  before the Trainer clips. fp16 with a gradient scaler is refused (the penalty would miss the
  scale); bf16 needs none;
- ``on_optimizer_step`` (after the optimizer's step, before the Trainer zeroes the gradients,
  which a method may read, as DPP's gradient normaliser does): ``pruner.step()``;
  ``on_epoch_end``: ``pruner.epoch_end()`` and the pruner's
  facts appended to ``state.log_history``;
- ``on_save``: the pruner's state is written into the checkpoint folder (``hwprune-pruner.pt``)
  and read back in ``on_train_begin`` of a resumed ``train(resume_from_checkpoint=...)``;
- ``on_train_end``: on request, finalize, shrink, save, report (``Finish``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn

from ..errors import ConfigError
from ..methods import Pruner
from .lifecycle import (
    PRUNER_FILE,
    Finish,
    Finished,
    MethodChoice,
    check_fix_at,
    check_method_groups,
    facts,
    fix_when_due,
)

__all__ = ["PruningCallback"]


class PruningCallback(transformers.TrainerCallback):
    """Prune the Trainer's model (or its submodule ``module``) while it trains.

    Args:
        method: a hwprune method class (``hp.DPP``), a registered method's name (``"DPP"``),
            or a recipe's method block (``{"name": "DPP", "structure": "2:4"}``).
        module: the attribute of the model to prune (``"bert"``); ``None``: the whole model.
        finish: what to do when training ends (``Finish(finalize=True, save="m.hwp")``); the
            result is ``callback.finished``.
        log_facts: append the pruner's facts to the Trainer's log history at every epoch end.
        fix_pattern_at: after this many epochs, ``pruner.fix_pattern()``: the pattern the
            method would keep is fixed and the epochs left fine-tune the weights for it
            (``None``: the method learns its pattern to the end).
        **kwargs: the method's arguments (with a class or a name).

    ``callback.pruner`` is the pruner once the Trainer exists.
    """

    def __init__(self, method: type | str | Mapping[str, Any], *, module: str | None = None,
                 finish: Finish | None = None, log_facts: bool = True,
                 fix_pattern_at: int | None = None, **kwargs: Any):
        self.choice = MethodChoice(method, kwargs)
        self.fix_pattern_at = check_fix_at(fix_pattern_at)
        self.module = module
        self.finish = finish or Finish()
        self.log_facts = log_facts
        self.pruner: Pruner | None = None
        self.finished: Finished | None = None

    def _build(self, model: nn.Module) -> Pruner:
        if self.pruner is None:
            target = model if self.module is None else getattr(model, self.module, None)
            if not isinstance(target, nn.Module):
                raise ConfigError(f"PruningCallback(module={self.module!r}): "
                                  f"{type(model).__name__}.{self.module} is "
                                  f"{type(target).__name__}; allowed: an attribute holding the "
                                  "torch.nn.Module to prune, or None (the whole model)")
            self.pruner = self.choice.build(target)
        return self.pruner

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._build(model)

    def create_optimizer(self, trainer: transformers.Trainer) -> torch.optim.Optimizer:
        """Set ``trainer.optimizer`` to what ``trainer.create_optimizer()`` would make from
        ``trainer.args`` (its optimizer class and arguments; weight decay except on biases and
        norm weights), with the method's parameter groups added; returns it."""
        if trainer.optimizer is not None:
            raise ConfigError("the Trainer already has an optimizer; call "
                              "callback.create_optimizer(trainer) before trainer.train(), "
                              "without optimizers=(...)")
        model = trainer.model
        pruner = self._build(model)
        cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
        decay = set(trainer.get_decay_parameter_names(model))
        model_group, *method_groups = pruner.param_groups(
            **{**kwargs, "weight_decay": trainer.args.weight_decay})
        names = {id(p): n for n, p in model.named_parameters()}
        split = [{**model_group, "params": [p for p in model_group["params"]
                                            if (names[id(p)] in decay) == wanted]}
                 for wanted in (True, False)]
        split[1]["weight_decay"] = 0.0
        trainer.optimizer = cls([g for g in split if g["params"]] + method_groups, **kwargs)
        return trainer.optimizer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        pruner = self._build(model)
        if args.fp16:
            raise ConfigError("PruningCallback: fp16=True scales the loss with a gradient scaler "
                              "the penalty cannot reach; allowed: bf16=True or full precision")
        check_method_groups(optimizer, pruner, fix="call callback.create_optimizer(trainer) "
                            "before trainer.train(), or pass optimizers=(an optimizer over "
                            "callback.pruner.param_groups(...), None)")
        if state.global_step > 0:  # a resumed train(): the checkpoint it resumed from
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", PRUNER_FILE)
            if not os.path.isfile(path):
                raise ConfigError(f"resuming at step {state.global_step}, but {path} is "
                                  "missing; allowed: a checkpoint written by a Trainer with this "
                                  "callback, in args.output_dir")
            pruner.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_step_begin(self, args, state, control, **kwargs):
        penalty = self.pruner.penalty()
        if penalty.requires_grad:  # methods without a penalty give a constant zero
            penalty.backward()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.pruner.epoch_end()
        fix_when_due(self.pruner, self.fix_pattern_at)
        if self.log_facts:
            state.log_history.append({**{f"hwprune/{k}": v for k, v in
                                         facts(self.pruner).items()},
                                      "epoch": state.epoch, "step": state.global_step})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.pruner.finalized:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            torch.save(self.pruner.state_dict(), os.path.join(folder, PRUNER_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self.finished = self.finish(self.pruner, state.is_world_process_zero)
