"""Reporting: what a pruned (or shrunk) model keeps, per layer and in total.

``report(model, example_inputs)`` answers the questions every method is judged by (see
METHODS.md, "What every method is judged by"): how many weights are left, at which granularity
they were removed (a zero *filter* can be cut from the network, scattered zeros only save
storage), how much arithmetic is left, and, with ``baseline=``, how a physically smaller model
compares with the dense one it came from.

One row per prunable weight: the ``weight`` of every Conv1d/2d/3d and Linear, and each
``weight_*`` matrix of an LSTM/GRU/RNN, in module order. Models that still carry
``torch.nn.utils.parametrize`` parametrizations are read through the parametrization (the
effective, masked weight) and named by the plain parameter name (``layer1.0.conv1.weight``).

MACs are *measured*, not derived from shapes: one forward pass of ``example_inputs`` under
PyTorch's own ``FlopCounterMode`` (eval mode, ``no_grad``), so strides, padding, groups and the
actual input size are all accounted for. MACs = FLOPs / 2 (the counter only counts
multiply-accumulate ops: mm, addmm, bmm, convolution). A layer's *remaining* MACs are its dense
MACs times its kept element fraction: every weight of a conv or linear layer is used equally
often (once per output position), so each zero removes the same share of the work. That is the
arithmetic an ideal sparse kernel would do, not a latency prediction.

Stored bytes count the index overhead: each weight is encoded the way ``hwprune.save`` stores
it (``hwprune.storage``: the smallest exact encoding among dense, bitmask, CSR, k-of-n, block,
unified and quantized, with the structure as a hint), so the stored total is the data section
of the file ``hwprune.save`` writes for these weights. The ``file_*`` totals describe the file
``hwprune.save(model, path, hints=rep.hints())`` writes for the whole model (every tensor of
its state dict), byte for byte: ``file_bytes == file_tensor_bytes + file_header_bytes``.
Every field is defined in docs/storage.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from ..errors import HwpruneError
from ..methods.darb import decoding_cost
from ..storage import EncodedTensor, choose, plan, summarize
from ..storage.encodings import RowBlock
from ..structures import Channel, Filter, Kernel, Structure, parse_structure
from ..targets import CONV_TYPES, LINEAR_TYPES, RNN_TYPES

__all__ = ["LayerRow", "Report", "report", "report_state_dict", "weights_of"]

#: module types whose weights get a row (RNNBase covers LSTM, GRU and RNN)
_SUPPORTED = "Conv1d/2d/3d, Linear, LSTM/GRU/RNN"


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
        d["extras"] = _plain(self.extras)
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
    included).
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
            "baseline": None if self.baseline is None else _plain(self.baseline),
        }

    def to_json(self, path: str | Path | None = None, indent: int | None = 2) -> str:
        """The report as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    # -- human-readable --------------------------------------------------------------------
    def _table(self) -> tuple[list[str], list[list[str]]]:
        """Header and cells shared by the Markdown and the terminal table."""
        header = [
            "layer", "type", "shape", "structure", "elements", "kernels", "channels",
            "filters", "params", "kept", "MACs", "MACs left", "bytes",
        ]  # fmt: skip
        layers = (self.baseline or {}).get("layers", {})
        if self.baseline is not None:
            header.append("vs baseline")
        cells = []
        for r in self.rows:
            row = [
                r.name,
                r.module,
                "x".join(map(str, r.shape)),
                r.structure,
                _pct(r.kept_elements),
                _pct(r.kept_kernels),
                _pct(r.kept_channels),
                _pct(r.kept_filters),
                f"{r.params:,}",
                f"{r.kept_params:,}",
                _si(r.macs_dense),
                _si(r.macs_remaining),
                _bytes(r.dense_bytes),
            ]
            if self.baseline is not None:
                row.append(_ratio(layers.get(r.name, {}).get("param_ratio")))
            cells.append(row)
        return header, cells

    def _storage_table(self) -> tuple[list[str], list[list[str]]]:
        """Header and cells of the per-layer storage table (docs/storage.md defines them)."""
        header = ["layer", "encoding", "dense", "stored", "index", "min index", "ratio",
                  "w/o index", "at min", "index bits/kept", "selection width"]
        cells = [[r.name, r.encoding or "-", f"{r.dense_bytes:,}", _num(r.stored_bytes),
                  _num(r.index_bytes), _num(_bytes_of(r.min_index_bits)),
                  _ratio(r.compression_ratio), _ratio(r.compression_ratio_no_index),
                  _ratio(r.compression_ratio_min), _fmt(r.index_bits_per_kept),
                  _fmt(r.selection_width)] for r in self.rows]
        return header, cells

    def _storage_lines(self) -> list[str]:
        t = self.total
        return [
            f"stored {t['stored_bytes']:,} B of {t['dense_bytes']:,} B dense (index "
            f"{t['index_bytes']:,} B, minimum {_num(_bytes_of(t['min_index_bits']))} B): "
            f"compression {_ratio(t['compression_ratio'])}, "
            f"{_ratio(t['compression_ratio_no_index'])} without index, "
            f"{_ratio(t['compression_ratio_min'])} at the minimum; "
            f"{_fmt(t['index_bits_per_kept'])} index bits and "
            f"{_fmt(t['stored_bits_per_kept'])} stored bits per kept weight; selection width "
            f"{_fmt(t['selection_width'])}",
            f"hwprune.save file: {t['file_bytes']:,} B = {t['file_tensor_bytes']:,} B tensors + "
            f"{t['file_header_bytes']:,} B header (whole state dict, {t['file_dense_bytes']:,} B "
            "dense)",
        ]

    def _summary(self) -> list[str]:
        t = self.total
        lines = [
            f"params {t['params']:,} -> kept {t['kept_params']:,} "
            f"({_pct(t['kept_elements'])}, pruning ratio {_ratio(t['pruning_ratio'])}); "
            f"MACs {_si(t['macs_dense'])} -> {_si(t['macs_remaining'])} "
            f"(reduction {_ratio(t['mac_reduction'])}); model MACs {_si(t['model_macs'])}; "
            f"dense {_bytes(t['dense_bytes'])}"
        ]
        if self.baseline is not None:
            b = self.baseline
            lines.append(
                f"baseline {b['name']}: params {b['params']:,}, MACs {_si(b['macs'])} "
                f"(model MACs {_si(b['model_macs'])}); param ratio {_ratio(b['param_ratio'])}, "
                f"MAC ratio {_ratio(b['mac_ratio'])}"
            )
        return lines

    def to_markdown(self) -> str:
        """A GitHub table, one row per weight, then a totals line (and a baseline line)."""
        header, cells = self._table()

        def line(items: list[str]) -> str:
            return "| " + " | ".join(s.replace("|", "\\|") for s in items) + " |"

        out = [f"### {self.name}", "", line(header), line(["---"] * len(header))]
        out += [line(c) for c in cells]
        out.append("")
        summary = self._summary()
        out.append(f"**Total**: {summary[0]}")
        out += [f"**Baseline**: {s.removeprefix('baseline ')}" for s in summary[1:]]
        header, cells = self._storage_table()
        out += ["", "Storage (bytes as hwprune.save stores each weight; docs/storage.md):", "",
                line(header), line(["---"] * len(header))]
        out += [line(c) for c in cells]
        out += [""] + [f"**Storage**: {s}" for s in self._storage_lines()]
        keys = sorted({k for r in self.rows for k, v in r.extras.items()
                       if isinstance(v, (int, float))})
        if keys:  # the method's scalar per-layer facts (lists such as alphas: JSON and plots)
            out += ["", "Method extras:", "", line(["layer", *keys]),
                    line(["---"] * (len(keys) + 1))]
            out += [line([r.name, *(_fmt_extra(r.extras.get(k)) for k in keys)])
                    for r in self.rows if r.extras]
        return "\n".join(out) + "\n"

    def print(self, console: Any = None) -> None:
        """Print a rich table (to ``console``, or a new ``rich.console.Console``)."""
        from rich.console import Console
        from rich.table import Table

        console = console if console is not None else Console()
        header, cells = self._table()
        table = Table(title=self.name)
        for i, h in enumerate(header):  # names fold rather than being cut off with an ellipsis
            table.add_column(h, justify="left" if i < 4 else "right", overflow="fold")
        for c in cells:
            table.add_row(*c)
        console.print(table)
        for s in self._summary():
            console.print(s, highlight=False)
        header, cells = self._storage_table()
        table = Table(title=f"{self.name}: storage")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
        for c in cells:
            table.add_row(*c)
        console.print(table)
        for s in self._storage_lines():
            console.print(s, highlight=False)

    def __str__(self) -> str:
        return self.to_markdown()


