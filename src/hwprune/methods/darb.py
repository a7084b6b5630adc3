"""DARB: Density-Adaptive Regular-Block pruning (Ren, Zhang, Wang, Lin, Dong, Chen, Xie, Wang,
AAAI 2020), with block-max weight masking (BMWM) and the decoding-cost measure it is judged by.

Every weight is seen as its im2col matrix ``W.reshape(rows, cols)`` (a Linear or an LSTM/GRU
weight is already that matrix, one row per gate unit). Row ``r`` gets a block size ``b_r``:

* **BMWM**: the row is cut into ``ceil(cols / b_r)`` blocks of ``b_r`` consecutive weights and
  the ``m`` largest ``|w|`` of each block are kept (default ``m = 1``; a ragged last block of
  ``len < m`` weights keeps all ``len``). One block size for all rows is ``1:b`` sparsity.
* **Density adaptation**: a reference irregular pruning to the target ratio (per-layer
  magnitude by default, or any pruner's ``masks()``, e.g. ADMM's) gives each row's survivor
  count ``nnz_r``; the ideal block size is ``m * cols / nnz_r``. The rule for hitting the ratio:
  ``b_r`` is the allowed size nearest, in log2, to ``c * m * cols / nnz_r``, with **one scale c
  per layer** chosen so the layer's kept count is the closest reachable to ``rows*cols/ratio``.
  Sweeping c upwards moves rows one at a time to the next larger size (sparsest rows first,
  among equally dense rows the later row first), so the assignment is monotone: a strictly
  denser row never gets a larger block. The kept count changes by at most one row's step per
  move, so the **tolerance** is: per layer, ``|kept - rows*cols/ratio| <= max_step / 2`` with
  ``max_step = max_i m*(ceil(cols/a_i) - ceil(cols/a_{i+1}))`` over consecutive allowed sizes
  (at most ``m*ceil(cols/2)/2`` weights for sizes 1 and 2, i.e. below one row's worth).
* **Retraining** with the masks fixed (a ``Mask`` parametrization), optionally after a gradual
  schedule (``hwprune.schedules``): at each due step the masks are recomputed (reference, block
  sizes and BMWM, from the effective weights) at the ratio ``1 / (1 - s_t)``.

Allowed sizes: ``allowed=None`` (the default) is ``(1, 2, 4, ..., 64)``, restricted per layer to
sizes ``<= cols`` and (for ``m > 1``) ``> m``; an explicit ``allowed`` must fit every targeted
row (``b <= cols``) and every size must exceed ``m`` when ``m > 1`` (``b = 1`` with ``m = 1`` is
a dense row). A target ratio outside what the allowed sizes can reach on a layer is an error.

Decoding cost: ``hwprune.hardware.decoding_cost`` (``_layer_extras`` reports it for DARB;
``decoding_cost`` and ``block_kept`` are importable from here too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, StructureError
from ..hardware import ROW_BLOCK_SIZES, block_kept, decoding_cost, im2col_shape
from ..schedules import Linear, OneShot, Schedule
from ..structures import Element
from ..targets import Spec, out_in
from .base import PrunedLayer, Pruner
from .magnitude import Magnitude
from .registry import register_method
from .selection import keep_all_but_lowest

__all__ = ["DARB", "DEFAULT_ALLOWED", "bmwm_mask", "assign_block_sizes", "decoding_cost",
           "block_kept"]

#: DARB's default allowed block sizes: the row block sizes the hardware model and the storage's
#: ``rowblock`` encoding share
DEFAULT_ALLOWED = ROW_BLOCK_SIZES


def bmwm_mask(w: Tensor, block_sizes: Tensor | int, m: int = 1) -> Tensor:
    """Block-max weight mask of ``w`` (bool, ``w``'s shape): in every row of the im2col matrix,
    the ``m`` largest ``|w|`` of each block of ``block_sizes[r]`` consecutive weights.

    ``block_sizes``: one int for all rows, or a ``(rows,)`` tensor. Ties keep the lower
    position (a stable sort), so masks are deterministic.
    """
    rows, cols = im2col_shape(w.shape)
    mat = w.detach().reshape(rows, cols).abs()
    sizes = (torch.full((rows,), int(block_sizes)) if isinstance(block_sizes, int)
             else block_sizes.to("cpu", torch.long))
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for b in sizes.unique().tolist():
        r = (sizes == b).nonzero().flatten().to(w.device)
        nb = -(-cols // b)
        x = F.pad(mat[r], (0, nb * b - cols), value=-math.inf).reshape(len(r), nb, b)
        top = torch.sort(x, dim=2, descending=True, stable=True).indices[..., :min(m, b)]
        sel = torch.zeros_like(x, dtype=torch.bool).scatter_(2, top, True)
        mask[r] = sel.reshape(len(r), nb * b)[:, :cols]  # padding picks fall off here
    return mask.reshape(w.shape)


def assign_block_sizes(nnz: Tensor, cols: int, target_kept: float, sizes: Sequence[int],
                       m: int = 1) -> Tensor:
    """Per-row block sizes from the reference survivor counts ``nnz`` (the rule in the module
    docstring): the allowed size nearest in log2 to ``c * m * cols / nnz_r`` with one scale
    ``c`` chosen so the total ``block_kept`` is closest to ``target_kept``. Returns a long
    ``(rows,)`` tensor of sizes from ``sizes``."""
    a = sorted(int(s) for s in sizes)
    rows = nnz.numel()
    if len(a) == 1:
        return torch.full((rows,), a[0], dtype=torch.long)
    kept_at = np.array([block_kept(cols, b, m) for b in a], dtype=np.int64)
    mids = np.sqrt(np.array(a[:-1], float) * np.array(a[1:], float))
    with np.errstate(divide="ignore", invalid="ignore"):
        ideal = m * cols / nnz.double().cpu().numpy()  # inf for an empty row
        c = np.where(np.isinf(ideal)[:, None], 0.0, mids[None, :] / ideal[:, None])
    row = np.repeat(np.arange(rows), len(a) - 1)
    level = np.tile(np.arange(len(a) - 1), rows)
    # events in order of c; equally dense rows move later row first; a row's levels in order
    order = np.lexsort((level, -row, c.reshape(-1)))
    delta = (kept_at[1:] - kept_at[:-1])[level[order]]
    totals = np.concatenate([[rows * kept_at[0]], rows * kept_at[0] + np.cumsum(delta)])
    j = int(np.argmin(np.abs(totals - target_kept)))  # first minimum: fewer moves
    levels = np.bincount(row[order[:j]], minlength=rows)
    return torch.tensor(np.array(a)[levels], dtype=torch.long)


@register_method(
    configs={"element": {"ratio": 4.0, "schedule": Linear(0, 6, every=2)}},
    structure_arg=None,
    bad_settings=({"ratio": 0.5}, {"m": 0}, {"allowed": (2, 2)}),
    recipe="darb-digits", doc="darb.md")
class DARB(Pruner):
    """Density-adaptive regular-block pruning: per-row block sizes, block-max masks.

    Args:
        model: the model to prune (modified in place).
        ratio: target pruning ratio (dense / kept weights) of every targeted layer, > 1.
        allowed: block sizes a row may get; ``None`` = ``DEFAULT_ALLOWED`` (1 .. 64, powers of
            two) restricted per layer to what fits (see the module docstring).
        m: weights kept per block (default 1); every allowed size must exceed it when > 1.
        reference: ``"magnitude"`` (per-layer irregular magnitude pruning to ``ratio``, the
            default) or ``{parameter name: bool mask}`` from any irregular pruning (e.g.
            ``hp.ADMM(...).masks()``): only its per-row survivor counts are used.
        schedule: ``None`` prunes once, now; or a ``hwprune.schedules.Schedule`` whose
            sparsity ``s_t`` sets the ratio ``1 / (1 - s_t)`` at each due step or epoch.
        targets: which weights; see ``hwprune.targets`` (``torch.nn.LSTM`` for an LSTM's
            matrices).
        strict: refuse (``StructureError``) a default target that cannot carry the
            structure instead of leaving it dense with a ``SkippedLayersWarning``.
    """

    def __init__(self, model: nn.Module, ratio: float,
                 allowed: Sequence[int] | None = None, m: int = 1,
                 reference: str | Mapping[str, Tensor] = "magnitude",
                 schedule: Schedule | None = None, targets: Spec = None, strict: bool = False):
        self.ratio = ratio
        self.allowed = allowed
        self.m = m
        self.reference = reference
        self.schedule = schedule if schedule is not None else OneShot()
        self.block_sizes: dict[str, Tensor] = {}
        super().__init__(model, Element(), targets, strict)

    # -- construction ---------------------------------------------------------------------
    def _check_config(self) -> None:
        r, m = self.ratio, self.m
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 1 or math.isinf(r):
            raise ConfigError(f"ratio must be a finite number > 1 (dense / kept weights); "
                              f"got {r!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"m (weights kept per block) must be an int >= 1; got {m!r}")
        if not isinstance(self.schedule, Schedule):
            raise ConfigError("schedule must be None (one-shot now) or a hwprune.schedules."
                              f"Schedule (OneShot, Linear, Cubic); got {self.schedule!r}")
        if self.allowed is not None:
            a = self.allowed
            if (isinstance(a, (str, bytes)) or not isinstance(a, Sequence) or not a
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                               for b in a) or len(set(a)) != len(a)):
                raise ConfigError(f"allowed must be a non-empty sequence of distinct ints >= 1 "
                                  f"(block sizes); got {a!r}")
            if m > 1 and min(a) <= m:
                raise ConfigError(f"m={m} must be smaller than every allowed block size; got "
                                  f"allowed={tuple(a)} (allowed: sizes > {m})")
        if not isinstance(self.reference, str) and not isinstance(self.reference, Mapping):
            raise ConfigError(f"reference must be 'magnitude' or {{name: bool mask}}; got "
                              f"{type(self.reference).__name__}")
        if isinstance(self.reference, str) and self.reference != "magnitude":
            raise ConfigError(f"reference must be 'magnitude' or {{name: bool mask}}; got "
                              f"{self.reference!r}")
        self.final_sparsity = 1.0 - 1.0 / r
        self.allowed_sizes: dict[str, tuple[int, ...]] = {}

    def _check_layer(self, layer: PrunedLayer) -> None:
        r, m, name = self.ratio, self.m, layer.name
        rows, cols = im2col_shape(layer.target.out_in_shape)
        sizes = self._layer_sizes(layer)
        lo = cols / block_kept(cols, sizes[0], m)
        hi = cols / block_kept(cols, sizes[-1], m)
        if not lo * (1 - 1e-9) <= r <= hi * (1 + 1e-9):
            raise ConfigError(
                f"{name}: ratio {r:g} is outside what block sizes {sizes} (m={m}) reach on "
                f"rows of {cols}: allowed ratios {lo:.4g} .. {hi:.4g}"
            )
        if isinstance(self.reference, Mapping):
            ref = self.reference.get(name)
            if ref is None or tuple(ref.shape) != layer.shape:
                raise ConfigError(
                    f"reference mask for {name} is missing or not of shape {layer.shape}; "
                    f"got {None if ref is None else tuple(ref.shape)}"
                )
        self.allowed_sizes[name] = sizes
        # every row dense until the first prune (b = 1 keeps every weight)
        self.block_sizes[name] = torch.ones(rows, dtype=torch.long)

    def _layer_sizes(self, layer: PrunedLayer) -> tuple[int, ...]:
        _, cols = im2col_shape(layer.target.out_in_shape)
        if self.allowed is None:
            sizes = [b for b in DEFAULT_ALLOWED if b <= cols and (self.m == 1 or b > self.m)]
            if not sizes:
                raise StructureError(f"{layer.name}: rows of {cols} weights fit no default block "
                                     f"size > m={self.m}; pass allowed= or exclude the layer")
            return tuple(sizes)
        too_big = [b for b in self.allowed if b > cols]
        if too_big:
            raise StructureError(
                f"{layer.name}: allowed block sizes {too_big} do not fit its rows of {cols} "
                f"weights (shape {layer.shape}); allowed: sizes <= {cols}"
            )
        return tuple(sorted(self.allowed))

    # -- the schedule: Magnitude's machinery (full masks at first, ``prune_to(sparsity)`` at
    # each due step or epoch of ``self.schedule`` towards ``self.final_sparsity``)
    _make_parametrization = Magnitude._make_parametrization
    _on_attach = Magnitude._on_attach
    _on_step = Magnitude._on_step
    _on_epoch_end = Magnitude._on_epoch_end
    _maybe_update = Magnitude._maybe_update

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Recompute every layer's block sizes and block-max mask for the ratio
        ``1 / (1 - sparsity)`` (one step of a gradual schedule; the last is the target ratio).
        Ratios below a layer's reachable range give its smallest blocks."""
        ratio = 1.0 / (1.0 - sparsity)
        for name, layer in self.layers.items():
            # rows are output units, blocks run along the inputs (a Conv1D stores (in, out))
            flip = layer.target.transposed
            w = out_in(layer.effective_weight(), flip)
            rows, cols = im2col_shape(w.shape)
            ref = out_in(self._reference_mask(name, layer.effective_weight(), sparsity)
                         .reshape(layer.shape), flip)
            nnz = ref.reshape(rows, cols).sum(1)
            sizes = assign_block_sizes(nnz, cols, rows * cols / ratio, self.allowed_sizes[name],
                                       self.m)
            self.block_sizes[name] = sizes
            layer.parametrization.mask.copy_(out_in(bmwm_mask(w, sizes, self.m), flip))
        self.sync()  # masks and block sizes from rank-local weights: rank 0's everywhere

    def _reference_mask(self, name: str, w: Tensor, sparsity: float) -> Tensor:
        if isinstance(self.reference, Mapping):
            return self.reference[name].bool()
        return keep_all_but_lowest(w.abs().reshape(-1), sparsity, 1)

    # -- reporting and state --------------------------------------------------------------
    def _layer_extras(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, layer in self.layers.items():
            sizes = self.block_sizes[name]
            cost = decoding_cost(out_in(self._mask(layer), layer.target.transposed), "darb",
                                 block_sizes=sizes,
                                 allowed=self.allowed_sizes[name])
            out[name] = {"block_sizes": sizes.tolist(),
                         "index_bits_per_kept": cost["index_bits_per_kept"],
                         "selection_width": cost["selection_width"],
                         "pruning_ratio": math.prod(layer.shape) / cost["kept"]}
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"block_sizes": {n: s.clone() for n, s in self.block_sizes.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        sizes = state.get("block_sizes", {})
        self.block_sizes.update({n: sizes[n].clone().long() for n in self.layers if n in sizes})
