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
columns, which is several times faster on many rows than ``topk`` on rows of 4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .parametrize import fake_quantize
from .structures import KofN

__all__ = ["GumbelTopK", "RELAXATIONS", "KSOFTMAX_MAX_K", "PAIRWISE_MAX_N",
           "check_relaxation", "resolve_relaxation", "gumbel_noise", "row_layout", "rank_rows",
           "top_k_rows", "row_entropy", "ksoftmax_st", "sigmoid_st", "columns", "rows_of",
           "as_float"]

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
    g.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().mul_(-scale)
    return g.to(like.device)


class _Columns(torch.autograd.Function):
    """(rows, n) -> contiguous (n, rows), one strided copy per column (``t().contiguous()``
    takes several times longer on long, narrow matrices); its gradient the way back."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return columns(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return rows_of(g)


def columns(x: Tensor) -> Tensor:
    """``x.t().contiguous()`` for a (rows, n) ``x`` with few columns, copied column by column."""
    out = x.new_empty((x.shape[1], x.shape[0]))
    for a in range(x.shape[1]):
        out[a].copy_(x[:, a])
    return out


def rows_of(cols: Tensor) -> Tensor:
    """The inverse of ``columns``: a contiguous (rows, n) from (n, rows)."""
    out = cols.new_empty((cols.shape[1], cols.shape[0]))
    for a in range(cols.shape[0]):
        out[:, a].copy_(cols[a])
    return out


def row_layout(x: Tensor) -> tuple[Tensor, int]:
    """``x`` (rows, n) as the relaxations work on it, and the dimension of its rows' entries:
    short rows (``n <= PAIRWISE_MAX_N``) transposed to a contiguous (n, rows), so that each
    reduction over a row is a few elementwise operations over long contiguous vectors (torch's
    own reductions and softmax over rows of 4 cost many times more); long rows as they are.
    Differentiable."""
    if x.shape[1] <= PAIRWISE_MAX_N:
        return _Columns.apply(x), -2
    return x, -1


def rank_rows(cols: Tensor) -> Tensor:
    """Each entry's rank within its row, 0 for the largest (ties: the lower index first), as
    uint8, for short rows given as (n, rows): n·(n-1)/2 comparisons of whole columns."""
    n = cols.shape[0]
    rank = torch.zeros(cols.shape, dtype=torch.uint8, device=cols.device)
    for a in range(n):
        for b in range(a + 1, n):
            a_first = cols[a] >= cols[b]
            rank[b] += a_first
            rank[a] += ~a_first
    return rank


def _chosen_order(z: Tensor, dim: int, k: int) -> Tensor:
    """Rank of each chosen entry in the order of choice (largest first), ``k`` for the rest,
    in ``z``'s layout."""
    if dim == -2:
        return rank_rows(z).clamp_(max=k)
    order = z.topk(k, dim=1).indices
    rank = torch.full(z.shape, k, dtype=torch.uint8 if k < 256 else torch.long,
                      device=z.device)
    return rank.scatter_(1, order, torch.arange(k, device=z.device, dtype=rank.dtype)
                         .expand_as(order))


