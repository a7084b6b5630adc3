"""Sparsity schedules: when masks are updated and to what sparsity.

A schedule maps a time ``t`` (optimizer steps counted by ``pruner.step()``, or epochs counted
by ``pruner.epoch_end()``, chosen by ``unit``) to the sparsity the masks should have, as a
function of the method's final sparsity. They are plain objects with no state: the pruner's
step/epoch counters are the schedule position, so resuming a run restores it exactly.
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["Schedule", "OneShot", "Linear", "Cubic", "Anneal"]

_UNITS = ("step", "epoch")


class Schedule:
    """Base: update masks at ``begin, begin + every, ...`` up to and including ``end``."""

    def __init__(self, begin: int = 0, end: int = 0, every: int = 1, unit: str = "step",
                 initial: float = 0.0):
        if unit not in _UNITS:
            raise ConfigError(f"schedule unit must be one of {_UNITS}; got {unit!r}")
        for field, v in (("begin", begin), ("end", end), ("every", every)):
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"schedule {field} must be a non-negative integer; got {v!r}")
        if end < begin:
            raise ConfigError(f"schedule end ({end}) must not be before begin ({begin})")
        if every < 1:
            raise ConfigError(f"schedule every must be >= 1; got {every}")
        if not 0.0 <= initial < 1.0:
            raise ConfigError(f"schedule initial sparsity must be in [0, 1); got {initial}")
        self.begin, self.end, self.every, self.unit, self.initial = begin, end, every, unit, initial

    def progress(self, t: int) -> float:
        """How far along the ramp ``t`` is, in [0, 1]."""
        if self.end == self.begin:
            return 1.0 if t >= self.begin else 0.0
        return min(max((t - self.begin) / (self.end - self.begin), 0.0), 1.0)

    def ramp(self, p: float) -> float:
        """Fraction of the way from ``initial`` to the final sparsity at progress ``p``."""
        raise NotImplementedError

    def sparsity(self, t: int, final: float) -> float:
        if t < self.begin:
            return 0.0
        return self.initial + (final - self.initial) * self.ramp(self.progress(t))

    def due(self, t: int) -> bool:
        """Whether masks are updated at time ``t``."""
        return self.begin <= t <= self.end and ((t - self.begin) % self.every == 0 or t == self.end)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(begin={self.begin}, end={self.end}, every={self.every}, "
                f"unit={self.unit!r}, initial={self.initial})")


class OneShot(Schedule):
    """Prune to the final sparsity once, at time ``at`` (0: when the pruner is created)."""

    def __init__(self, at: int = 0, unit: str = "step"):
        super().__init__(begin=at, end=at, every=1, unit=unit)

    def ramp(self, p: float) -> float:
        return 1.0


class Linear(Schedule):
    """Sparsity grows linearly from ``initial`` at ``begin`` to the final value at ``end``."""

    def ramp(self, p: float) -> float:
        return p


class Cubic(Schedule):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - p)^3; fast early, gentle at the end."""

    def ramp(self, p: float) -> float:
        return 1.0 - (1.0 - p) ** 3


class Anneal:
    """A value moving linearly from ``start`` to ``end`` over ``duration`` steps or epochs,
    then staying at ``end`` however long the run (DPP's Gumbel-softmax temperature)."""

    def __init__(self, start: float, end: float, duration: int, unit: str = "epoch"):
        if unit not in _UNITS:
            raise ConfigError(f"anneal unit must be one of {_UNITS}; got {unit!r}")
        if not isinstance(duration, int) or duration < 1:
            raise ConfigError(f"anneal duration must be a positive integer; got {duration!r}")
        self.start, self.end, self.duration, self.unit = start, end, duration, unit

    def value(self, t: int) -> float:
        return self.start + (self.end - self.start) * min(max(t / self.duration, 0.0), 1.0)

    def __repr__(self) -> str:
        return (f"Anneal(start={self.start}, end={self.end}, duration={self.duration}, "
                f"unit={self.unit!r})")
