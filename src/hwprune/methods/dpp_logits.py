"""DPP's logits: how they start, how much noise each layer kind samples them with, how their
gradient is scaled, and the entropy that measures (and penalises) their uncertainty.

Kept apart from ``dpp.py`` (the pruner's lifecycle) because these are the choices that decide
whether DPP *learns* a mask or keeps the one it starts from; docs/dpp.md gives the measurements
behind each default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import ConfigError
from ..relaxations import row_entropy
from ..structures import KofN

__all__ = ["LOGIT_INITS", "LAYER_KINDS", "DEFAULT_NOISE", "RANDOM_INIT_STD", "LOGIT_GRAD_RMS",
           "initial_logits", "layer_kind", "noise_for", "check_noise_scale", "GradNormalizer",
           "entropy", "normalized_entropy", "mask_metrics"]

#: ``logit_init`` values: random normal (the reference code), standardised weight norms (a
#: pretrained model starts from its magnitude mask), or zeros (uniform)
LOGIT_INITS = ("random", "magnitude", "zeros")
#: standard deviation of ``logit_init="random"`` (the reference code used 0.5 or 1)
RANDOM_INIT_STD = 0.5
#: the root mean square a layer's logit gradient is scaled to (``GradNormalizer``): SGD with
#: the usual momentum 0.9 then moves the logits about one learning rate per step, as Adam does
LOGIT_GRAD_RMS = 0.1
#: the layer kinds that get their own Gumbel noise scale
LAYER_KINDS = ("linear", "conv")
#: the Gumbel noise scale of each layer kind: the reference code's 10:1 ratio (it used 0.1
#: on fully connected and 0.01 on conv masks), at the scale that finds known answers from a
#: uniform start (docs/dpp.md, "Defaults that learn")
DEFAULT_NOISE = {"linear": 1.0, "conv": 0.1}


def initial_logits(kind: str, structure: KofN, weight: Tensor,
                   generator: torch.Generator) -> Tensor:
    """The ``(rows, n)`` starting logits of one layer (float32, on the CPU)."""
    rows = structure.num_groups(tuple(weight.shape)) // structure.n
    if kind == "zeros":
        return torch.zeros(rows, structure.n)
    if kind == "random":
        return torch.randn(rows, structure.n, generator=generator) * RANDOM_INIT_STD
    scores = structure.scores(weight, "l2").reshape(-1, structure.n).float().cpu()
    return (scores - scores.mean(1, keepdim=True)) / (
        scores.std(1, keepdim=True, unbiased=False) + 1e-8)


def layer_kind(shape: tuple[int, ...]) -> str:
    """``"linear"`` for a 2-D weight, ``"conv"`` for any other."""
    return "linear" if len(shape) == 2 else "conv"


def check_noise_scale(noise_scale: object) -> None:
    """``None`` (per layer kind), a number >= 0, or ``{kind: number >= 0}`` for some kinds."""
    if noise_scale is None:
        return
    values = noise_scale if isinstance(noise_scale, Mapping) else {"all": noise_scale}
    if isinstance(noise_scale, Mapping):
        unknown = sorted(set(noise_scale) - set(LAYER_KINDS))
        if unknown:
            raise ConfigError(f"noise_scale names unknown layer kinds {unknown}; allowed: "
                              f"{', '.join(LAYER_KINDS)}")
    for v in values.values():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"noise_scale must be None (per layer kind: {DEFAULT_NOISE}), a "
                              f"number >= 0 or a mapping of layer kinds to numbers >= 0; got "
                              f"{noise_scale!r}")


def noise_for(noise_scale: float | Mapping[str, float] | None, shape: tuple[int, ...]) -> float:
    """The Gumbel noise scale of a weight of ``shape`` (checked by ``check_noise_scale``)."""
    if isinstance(noise_scale, (int, float)):
        return float(noise_scale)
    kind = layer_kind(shape)
    return float({**DEFAULT_NOISE, **(noise_scale or {})}[kind])


class GradNormalizer:
    """A gradient hook that scales one layer's logit gradient to root mean square
    ``LOGIT_GRAD_RMS`` on average.

    The straight-through gradient of a logit is ``sum(w * dL/dw)`` over its group, whose
    scale depends on the model and its weights, not on the logits. The hook multiplies it by
    ``scale``: ``LOGIT_GRAD_RMS`` over the running RMS of the gradients of the steps before
    (an exponential average of the mean square over the layer, bias-corrected: Adam's second
    moment, one number per layer; 1 until the first step is seen). An optimizer step then
    moves the logits by about the learning rate whatever the model, the directions within
    the layer are kept, and as the task is learned and the gradient shrinks, so do the steps.

    The factor is fixed during a step and learned from the gradient the optimizer used
    (``observe``, after the step), so under DistributedDataParallel, which averages the
    ranks' gradients after the hook, every rank scales alike and the result is that of one
    process."""

    BETA = 0.999

    def __init__(self) -> None:
        # tensors on the gradient's device: reading them back every step would sync a GPU
        self.mean_square: Tensor | float = 0.0
        self.scale: Tensor | float = 1.0
        self.calls = 0

    def __call__(self, grad: Tensor) -> Tensor:
        scale = self.scale
        return grad * (scale.to(grad.dtype) if isinstance(scale, Tensor) else scale)

    def observe(self, grad: Tensor) -> None:
        """Learn from the (scaled) gradient of the step just taken."""
        self.calls += 1
        self.mean_square, self.scale = (_on(v, grad.device) for v in (self.mean_square,
                                                                       self.scale))
        ms = (grad.detach().float() / self.scale).pow(2).mean()
        self.mean_square = self.BETA * self.mean_square + (1 - self.BETA) * ms
        rms = (self.mean_square / (1 - self.BETA ** self.calls)).sqrt()
        # no gradient seen yet (all zero): keep the factor
        self.scale = torch.where(rms > 0, LOGIT_GRAD_RMS / rms.clamp_min(1e-30),
                                 torch.as_tensor(self.scale, device=rms.device))

    def state_dict(self) -> dict[str, Tensor | float | int]:
        # the float32 tensors themselves: a Python float would make the resumed run's
        # arithmetic double precision, and the logits would differ in the last bits
        return {"mean_square": _copy(self.mean_square), "scale": _copy(self.scale),
                "calls": self.calls}

    def load_state_dict(self, state: dict[str, Tensor | float | int]) -> None:
        self.mean_square, self.scale = _copy(state["mean_square"]), _copy(state["scale"])
        self.calls = int(state["calls"])


def _copy(v: Tensor | float) -> Tensor | float:
    return v.detach().clone() if isinstance(v, Tensor) else float(v)


def _on(v: Tensor | float, device: torch.device) -> Tensor | float:
    return v.to(device) if isinstance(v, Tensor) else v


def entropy(p: Tensor) -> Tensor:
    """Entropy of each row of a probability matrix (natural log)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def normalized_entropy(logits: Tensor) -> Tensor:
    """Each row's entropy of ``softmax(logits)`` over ``log n``: in [0, 1], 1 when uniform."""
    n = logits.shape[1]
    return row_entropy(logits.float()) / (math.log(n) if n > 1 else 1.0)


def mask_metrics(logits: Tensor) -> dict[str, float]:
    """Confidence and diversity of a layer's rows (docs/dpp.md, "Mask metrics")."""
    p = torch.softmax(logits.detach().float(), 1)
    log_n = math.log(p.shape[1]) if p.shape[1] > 1 else 1.0
    row_h = entropy(p).mean().item()
    return {"confidence": 1.0 - row_h / log_n,
            "diversity": (entropy(p.mean(0, keepdim=True)).item() - row_h) / log_n}