def as_float(flags: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool tensor as 0/1 of ``dtype`` (through uint8: bool -> float converts slowly)."""
    return flags.view(torch.uint8).to(dtype)


def top_k_rows(z: Tensor, k: int) -> Tensor:
    """Bool mask (rows, n) of the ``k`` largest entries of every row (exactly ``k``, also
    under ties)."""
    if z.shape[1] <= PAIRWISE_MAX_N:
        return rows_of(rank_rows(columns(z)) < k)
    top = z.topk(k, dim=1, sorted=False).indices
    return torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(1, top, True)


class _RowEntropy(torch.autograd.Function):
    """Each row's entropy of ``softmax(x)``, ``x`` in the relaxations' layout, with the
    gradient in one expression: ``dH/dx_i = -p_i (log p_i + H)`` (autograd of the formula
    would take several more passes over the logits)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        y = x - x.amax(dim, keepdim=True)
        e = y.exp()
        total = e.sum(dim)
        h = total.log() - (e * y).sum(dim) / total
        ctx.save_for_backward(e.div_(total.unsqueeze(dim)), y.sub_(total.log().unsqueeze(dim)),
                              h)
        ctx.dim = dim
        return h

    @staticmethod
    def backward(ctx, g: Tensor):
        p, log_p, h = ctx.saved_tensors  # log_p = y - log(total)
        dim = ctx.dim
        return log_p.add(h.unsqueeze(dim)).mul_(p).mul_(-g.unsqueeze(dim)), None


def row_entropy(logits: Tensor) -> Tensor:
    """The entropy (natural log) of ``softmax(logits)`` of every row, differentiable."""
    x, dim = row_layout(logits)
    return _RowEntropy.apply(x, dim)


def _back_to_rows(x: Tensor, dim: int) -> Tensor:
    """A tensor of the relaxations' layout (``row_layout``) as a contiguous (rows, n)."""
    return rows_of(x) if dim == -2 else x


def _step_softmaxes(scaled: Tensor, rank: Tensor, steps: Tensor, dim: int) -> Tensor:
    """The softmax of ``scaled`` at each step (leading axis), over the entries not chosen
    before the step (``rank >= step``); written out, not torch.softmax: on a busy CPU its
    thread pool takes milliseconds even for tiny rows, while these ops stay on one thread.

    Branch-free and kept out of exp's slow paths: the chosen entries are pushed to the lowest
    float for the row maximum (masked_fill with -inf costs several times more on a random
    mask, and exp of -inf or of -3e38 is several times slower than of a normal number), the
    exponents clamped at log(tiny) (a subnormal result costs tens of times more; the
    reference's values below it are subnormal or zero), then the chosen entries zeroed."""
    before = as_float(rank.unsqueeze(0) < steps, scaled.dtype)
    info = torch.finfo(scaled.dtype)
    lowest = torch.tensor(info.max, dtype=scaled.dtype, device=scaled.device)
    x = torch.addcmul(scaled, before, lowest, value=-1)
    p = x.sub_(x.amax(dim, keepdim=True)).clamp_(min=math.log(info.tiny) + 1.0).exp_()
    p.addcmul_(before, p, value=-1)  # exactly 0 where chosen before, p - 0 elsewhere
    return p.div_(p.sum(dim, keepdim=True))


class _KSoftmaxST(torch.autograd.Function):
    """Forward: the hard mask. Backward: the vector-Jacobian product of the sum of k
    successive softmaxes of ``z / tau``, step j over the entries whose rank is >= j."""

    @staticmethod
    def forward(ctx, logits: Tensor, z: Tensor, rank: Tensor, dim: int, k: int,
                tau: float) -> Tensor:
        ctx.save_for_backward(z, rank)
        ctx.dim, ctx.k, ctx.tau = dim, k, tau
        return _back_to_rows(as_float(rank < k, logits.dtype), dim)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, rank = ctx.saved_tensors
        dim = ctx.dim
        g = columns(g) if dim == -2 else g.contiguous()  # into z's layout
        scaled = z / ctx.tau
        grad = None
        chunk = max(1, _CHUNK // max(z.numel(), 1))
        for j0 in range(0, ctx.k, chunk):
            steps = torch.arange(j0, min(j0 + chunk, ctx.k), device=z.device,
                                 dtype=rank.dtype)[:, None, None]
            p = _step_softmaxes(scaled, rank, steps, dim)
            pg = p * g  # p (g - <p, g>), summed over the steps
            part = pg.sub_(p.mul_(pg.sum(dim, keepdim=True))).sum(0)
            grad = part if grad is None else grad.add_(part)
        return _back_to_rows(grad.div_(ctx.tau), dim), None, None, None, None, None


class _SigmoidST(torch.autograd.Function):
    """Forward: the hard mask. Backward: the vector-Jacobian product of
    ``sigmoid((z - t) / tau)`` with ``t`` the threshold that holds the sum constant:
    ``grad_i = w_i (g_i - sum_j w_j g_j / sum_j w_j)``, ``w = s (1 - s) / tau``."""

    @staticmethod
    def forward(ctx, logits: Tensor, z: Tensor, hard: Tensor, threshold: Tensor, dim: int,
                tau: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.dim, ctx.tau = dim, tau
        return _back_to_rows(as_float(hard, logits.dtype), dim)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, threshold = ctx.saved_tensors
        dim = ctx.dim
        g = columns(g) if dim == -2 else g.contiguous()
        s = (z - threshold).div_(ctx.tau).sigmoid_()
        w = s.mul_(1.0 - s)  # rows with every w == 0 (k == n) get a zero gradient
        wg = w * g
        mean = wg.sum(dim, keepdim=True) / w.sum(dim, keepdim=True).clamp_min(1e-30)
        return (_back_to_rows(wg.sub_(w.mul_(mean)).div_(ctx.tau), dim),
                None, None, None, None, None)


def ksoftmax_st(logits: Tensor, z: Tensor, k: int, tau: float) -> Tensor:
    """Hard top-k of ``z`` forward, the k-step softmax's gradient into ``logits`` backward."""
    z, dim = row_layout(z)
    return _KSoftmaxST.apply(logits, z, _chosen_order(z, dim, k), dim, k, tau)


def sigmoid_st(logits: Tensor, z: Tensor, k: int, tau: float) -> Tensor:
    """Hard top-k of ``z`` forward, the threshold sigmoid's gradient into ``logits`` backward."""
    z, dim = row_layout(z)
    lowest = torch.finfo(z.dtype).max
    if dim == -2:
        hard = rank_rows(z) < k
        # the k-th largest: the dropped entries pushed to the highest float (branch-free)
        low = z.add(as_float(~hard, z.dtype), alpha=lowest).amin(dim, keepdim=True)
    else:
        top = z.topk(k, dim=1, sorted=False)
        hard = torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(
            1, top.indices, True)
        low = top.values.amin(1, keepdim=True)
    if k == z.shape[dim]:  # nothing dropped: no threshold, every w == 0
        threshold = torch.full_like(low, -torch.inf)
    else:
        # the largest dropped entry: the kept ones pushed to the lowest float
        high = z.sub(as_float(hard, z.dtype), alpha=lowest).amax(dim, keepdim=True)
        threshold = (low + high) / 2
    return _SigmoidST.apply(logits, z, hard, threshold, dim, tau)


_RELAX = {"ksoftmax": ksoftmax_st, "sigmoid": sigmoid_st}


class GumbelTopK(nn.Module):
    """DPP's mask: exactly ``k`` of every run of ``n`` groups, from learnable logits.

    ``structure`` is a ``KofN`` whose runs are the mask rows (one logit per group, shape
    ``(rows, n)``). Training forward: the hard top-k of ``logits + noise_scale * Gumbel``; the
    gradient comes from ``relaxation`` (module docstring) at temperature ``tau`` through a
    straight-through estimator. Eval forward: the top-k of the logits, no noise.
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
        mask = self.sample_mask() if self.training else self.eval_mask()
        masked = w * self.structure.expand(mask.reshape(-1), self.shape)
        return fake_quantize(masked, self.quantize_bits) if self.quantize_bits else masked