# -- formatting helpers ---------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _num(n: int | float | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _bytes_of(bits: float | None) -> int | None:
    """Whole bytes holding ``bits`` (rounded up), for display."""
    return None if bits is None else math.ceil(bits / 8)


def _si(n: int | float | None) -> str:
    """MACs: exact with thousands separators below 10,000, else K/M/G/T with one decimal."""
    if n is None:
        return "-"
    if abs(n) < 10_000:
        return f"{int(n):,}"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n}"  # pragma: no cover - unreachable


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


def _plain(x: Any) -> Any:
    """Deep copy into plain JSON types (tuples become lists)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def _frac(k: int, n: int) -> float:
    return k / n if n else 0.0


# -- the pieces of a row --------------------------------------------------------------------
def _kept_groups(structure: Structure, w: Tensor) -> float:
    """Fraction of ``structure``'s groups of ``w`` with any nonzero weight."""
    alive = (structure.to_groups(w) != 0).any(dim=1)
    return _frac(int(alive.sum()), alive.numel())


#: the ``decoding_cost`` scheme (hwprune.methods.darb) that decodes each sparse encoding:
#: irregular positions (bitmask, CSR) select among a row's inputs; a k-of-n run is an n:k
#: block-max selection, a rowblock row a b_r:1 one; block and unified tiles select a bw-wide
#: slice of the row per tile
_SCHEMES = {"bitmask": "csr", "csr": "csr", "kofn": "bmwm", "rowblock": "bmwm",
            "block": "block", "unified": "block"}


