"""Minimal training and evaluation loops shared by the demo, the benchmarks and recipes.

They show the lifecycle in its plainest form (``loss + pruner.penalty()``, ``pruner.step()``
after each optimizer step, ``pruner.epoch_end()`` after each epoch); users are expected to call
the pruner from their own loops instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .methods.base import Pruner

__all__ = ["make_loader", "train_epoch", "evaluate", "recalibrate_batchnorm"]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process loader; shuffling is seeded so runs repeat exactly."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                pruner: Pruner | None = None,
                augment: Callable[[Tensor], Tensor] | None = None,
                on_step: Callable[[], object] | None = None) -> dict[str, float]:
    """One epoch of cross-entropy training; returns mean loss and training accuracy.
    ``on_step`` runs after every optimizer step (e.g. a per-step LR scheduler's ``step``)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        if augment is not None:
            x = augment(x)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if pruner is not None:
            loss = loss + pruner.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
        if on_step is not None:
            on_step()
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    if pruner is not None:
        pruner.epoch_end()
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct, seen = 0, 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    return correct / seen


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, batches: int = 50) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` training batches
    (a cumulative average, weights untouched). After pruning or learned rescaling, the running
    statistics can lag behind the layers they normalise; evaluating with them then measures
    the lag, not the model. Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    was_training = model.training
    model.train()
    used = 0
    for x, _ in loader:
        if used == batches:
            break
        model(x)
        used += 1
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
    return used
