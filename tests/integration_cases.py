"""What the Lightning and transformers callback tests share: one small task, every registered
method's tiny configuration, and the same training written with the plain API."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.methods import all_methods

SEED, LR, EPOCHS, BATCH, ROWS, FEATURES, CLASSES = 0, 0.05, 2, 16, 64, 16, 4


def method_cases() -> list[tuple[type, dict[str, Any]]]:
    """(class, arguments) of every registered method's first tiny configuration."""
    return [(spec.cls, dict(spec.configs[spec.structures[0]])) for spec in all_methods()]


def case_id(case: tuple[type, dict[str, Any]]) -> str:
    return case[0].__name__


def make_mlp() -> nn.Module:
    """Two prunable hidden layers (16 -> 32 -> 32) and a dense output layer."""
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, CLASSES))


def task() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic classification task (labels from a random linear teacher)."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(ROWS, FEATURES, generator=g)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(1)
    return x, y


def plain_fit(cls: type, kwargs: dict[str, Any], epochs: int = EPOCHS, accumulate: int = 1,
              penalty_first: bool = False, fix_after: int | None = None
              ) -> tuple[nn.Module, Any]:
    """The README's loop as the callbacks run it: the same model (seeded), the same batches in
    order, SGD over ``pruner.param_groups``; finalized at the end. Returns (model, pruner).

    The penalty's gradient is added by its own backward, once per optimizer step, after the
    task's (Lightning's order) or, with ``penalty_first``, before it (the transformers
    Trainer's): a parameter both reach (DPP's logits) takes the two gradients summed in that
    order, which can differ in the last bit from one backward of ``task loss + penalty``.
    Each optimizer step accumulates ``accumulate`` batches, each loss divided by
    ``accumulate``; the penalty is not divided. ``fix_after``: the pattern is fixed
    (``fix_pattern()``) after that many epochs."""
    torch.manual_seed(SEED)
    model = make_mlp()
    pruner = cls(model, **copy.deepcopy(kwargs))
    optimizer = torch.optim.SGD(pruner.param_groups(lr=LR, momentum=0.9))
    x, y = task()
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, ROWS, BATCH)]

    def add_penalty() -> None:
        penalty = pruner.penalty()
        if penalty.requires_grad:  # methods without a penalty give a constant zero
            penalty.backward()

    for _ in range(epochs):
        for i in range(0, len(batches), accumulate):
            optimizer.zero_grad()
            if penalty_first:
                add_penalty()
            for xb, yb in batches[i:i + accumulate]:
                (F.cross_entropy(model(xb), yb) / accumulate).backward()
            if not penalty_first:
                add_penalty()
            optimizer.step()
            pruner.step()
        pruner.epoch_end()
        if pruner.epochs == fix_after:
            pruner.fix_pattern()
    pruner.finalize()
    return model, pruner


def assert_same_result(model: nn.Module, pruner: Any, ref_model: nn.Module, ref_pruner: Any
                       ) -> None:
    """The same masks, finalized weights (bitwise) and report facts."""
    masks, ref_masks = pruner.masks(), ref_pruner.masks()
    assert list(masks) == list(ref_masks)
    for name in masks:
        assert torch.equal(masks[name], ref_masks[name]), name
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert list(state) == list(ref_state)
    for key in state:
        assert torch.equal(state[key], ref_state[key]), key
    assert (pruner.steps, pruner.epochs) == (ref_pruner.steps, ref_pruner.epochs)
    assert pruner.layer_extras() == ref_pruner.layer_extras()


#: PSP's l1 variant with plain SGD on the alphas: with a task loss of exactly zero, the
#: penalty alpha_decay * sum|alpha| is their only pull, so each moves from 1 by exactly
#: alpha_lr * alpha_decay per step
PENALTY_ONLY = {"structure": "channel", "variant": "l1", "alpha_decay": 0.5, "alpha_lr": 0.01,
                "alpha_momentum": 0.0, "threshold": 1e-3}


def assert_penalty_alone_moved_alphas(pruner: Any) -> None:
    """The known answer of ``PENALTY_ONLY`` after ``EPOCHS`` epochs of 4 steps."""
    steps = pruner.steps
    assert steps == EPOCHS * 4
    expected = 1.0 - steps * PENALTY_ONLY["alpha_lr"] * PENALTY_ONLY["alpha_decay"]
    for alpha in pruner.alphas().values():
        assert torch.allclose(alpha, torch.full_like(alpha, expected))