def _selection(weight: Tensor, enc: EncodedTensor) -> tuple[float, float]:
    """(selection width, selection inputs per kept weight) of decoding ``weight`` as stored.

    Dense and quantized tensors store every element in place: each kept weight is placed by a
    trivial 1-wide selection. The others use DARB's ``decoding_cost`` (docs/darb.md)."""
    scheme = _SCHEMES.get(enc.encoding)
    if scheme is None:
        return 1.0, 1.0
    mask = weight != 0
    if enc.encoding == "rowblock":
        sizes = torch.from_numpy(RowBlock.row_sizes(enc))
        cost = decoding_cost(mask, scheme, block_sizes=sizes)
    elif scheme == "bmwm":
        cost = decoding_cost(mask, scheme, block_sizes=int(enc.meta["n"]))
    elif scheme == "block":
        cost = decoding_cost(mask, scheme, block=(int(enc.meta["bh"]), int(enc.meta["bw"])))
    else:
        cost = decoding_cost(mask, scheme)
    return cost["selection_width"], cost["selection_inputs_per_kept"]


def _storage(weight: Tensor, structure: str, enc: EncodedTensor | None = None) -> dict[str, Any]:
    """How ``hwprune.save`` stores ``weight`` (``enc``: its encoding, if already chosen): the
    row's storage fields."""
    if enc is None:
        enc = choose(weight, hints=None if structure == "-" else structure)
    info = summarize(enc, weight)
    dense, total, payload = info["dense_bytes"], info["total_bytes"], info["payload_bytes"]
    kept, min_bits = info["kept"], info["min_index_bits"]
    width, inputs = _selection(weight, enc) if kept else (None, None)
    return {
        "stored_bytes": total,
        "index_bytes": info["index_bytes"],
        "encoding": info["encoding"],
        "payload_bytes": payload,
        "min_index_bits": min_bits,
        "compression_ratio": _div(dense, total),
        "compression_ratio_no_index": _div(dense, payload),
        "compression_ratio_min": None if min_bits is None else _div(dense,
                                                                     payload + min_bits / 8),
        "index_bits_per_kept": _div(8 * info["index_bytes"], kept),
        "stored_bits_per_kept": _div(8 * total, kept),
        "selection_width": width,
        "selection_inputs_per_kept": inputs,
    }


