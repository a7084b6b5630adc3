"""DPP's mask module (``GumbelTopK``) and the relaxations its gradient comes from.

The forward pass is always hard: exactly ``k`` of every row of ``n`` logits are kept (the top-k
of logits + Gumbel noise). Only the backward pass is relaxed, through a straight-through
estimator; two relaxations are implemented, each as an autograd function whose forward returns
the hard mask and whose backward computes the relaxed mask's vector-Jacobian product directly
(nothing soft is materialised in the forward pass):

* ``"ksoftmax"``: the paper's k successive softmaxes at temperature ``tau``, step j over the
  entries not chosen in steps 0..j-1. Cost O(k·n) per row.
* ``"sigmoid"``: one sigmoid per entry around the threshold between the k-th and (k+1)-th
  largest perturbed logit, ``s_i = sigmoid((z_i - t) / tau)``, with ``t`` treated as the
  threshold that keeps ``sum_i s_i = k`` (its implicit gradient makes the relaxed mask's total
  constant, like the k-step softmax's). Cost O(n) per row after the selection, memory O(n).
* ``"auto"``: ``"ksoftmax"`` while ``k <= KSOFTMAX_MAX_K`` (its k passes cost about what the
  sigmoid's few do), ``"sigmoid"`` above. docs/dpp.md explains the choice.

Short rows (``n <= PAIRWISE_MAX_N``, e.g. 2:4) are ranked by pairwise comparisons of whole
columns, which is several times faster on many rows than ``topk`` on rows of 4, and reduced
column by column (``row_sum``, ``row_max``), in their own (rows, n) layout: no transposes.
Every pass over the logits is elementwise and branch-free (no masked_fill or where on a random
mask, which branch per entry), since a DPP step's cost over a dense one is its number of
passes over tensors of the weight's size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError
from .parametrize import fake_quantize
from .structures import KofN

__all__ = ["GumbelTopK", "RELAXATIONS", "KSOFTMAX_MAX_K", "PAIRWISE_MAX_N",
           "check_relaxation", "resolve_relaxation", "gumbel_noise", "is_short", "row_sum",
           "row_max", "rowwise_", "minus_rows", "rank_rows", "leading_values", "split_values",
           "top_k_rows", "row_entropy", "ksoftmax_st", "sigmoid_st", "as_float"]

RELAXATIONS = ("ksoftmax", "sigmoid", "auto")
#: "auto" keeps the paper's k-step softmax up to this many steps per row
KSOFTMAX_MAX_K = 4
#: rows up to this long are ranked by pairwise column comparisons instead of topk
PAIRWISE_MAX_N = 8
#: the k-step softmax's backward works on at most this many elements at once (steps x rows x n)
_CHUNK = 1 << 22


def check_relaxation(name: object) -> None:
    if name not in RELAXATIONS:
        raise ConfigError(f"relaxation must be one of {RELAXATIONS}; got {name!r}")


def resolve_relaxation(name: str, k: int) -> str:
    """The relaxation ``name`` stands for on rows that keep ``k``."""
    check_relaxation(name)
    if name == "auto":
        return "ksoftmax" if k <= KSOFTMAX_MAX_K else "sigmoid"
    return name


def gumbel_noise(shape: torch.Size, generator: torch.Generator, like: Tensor,
                 scale: float = 1.0) -> Tensor:
    """``scale`` times Gumbel(0, 1) samples, drawn on the generator's device (the CPU), so
    that one generator serves a model on any device; computed in place to keep allocations
    to one (``mul_(-scale)`` is the last ``neg_`` and the scaling in one pass, bit for bit)."""
    g = torch.rand(shape, generator=generator, dtype=like.dtype)
    # -log(u) of u < 1 is over 1e-16 in every float type: no second clamp needed
    g.clamp_(min=1e-20).log_().neg_().log_().mul_(-scale)
    return g.to(like.device)


def is_short(n: int) -> bool:
    """Whether rows of ``n`` take the short-row path (pairwise ranks, column reductions)."""
    return n <= PAIRWISE_MAX_N


def row_sum(x: Tensor) -> Tensor:
    """The sum over the last axis, keepdim. Rows of up to ``PAIRWISE_MAX_N`` are added column
    by column (strided views, left to right): torch's reduction over rows of 4 costs several
    times more, and transposing them first costs more than the sum."""
    if not is_short(x.shape[-1]):
        return x.sum(-1, keepdim=True)
    cols = x.unbind(-1)
    if len(cols) == 1:
        return cols[0].clone().unsqueeze(-1)
    out = cols[0] + cols[1]
    for c in cols[2:]:
        out += c
    return out.unsqueeze(-1)


def row_max(x: Tensor) -> Tensor:
    """The maximum over the last axis, keepdim (column by column for short rows)."""
    if not is_short(x.shape[-1]):
        return x.amax(-1, keepdim=True)
    cols = x.unbind(-1)
    if len(cols) == 1:
        return cols[0].clone().unsqueeze(-1)
    out = torch.maximum(cols[0], cols[1])
    for c in cols[2:]:
        torch.maximum(out, c, out=out)
    return out.unsqueeze(-1)


def rowwise_(x: Tensor, method: str, v: Tensor, other: Tensor | None = None,
             **kwargs) -> Tensor:
    """``x.<method>(v)`` in place (``x.<method>(other, v)`` where ``other`` is given, as for
    ``addcmul_``), with ``v`` one value per row of ``x`` (keepdim, as ``row_sum`` gives it).
    Short rows on the CPU go column by column: broadcasting a value per row over rows of a few
    entries costs several times an elementwise pass there (a GPU takes the broadcast in one
    kernel)."""
    if not is_short(x.shape[-1]) or x.device.type != "cpu":
        return getattr(x, method)(v, **kwargs) if other is None else getattr(x, method)(
            other, v, **kwargs)
    v = v.squeeze(-1)
    for j, col in enumerate(x.unbind(-1)):
        if other is None:
            getattr(col, method)(v, **kwargs)
        else:
            getattr(col, method)(other.select(-1, j), v, **kwargs)
    return x


def minus_rows(x: Tensor, v: Tensor) -> Tensor:
    """``x - v``, a new tensor, with ``v`` one value per row of ``x`` (keepdim): a copy of short
    CPU rows with ``v`` taken off column by column (``rowwise_``), one broadcast otherwise."""
    if not is_short(x.shape[-1]) or x.device.type != "cpu":
        return x - v
    return rowwise_(x.clone(), "sub_", v)


def rank_rows(cols: Tensor) -> Tensor:
    """Each entry's rank within its row, 0 for the largest (ties: the lower index first), as
    uint8 in the layout of ``cols``, for short rows given as (n, rows) (``z.t()`` of a
    (rows, n) ``z`` works without a copy; the rank's ``.t()`` is then contiguous):
    n·(n-1)/2 comparisons of whole columns."""
    n = cols.shape[0]
    rank = torch.empty_like(cols, dtype=torch.uint8)  # keeps the strides of cols
    for a in range(n):  # as if every later entry came first, corrected pair by pair
        rank[a].fill_(n - 1 - a)
    for a in range(n):
        for b in range(a + 1, n):
            a_first = (cols[a] >= cols[b]).view(torch.uint8)
            rank[b] += a_first
            rank[a] -= a_first
    return rank


def leading_values(z: Tensor, k: int) -> list[Tensor] | None:
    """For short rows of ``z`` (rows, n) and ``k < n``: each row's ``k + 1`` largest entries,
    largest first, as ``k + 1`` vectors (rows,), from a selection network over the columns (k + 1
    bubble passes of column maxima and minima: about as many passes as the pairwise ranks, but
    over the values themselves, so the k-th and (k+1)-th need no masked maxima after it).
    ``None`` where they do not strictly decrease in some row (a tie among them, which only an
    index order breaks, or a NaN): the caller ranks pairwise."""
    cols = list(z.unbind(1))
    for j in range(k + 1):
        for i in range(len(cols) - 1, j, -1):
            a, b = cols[i - 1], cols[i]
            cols[i - 1], cols[i] = torch.maximum(a, b), torch.minimum(a, b)
    top = cols[: k + 1]
    if not all(bool((a > b).all()) for a, b in zip(top, top[1:], strict=False)):
        return None
    return top


def _chosen_order(z: Tensor, k: int) -> Tensor:
    """Rank of each chosen entry of ``z`` (rows, n) in the order of choice (largest first),
    ``k`` for the rest."""
    if is_short(z.shape[1]):
        # (leading_values, which the sigmoid takes, is slower here: the order of choice would
        # need k comparisons of every entry with a row's value, broadcast over rows of n)
        return rank_rows(z.t()).t().clamp_(max=k)
    order = z.topk(k, dim=1).indices
    rank = torch.full(z.shape, k, dtype=torch.uint8 if k < 256 else torch.long,
                      device=z.device)
    return rank.scatter_(1, order, torch.arange(k, device=z.device, dtype=rank.dtype)
                         .expand_as(order))


def as_float(flags: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool tensor as 0/1 of ``dtype`` (through uint8: bool -> float converts slowly)."""
    return flags.view(torch.uint8).to(dtype)


#: dtypes numpy partitions (bfloat16 and the float8 types it lacks take ``topk``)
_PARTITION_DTYPES = (torch.float16, torch.float32, torch.float64)


def split_values(z: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """For long rows of a CPU ``z`` (rows, n) with ``0 < k < n``: each row's ``k``-th largest
    entry and its ``(k+1)``-th, as (rows, 1), from numpy's introselect (linear time, about
    twice as fast as ``topk`` on rows of a thousand); ``None`` where it does not apply or a
    row's two are equal (a tie at the boundary: only an index order could keep exactly
    ``k``), so the caller takes ``topk``."""
    n = z.shape[1]
    if z.device.type != "cpu" or z.dtype not in _PARTITION_DTYPES or not 0 < k < n:
        return None
    # one kth: partitioning at two kths at once costs several times as much, and the
    # (k+1)-th largest is the largest of the entries the partition puts below the k-th
    part = np.partition(z.detach().numpy(), n - k, axis=1)
    # a NaN would not compare as kept (topk keeps it as the largest): such rows take topk
    if np.isnan(part[:, n - k:]).any():
        return None
    high = torch.from_numpy(part[:, :n - k].max(axis=1, keepdims=True))
    low = torch.from_numpy(np.ascontiguousarray(part[:, n - k:n - k + 1]))
    return (low, high) if bool((high < low).all()) else None


def top_k_rows(z: Tensor, k: int) -> Tensor:
    """Bool mask (rows, n) of the ``k`` largest entries of every row (exactly ``k``, also
    under ties)."""
    if is_short(z.shape[1]):
        return rank_rows(z.t()).t() < k
    split = split_values(z, k)
    if split is not None:  # no tie at the boundary: the k entries at or above the k-th
        return z >= split[0]
    top = z.topk(k, dim=1, sorted=False).indices
    return torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(1, top, True)


class _RowEntropy(torch.autograd.Function):
    """Each row's entropy of ``softmax(x)``, with the gradient in one expression:
    ``dH/dx_i = -p_i (log p_i + H)`` (autograd of the formula would take several more passes
    over the logits)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = minus_rows(x, row_max(x))
        e = y.exp()
        total = row_sum(e)
        log_total = total.log()
        h = log_total - row_sum(e * y) / total
        ctx.save_for_backward(e, y, total, log_total - h)
        return h.squeeze(-1)

    @staticmethod
    def backward(ctx, g: Tensor):
        e, y, total, shift = ctx.saved_tensors  # p = e / total, log p + H = y - shift
        return rowwise_(minus_rows(y, shift).mul_(e), "mul_", g.unsqueeze(-1).neg() / total)


def row_entropy(logits: Tensor) -> Tensor:
    """The entropy (natural log) of ``softmax(logits)`` of every row, differentiable."""
    return _RowEntropy.apply(logits)


def _exp_shifted(x: Tensor, inplace: bool = True) -> Tensor:
    """``exp(x - row max)`` (in place on ``x`` unless ``inplace`` is False); the exponents
    clamped one above log(tiny): exp costs several to tens of times more where its result is
    at or below the smallest normal float (the exact values there are that small or zero,
    next to a row maximum of 1). Softmaxes are written out, not torch.softmax: on a busy CPU
    its thread pool takes milliseconds even for tiny rows, while these ops stay on one
    thread."""
    y = rowwise_(x, "sub_", row_max(x)) if inplace else minus_rows(x, row_max(x))
    return y.clamp_(min=math.log(torch.finfo(x.dtype).tiny) + 1.0).exp_()


def _step_softmaxes(scaled: Tensor, rank: Tensor, steps: Tensor) -> Tensor:
    """The softmax of each row of ``scaled`` at each step (leading axis), over the entries
    not chosen before the step (``rank >= step``; ``steps`` > 0).

    Branch-free and kept out of exp's slow paths: the chosen entries are pushed to the lowest
    float for the row maximum (masked_fill with -inf costs several times more on a random
    mask, and exp of -inf or of -3e38 is several times slower than of a normal number), then
    zeroed after the exp."""
    before = as_float(rank.unsqueeze(0) < steps, scaled.dtype)
    lowest = torch.tensor(torch.finfo(scaled.dtype).max, dtype=scaled.dtype,
                          device=scaled.device)
    e = _exp_shifted(torch.addcmul(scaled, before, lowest, value=-1))
    e.addcmul_(before, e, value=-1)  # exactly 0 where chosen before, e - 0 elsewhere
    return rowwise_(e, "div_", row_sum(e))


def _step_gradient(p: Tensor, g: Tensor) -> Tensor:
    """``p (g - <p, g>)`` per row: the vector-Jacobian product of one softmax step."""
    pg = p * g
    return rowwise_(pg, "addcmul_", row_sum(pg), p, value=-1)


class _KSoftmaxST(torch.autograd.Function):
    """Forward: the hard mask. Backward: the vector-Jacobian product of the sum of k
    successive softmaxes of ``z / tau``, step j over the entries whose rank is >= j."""

    @staticmethod
    def forward(ctx, logits: Tensor, z: Tensor, rank: Tensor, k: int, tau: float) -> Tensor:
        ctx.save_for_backward(z, rank)
        ctx.k, ctx.tau = k, tau
        return as_float(rank < k, logits.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, rank = ctx.saved_tensors
        scaled = z / ctx.tau
        # step 0 is over every entry: a plain softmax, nothing to exclude
        first = _exp_shifted(scaled, inplace=ctx.k == 1)  # later steps read scaled
        grad = _step_gradient(rowwise_(first, "div_", row_sum(first)), g)
        chunk = max(1, _CHUNK // max(z.numel(), 1))
        for j0 in range(1, ctx.k, chunk):
            steps = torch.arange(j0, min(j0 + chunk, ctx.k), device=z.device,
                                 dtype=rank.dtype)[:, None, None]
            part = _step_gradient(_step_softmaxes(scaled, rank, steps), g)
            grad.add_(part[0] if len(part) == 1 else part.sum(0))
        return grad.div_(ctx.tau), None, None, None, None


class _SigmoidST(torch.autograd.Function):
    """Forward: the hard mask. Backward: the vector-Jacobian product of
    ``sigmoid((z - t) / tau)`` with ``t`` the threshold that holds the sum constant:
    ``grad_i = w_i (g_i - sum_j w_j g_j / sum_j w_j)``, ``w = s (1 - s) / tau``."""

    @staticmethod
    def forward(ctx, logits: Tensor, z: Tensor, hard: Tensor, threshold: Tensor,
                tau: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.tau = tau
        return as_float(hard, logits.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, threshold = ctx.saved_tensors
        s = minus_rows(z, threshold).div_(ctx.tau).sigmoid_()
        w = torch.addcmul(s, s, s, value=-1)  # s (1 - s); 0 in every row when k == n
        wg = w * g
        mean = row_sum(wg) / row_sum(w).clamp_min(1e-30)
        return (rowwise_(wg, "addcmul_", mean, w, value=-1).div_(ctx.tau), None, None, None,
                None)


def ksoftmax_st(logits: Tensor, z: Tensor, k: int, tau: float) -> Tensor:
    """Hard top-k of ``z`` forward, the k-step softmax's gradient into ``logits`` backward."""
    return _KSoftmaxST.apply(logits, z, _chosen_order(z, k), k, tau)


def sigmoid_st(logits: Tensor, z: Tensor, k: int, tau: float) -> Tensor:
    """Hard top-k of ``z`` forward, the threshold sigmoid's gradient into ``logits`` backward."""
    # on the CPU (a GPU would wait for the tie check): without a tie among the k+1 largest,
    # the kept set is every entry at or above the k-th
    top = (leading_values(z, k) if is_short(z.shape[1]) and k < z.shape[1]
           and z.device.type == "cpu" else None)
    if top is not None:
        low, high = top[k - 1].unsqueeze(1), top[k].unsqueeze(1)
        return _SigmoidST.apply(logits, z, z >= low, (low + high) / 2, tau)
    lowest = torch.finfo(z.dtype).max
    if is_short(z.shape[1]):
        hard = rank_rows(z.t()).t() < k
        # the k-th largest: the dropped entries pushed to the highest float (branch-free)
        low = -row_max(z.neg().sub_(as_float(~hard, z.dtype), alpha=lowest))
    elif (split := split_values(z, k)) is not None:  # the k-th and (k+1)-th by selection
        low, high = split
        return _SigmoidST.apply(logits, z, z >= low, (low + high) / 2, tau)
    else:
        top = z.topk(k, dim=1, sorted=False)
        hard = torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(
            1, top.indices, True)
        low = top.values.amin(1, keepdim=True)
    if k == z.shape[1]:  # nothing dropped: no threshold, every w == 0
        threshold = torch.full_like(low, -torch.inf)
    else:
        # the largest dropped entry: the kept ones pushed to the lowest float
        high = row_max(z.sub(as_float(hard, z.dtype), alpha=lowest))
        threshold = (low + high) / 2
    return _SigmoidST.apply(logits, z, hard, threshold, tau)


_RELAX = {"ksoftmax": ksoftmax_st, "sigmoid": sigmoid_st}


class GumbelTopK(nn.Module):
    """DPP's mask: exactly ``k`` of every run of ``n`` groups, from learnable logits.

    ``structure`` is a ``KofN`` whose runs are the mask rows (one logit per group, shape
    ``(rows, n)``). Training forward: the hard top-k of ``logits + noise_scale * Gumbel``; the
    gradient comes from ``relaxation`` (module docstring) at temperature ``tau`` through a
    straight-through estimator. Eval forward, and training once ``fixed``: the top-k of the
    logits, no noise.
    ``quantize_bits`` adds per-tensor symmetric fake quantization of the masked weight (DPP's
    joint quantization).
    """

    def __init__(self, structure: KofN, shape: tuple[int, ...], logits: Tensor,
                 noise_scale: float, quantize_bits: int | None, generator: torch.Generator,
                 relaxation: str = "auto"):
        super().__init__()
        self.structure = structure
        self.shape = tuple(shape)
        self.k = structure.k
        self.relaxation = resolve_relaxation(relaxation, self.k)
        self.logits = nn.Parameter(logits.reshape(-1, structure.n).clone())
        self.noise_scale = noise_scale
        self.quantize_bits = quantize_bits
        self.tau = 1.0  # set by the pruner's temperature schedule
        #: set by the pruner's ``fix_pattern()``: training computes with the eval mask too
        self.fixed = False
        object.__setattr__(self, "generator", generator)  # shared with the pruner, not state

    def eval_mask(self) -> Tensor:
        """The deterministic mask: top-k of the logits, ``(rows, n)`` float."""
        return as_float(top_k_rows(self.logits.detach(), self.k), self.logits.dtype)

    def sample_mask(self) -> Tensor:
        """Hard Gumbel top-k forward, the relaxation's gradient backward."""
        d = self.logits
        z = d.detach()
        if self.noise_scale:  # in place on the fresh noise: d + s * noise, bit for bit
            z = gumbel_noise(d.shape, self.generator, d, self.noise_scale).add_(z)
        return _RELAX[self.relaxation](d, z, self.k, self.tau)

    def forward(self, w: Tensor) -> Tensor:
        mask = self.sample_mask() if self.training and not self.fixed else self.eval_mask()
        masked = w * self.structure.expand(mask.reshape(-1), self.shape)
        return fake_quantize(masked, self.quantize_bits) if self.quantize_bits else masked
