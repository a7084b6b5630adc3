"""Where a run is: its phases (dense, prune, finetune) in epochs, and the batches of an epoch.

A run's position is (epoch, step): batches are drawn from a permutation seeded by
``(seed, epoch)`` and augmentation by ``(seed, epoch, step)``, so nothing else about the data
pipeline needs saving to resume exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["PHASES", "Plan"]

PHASES = ("dense", "prune", "finetune")


class Plan:
    """The epochs of each phase and the batches of each epoch of a recipe's training."""

    def __init__(self, cfg: dict[str, Any], train_x: Tensor, train_y: Tensor,
                 augment: Callable[..., Tensor] | None = None):
        """``augment(x, generator=g)``: the data set's augmentation of a training batch."""
        self.cfg = cfg
        self.train_x, self.train_y = train_x, train_y
        self.augment = augment
        t = cfg["train"]
        self.epochs = {p: t[f"{p}_epochs"] for p in PHASES}

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs.values())

    def phase_of(self, epoch: int) -> str:
        end = 0
        for phase, n in self.epochs.items():
            end += n
            if epoch < end:
                return phase
        raise AssertionError(epoch)

    def steps_per_epoch(self) -> int:
        n, bs = len(self.train_x), self.cfg["train"]["batch_size"]
        steps = n // bs if n % bs == 1 else math.ceil(n / bs)  # no batch of 1 (BatchNorm)
        cap = self.cfg["train"]["steps_per_epoch"]
        return min(steps, cap) if cap else steps

    def batches(self, epoch: int, start: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(step, x, y) of ``epoch`` from step ``start`` on."""
        seed, bs = self.cfg["seed"], self.cfg["train"]["batch_size"]
        perm = torch.randperm(len(self.train_x),
                              generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for step in range(start, self.steps_per_epoch()):
            idx = perm[step * bs:(step + 1) * bs]
            x, y = self.train_x[idx], self.train_y[idx]
            if self.augment is not None:
                g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + step)
                x = self.augment(x, generator=g)
            yield step, x, y