def _module_type(m: nn.Module) -> str:
    """The module's class name, without the ``Parametrized`` subclass parametrize creates."""
    cls = type(m)
    if parametrize.is_parametrized(m):
        cls = cls.__bases__[0]
    return cls.__name__


def _weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) per prunable weight, in module order."""
    # modules that implement a parametrization are not layers of the network
    inside = {
        id(sub)
        for m in model.modules()
        if parametrize.is_parametrized(m)
        for sub in m.parametrizations.modules()
    }
    out = []
    for mname, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, CONV_TYPES + LINEAR_TYPES):
            out.append((mname, m, "weight"))
        elif isinstance(m, RNN_TYPES):
            out += [(mname, m, p) for p in m._flat_weights_names if p.startswith("weight")]
    return out


def _row_name(mname: str, p: str) -> str:
    return f"{mname}.{p}" if mname else p


def weights_of(model: nn.Module) -> dict[str, Tensor]:
    """{row name: weight} of every weight ``report`` has a row for, in row order; a
    parametrized weight is its effective (masked) value. For ``plots.mask_images``."""
    return {_row_name(mname, p): getattr(m, p).detach() for mname, m, p in _weights(model)}


def _plain_name(name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight``; other names unchanged."""
    head, sep, tail = name.partition("parametrizations.")
    if sep and tail.endswith(".original"):
        return head + tail.removesuffix(".original")
    return name


def _structure_for(structures: Any, names: list[str]) -> dict[str, str]:
    """Normalize ``structures=`` to {row name: structure string} ("-" where none is given)."""
    if structures is None:
        return dict.fromkeys(names, "-")
    if isinstance(structures, (str, Structure)):
        s = str(parse_structure(structures))
        return dict.fromkeys(names, s)
    if isinstance(structures, Mapping):
        given = {_plain_name(str(k)): v for k, v in structures.items()}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise HwpruneError(
                f"report: structures= names {unknown}, which are not weights of reported "
                f"layers; allowed names: {names}"
            )
        return {n: str(parse_structure(given[n])) if n in given else "-" for n in names}
    raise HwpruneError(
        "report: structures= must be a structure name or object (applied to every row), a "
        f"dict {{parameter name: structure}}, or None; got {type(structures).__name__}"
    )


