"""What ``report`` returns: a ``LayerRow`` per prunable weight and the ``Report`` around them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import render

__all__ = ["LayerRow", "Report", "plain"]


@dataclass
class LayerRow:
    """One prunable weight. Fractions are kept/total at that granularity (1.0 = nothing cut).

    ``kept_kernels`` is ``None`` for weights without a kernel axis (Linear, RNN): a linear layer
    has no kernels. A group counts as kept if any of its weights is nonzero, because only a group
    that is entirely zero can be skipped by hardware.
    """

    name: str
    module: str
    shape: tuple[int, ...]
    structure: str
    kept_elements: float
    kept_kernels: float | None
    kept_channels: float
    kept_filters: float
    params: int
    kept_params: int
    #: ``None`` where no forward pass measured them (``report_state_dict``)
    macs_dense: int | None
    macs_remaining: int | None
    dense_bytes: int
    #: bytes as ``hwprune.save`` stores the weight, index overhead included
    stored_bytes: int | None = None
    #: of ``stored_bytes``, the index/metadata part (masks, pointers, positions, sign bits)
    index_bytes: int | None = None
    #: the encoding ``hwprune.save`` picks for the weight
    encoding: str | None = None
    #: of ``stored_bytes``, the kept values (and a quantization scale)
    payload_bytes: int | None = None
    #: information-theoretic minimum of the index of the stored pattern, in bits
    min_index_bits: float | None = None
    #: dense / stored bytes, index included
    compression_ratio: float | None = None
    #: dense / payload bytes: the ratio if the index were free
    compression_ratio_no_index: float | None = None
    #: dense / (payload + min_index_bits / 8): the ratio with the smallest possible index
    compression_ratio_min: float | None = None
    #: 8 * index bytes / kept weights
    index_bits_per_kept: float | None = None
    #: 8 * stored bytes / kept weights (values and index)
    stored_bits_per_kept: float | None = None
    #: mean over kept weights of the width of the selection that places each (see docs)
    selection_width: float | None = None
    #: selection width x selections / kept weights: multiplexer inputs per kept weight
    selection_inputs_per_kept: float | None = None
    #: method-specific facts from ``pruner.layer_extras()`` (PSP: alphas, pruned fraction)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["shape"] = list(self.shape)
        d["extras"] = plain(self.extras)
        return d


@dataclass
class Report:
    """The result of ``report``: ``rows`` per weight, ``total`` and an optional ``baseline``.

    ``total`` keys: ``params``, ``kept_params``, ``kept_elements``, ``pruning_ratio`` (params /
    kept params), ``macs_dense``, ``macs_remaining``, ``mac_reduction`` (dense / remaining),
    ``dense_bytes``, ``stored_bytes``, ``index_bytes``, ``payload_bytes``, ``min_index_bits``,
    ``compression_ratio`` (dense / stored, index overhead included),
    ``compression_ratio_no_index`` (dense / payload), ``compression_ratio_min`` (dense /
    (payload + min_index_bits / 8)), ``index_bits_per_kept``, ``stored_bits_per_kept``,
    ``selection_width`` and ``selection_inputs_per_kept`` (means over kept weights) -- all over
    the prunable rows -- plus ``file_bytes`` (the size of ``hwprune.save(model, path,
    hints=self.hints())``, uncompressed) = ``file_tensor_bytes`` (every state-dict tensor's
    stored bytes) + ``file_header_bytes`` (the container header), ``file_dense_bytes`` (the
    state dict's dense bytes), ``model_macs`` (every
    MAC of the forward pass, including ops outside prunable layers such as attention matmuls;
    BN, activations and pooling have none), ``model_macs_remaining`` (the same with the
    prunable rows' zeros skipped) and ``model_params`` (every parameter, biases and BN
    included). Every MAC count is per sample (``macs_per``), the example inputs' batch
    (``batch_size``) divided out.
    Ratios are ``None`` where the denominator is 0.

    ``baseline`` (with ``baseline=``): the reference's ``params``, ``macs`` (its prunable rows,
    dense), ``model_macs``, ``model_params``, ``param_ratio`` = baseline params / this model's
    kept params, ``mac_ratio`` = baseline MACs / this model's remaining MACs, and ``layers``:
    the same two ratios per baseline weight name (a layer that is gone has ratio ``None``).
    """

    name: str
    rows: list[LayerRow]
    total: dict[str, Any]
    baseline: dict[str, Any] | None = None
    #: default targets the pruner left dense because they cannot carry its structure:
    #: ``{parameter name: why}`` (``pruner.skipped``; empty without a pruner)
    skipped: dict[str, str] = field(default_factory=dict)
    #: what the MAC counts are per: ``"sample"`` (the example batch divided out; ``total``'s
    #: ``batch_size`` says by what); ``None`` where no forward pass measured them
    macs_per: str | None = None

    def hints(self) -> dict[str, str]:
        """{weight name: structure} of the rows that have one: the storage hints the stored
        bytes were counted with (``hwprune.save(model, path, hints=rep.hints())``)."""
        return {r.name: r.structure for r in self.rows if r.structure != "-"}

    # -- machine-readable ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only, so ``json.loads(r.to_json()) == r.to_dict()``."""
        return {
            "name": self.name,
            "rows": [r.to_dict() for r in self.rows],
            "total": dict(self.total),
            "baseline": None if self.baseline is None else plain(self.baseline),
            "skipped": dict(self.skipped),
            "macs_per": self.macs_per,
        }

    def to_json(self, path: str | Path | None = None, indent: int | None = 2) -> str:
        """The report as JSON text; also written to ``path`` if given."""
        return render.json_text(self.to_dict(), path, indent)

    # -- human-readable (``render`` draws them) -----------------------------------------------
    def to_markdown(self) -> str:
        """A GitHub table, one row per weight, then a totals line (and a baseline line)."""
        return render.markdown(self)

    def print(self, console: Any = None) -> None:
        """Print a rich table (to ``console``, or a new ``rich.console.Console``)."""
        render.print_report(self, console)

    def __str__(self) -> str:
        return self.to_markdown()


def plain(x: Any) -> Any:
    """Deep copy into plain JSON types (tuples become lists)."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