# -- measuring MACs -------------------------------------------------------------------------
def _describe(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"tensor of shape {tuple(inputs.shape)}"
    parts = [f"{tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
    return f"tuple of shapes ({', '.join(parts)})"


def _rnn_steps(m: nn.RNNBase, x: Any) -> int:
    """Time steps x batch the RNN runs for this input: every weight is used once per one."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.data.shape[0])
    if x.dim() == 2:  # unbatched (T, input)
        return int(x.shape[0])
    return int(x.shape[0] * x.shape[1])


def _measure(
    model: nn.Module, inputs: Any, rnns: list[nn.Module]
) -> tuple[dict[str, int], int, dict[int, int]]:
    """Run one forward; return (MACs per flop-counter module name, total MACs, RNN steps)."""
    if isinstance(inputs, Tensor):
        args: tuple[Any, ...] = (inputs,)
    elif isinstance(inputs, (tuple, list)):
        args = tuple(inputs)
    else:
        raise HwpruneError(
            "report: example_inputs must be a tensor or a tuple of tensors (the positional "
            f"arguments of model(...)); got {type(inputs).__name__}"
        )
    steps: dict[int, int] = {}

    def hook(m: nn.Module, a: tuple[Any, ...]) -> None:
        steps[id(m)] = steps.get(id(m), 0) + _rnn_steps(m, a[0])  # type: ignore[arg-type]

    handles = [m.register_forward_pre_hook(hook) for m in rnns]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(*args)
    except HwpruneError:
        raise
    except Exception as e:
        raise HwpruneError(
            f"report: the model failed on example_inputs ({_describe(inputs)}): "
            f"{type(e).__name__}: {e}"
        ) from e
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    counts = {k: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()}
    return counts, counter.get_total_flops() // 2, steps


def _row_macs(
    model: nn.Module,
    weights: list[tuple[str, nn.Module, str]],
    counts: dict[str, int],
    steps: dict[int, int],
) -> tuple[list[int], int]:
    """Dense MACs per weight (in ``weights`` order), and the RNN MACs the counter missed.

    A module's count goes to its weight; an RNN's is split over its matrices in proportion to
    their size, since each matrix is used once per time step. aten's fused lstm/gru/rnn ops are
    invisible to the flop counter (count 0): then an (out, in) matrix does out*in MACs per time
    step and batch element, which sums to gates*hidden*(input+hidden) per layer and direction.
    """
    root = type(model).__name__  # the counter names modules "<root class>.<qualified name>"

    def counted(mname: str) -> int:
        return counts.get(f"{root}.{mname}" if mname else root, 0)

    by_module: dict[int, list[int]] = {}
    for i, (_, m, _) in enumerate(weights):
        by_module.setdefault(id(m), []).append(i)
    macs = [0] * len(weights)
    unseen = 0
    for idx in by_module.values():
        mname, m, _ = weights[idx[0]]
        own = counted(mname)
        if parametrize.is_parametrized(m):  # work done computing the weight is not the layer's
            own -= sum(counted(f"{mname}.parametrizations.{t}") for t in m.parametrizations)
        sizes = [getattr(m, weights[i][2]).numel() for i in idx]
        if isinstance(m, RNN_TYPES) and own == 0:
            for i, size in zip(idx, sizes, strict=True):
                macs[i] = size * steps.get(id(m), 0)
                unseen += macs[i]
        else:
            for i, size in zip(idx, sizes, strict=True):
                macs[i] = own * size // sum(sizes) if size else 0
    return macs, unseen


def _fmt_extra(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...],
    baseline: nn.Module | Report | None = None,
    structures: str | Structure | Mapping[str, str | Structure] | None = None,
    name: str | None = None,
    pruner: Any = None,
) -> Report:
    """Per-layer and total kept fractions, parameters, MACs and bytes of ``model``.

    ``example_inputs``: a tensor, or a tuple of the positional arguments of ``model``; one
    forward pass is run (eval mode, no_grad; the model's modes are restored afterwards).
    ``baseline``: a dense reference (the model before pruning or shrinking, or its ``Report``),
    measured on the same inputs, to compare a shrunk model with the dense one.
    ``structures``: the structure each weight was pruned with, for the ``structure`` column: one
    name or object for every row, or {parameter name: structure}.
    ``pruner``: the pruner that produced the model (live or finalized): gives each pruned row
    its structure (unless ``structures`` is given) and the method's per-layer extras
    (``pruner.layer_extras()``: PSP's alphas and pruned fraction, ...).
    """
    if not isinstance(model, nn.Module):
        raise HwpruneError(f"report: model must be a torch.nn.Module; got {type(model).__name__}")
    weights = _weights(model)
    if not weights:
        raise HwpruneError(
            f"report: {type(model).__name__} has no prunable weights; reported layers are "
            f"{_SUPPORTED} (subclasses included)"
        )
    rnns = list({id(m): m for _, m, _ in weights if isinstance(m, RNN_TYPES)}.values())
    counts, model_macs, steps = _measure(model, example_inputs, rnns)

    macs, unseen = _row_macs(model, weights, counts, steps)
    model_macs += unseen
    names = [_row_name(mname, p) for mname, _, p in weights]
    extras: dict[str, dict[str, Any]] = {}
    if pruner is not None:
        extras = pruner.layer_extras()
        if structures is None:
            structures = {n: pruner.structure for n in pruner.layers if n in names}
    structure_of = _structure_for(structures, names)

    hints = {n: s for n, s in structure_of.items() if s != "-"}
    # the file hwprune.save(model, hints=hints) writes; rows that are state-dict tensors reuse
    # its encodings (a parametrized weight's effective value is not one)
    file = plan(model, hints)
    out = [
        _layer_row(row_name, _module_type(m), getattr(m, p).detach(), structure_of[row_name],
                   dense, extras.get(row_name, {}),
                   # a parametrized weight's effective value is not a state-dict tensor
                   None if parametrize.is_parametrized(m, p) else file.encoded.get(row_name))
        for (_, m, p), row_name, dense in zip(weights, names, macs, strict=True)
    ]
    total = _totals(out, file, model.state_dict())
    macs_dense, macs_remaining = total["macs_dense"], total["macs_remaining"]
    total.update({
        "model_macs": model_macs,
        # the whole forward pass with the prunable layers' zeros skipped
        "model_macs_remaining": model_macs - macs_dense + macs_remaining,
        "model_params": sum(p.numel() for p in model.parameters()),
    })
    rep = Report(name=name or type(model).__name__, rows=out, total=total)
    if baseline is not None:
        rep.baseline = _compare(rep, baseline, example_inputs)
    return rep


def _layer_row(name: str, module: str, w: Tensor, structure: str, macs: int | None,
               extras: dict[str, Any], enc: EncodedTensor | None) -> LayerRow:
    """One row: kept fractions, MACs (``None``: not measured) and storage of weight ``w``."""
    numel, kept = w.numel(), int(torch.count_nonzero(w))
    remaining = None  # exact integer rounding of macs * kept / numel
    if macs is not None:
        remaining = (2 * macs * kept + numel) // (2 * numel) if numel else 0
    return LayerRow(
        name=name,
        module=module,
        shape=tuple(w.shape),
        structure=structure,
        kept_elements=_frac(kept, numel),
        kept_kernels=_kept_groups(Kernel(), w) if w.dim() >= 3 else None,
        kept_channels=_kept_groups(Channel(), w),
        kept_filters=_kept_groups(Filter(), w),
        params=numel,
        kept_params=kept,
        macs_dense=macs,
        macs_remaining=remaining,
        dense_bytes=numel * w.element_size(),
        extras=extras,
        **_storage(w, structure, enc),
    )


def _totals(rows: list[LayerRow], file: Any, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Sums and ratios over the rows, and the file's accounting (``file``: its ``plan``)."""
    params = sum(r.params for r in rows)
    kept_params = sum(r.kept_params for r in rows)
    measured = all(r.macs_dense is not None for r in rows)
    macs_dense = sum(r.macs_dense for r in rows) if measured else None
    macs_remaining = sum(r.macs_remaining for r in rows) if measured else None
    dense_bytes = sum(r.dense_bytes for r in rows)
    stored_bytes = sum(r.stored_bytes for r in rows)  # type: ignore[misc]
    return {
        "params": params,
        "kept_params": kept_params,
        "kept_elements": _frac(kept_params, params),
        "pruning_ratio": _div(params, kept_params),
        "macs_dense": macs_dense,
        "macs_remaining": macs_remaining,
        "mac_reduction": _div(macs_dense, macs_remaining) if measured else None,
        "dense_bytes": dense_bytes,
        "stored_bytes": stored_bytes,
        **_storage_total(rows, dense_bytes, stored_bytes, kept_params),
        "file_tensor_bytes": file.data_bytes,
        "file_header_bytes": file.header_bytes,
        "file_bytes": file.size,
        "file_dense_bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }


def report_state_dict(state: Mapping[str, Tensor], name: str = "state dict",
                      structures: str | Structure | Mapping[str, str | Structure] | None = None
                      ) -> Report:
    """The report of saved tensors without their model (e.g. ``hwprune.load(path)``): a row
    per weight-like tensor (2+ dimensions, named ``*weight*``), with kept fractions and
    storage; MACs need the model's forward pass, so they are ``None``, as are the
    ``model_*`` totals. ``module`` is guessed from the shape (Linear: 2-D, ConvNd: N+2-D).
    The ``file_*`` totals are those of ``hwprune.save(state, path, hints=rep.hints())``."""
    if not isinstance(state, Mapping) or not all(isinstance(t, Tensor) for t in state.values()):
        raise HwpruneError("report_state_dict: state must be a dict {name: tensor}")
    names = [n for n, t in state.items() if t.dim() >= 2 and "weight" in n.rsplit(".", 1)[-1]]
    if not names:
        raise HwpruneError(f"report_state_dict: {name} holds no weight with 2+ dimensions; "
                           f"its tensors: {list(state)[:8]}")
    structure_of = _structure_for(structures, names)
    file = plan(dict(state), {n: s for n, s in structure_of.items() if s != "-"})
    rows = [_layer_row(n, "Linear" if state[n].dim() == 2 else f"Conv{state[n].dim() - 2}d",
                       state[n].detach(), structure_of[n], None, {}, file.encoded[n])
            for n in names]
    total = _totals(rows, file, state)
    total.update({"model_macs": None, "model_macs_remaining": None,
                  "model_params": sum(t.numel() for t in state.values()
                                      if t.is_floating_point())})
    return Report(name=name, rows=rows, total=total)


def _storage_total(rows: list[LayerRow], dense: int, stored: int, kept: int) -> dict[str, Any]:
    """Storage totals over the rows: sums, ratios, and means over kept weights."""
    payload = sum(r.payload_bytes for r in rows)  # type: ignore[misc]
    index = sum(r.index_bytes for r in rows)  # type: ignore[misc]
    min_bits = sum(r.min_index_bits for r in rows)  # type: ignore[misc]

    def mean(key: str) -> float | None:  # over kept weights; a row with none adds nothing
        return _div(sum(getattr(r, key) * r.kept_params for r in rows if r.kept_params), kept)

    return {
        "index_bytes": index,
        "payload_bytes": payload,
        "min_index_bits": min_bits,
        "compression_ratio": _div(dense, stored),
        "compression_ratio_no_index": _div(dense, payload),
        "compression_ratio_min": _div(dense, payload + min_bits / 8),
        "index_bits_per_kept": _div(8 * index, kept),
        "stored_bits_per_kept": _div(8 * stored, kept),
        "selection_width": mean("selection_width"),
        "selection_inputs_per_kept": mean("selection_inputs_per_kept"),
    }


def _compare(rep: Report, baseline: nn.Module | Report, inputs: Any) -> dict[str, Any]:
    """Baseline totals and baseline/model ratios, in total and per weight name."""
    if isinstance(baseline, Report):
        base = baseline
    elif isinstance(baseline, nn.Module):
        base = report(baseline, inputs)
    else:
        raise HwpruneError(
            f"report: baseline must be a torch.nn.Module or a Report; got {type(baseline).__name__}"
        )
    mine = {r.name: r for r in rep.rows}
    layers = {}
    for b in base.rows:
        r = mine.get(b.name)
        layers[b.name] = {
            "params": b.params,
            "macs": b.macs_dense,
            "param_ratio": _div(b.params, r.kept_params) if r else None,
            "mac_ratio": _div(b.macs_dense, r.macs_remaining) if r else None,
        }
    t = base.total
    return {
        "name": base.name,
        "params": t["params"],
        "macs": t["macs_dense"],
        "model_macs": t["model_macs"],
        "model_params": t["model_params"],
        "param_ratio": _div(t["params"], rep.total["kept_params"]),
        "mac_ratio": _div(t["macs_dense"], rep.total["macs_remaining"]),
        "layers": layers,
    }
