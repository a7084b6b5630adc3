"""hwprune.report: kept fractions, measured MACs, baselines and output formats on tiny models."""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Callable

import pytest
import torch
from rich.console import Console
from torch import Tensor, nn
from torch.nn.utils import parametrize

import hwprune as hp
from hwprune import hardware
from hwprune.errors import HwpruneError, StructureError
from hwprune.hardware import decoding_cost
from hwprune.report.measure import LayerRow, Report, report
from hwprune.storage import file_layout
from hwprune.storage.bits import unpack_uint
from hwprune.storage.encodings import RowBlock
from hwprune.structures import KofN

# ---------------------------------------------------------------------------------- helpers


def _ones(*modules: nn.Module) -> None:
    """All weights 1, so the only zeros are the ones a test puts there."""
    with torch.no_grad():
        for m in modules:
            m.weight.fill_(1.0)


def _row(rep: Report, name: str) -> LayerRow:
    (row,) = [r for r in rep.rows if r.name == name]
    return row


class Mask(nn.Module):
    """A mask parametrization that also does a matmul, so its own MACs would be visible."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: Tensor) -> Tensor:
        eye = torch.eye(w[0].numel(), dtype=w.dtype)
        return (w.reshape(w.shape[0], -1) @ eye).reshape(w.shape) * self.mask


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.a(x) + self.b(y)


class Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module, out: int):
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(out, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.rnn(x)[0])


# ------------------------------------------------------------------------- kept fractions

CONV_CASES: dict[str, tuple[Callable[[Tensor], None], dict[str, float]]] = {
    # Conv2d(4, 6, 3): 6 filters, 4 channels, 24 kernels of 9, 216 weights
    "filter": (
        lambda w: w[2].zero_(),
        {"elements": 180 / 216, "kernels": 20 / 24, "channels": 1.0, "filters": 5 / 6},
    ),
    "channel": (
        lambda w: w[:, 1].zero_(),
        {"elements": 162 / 216, "kernels": 18 / 24, "channels": 3 / 4, "filters": 1.0},
    ),
    "kernel": (
        lambda w: w[0, 3].zero_(),
        {"elements": 207 / 216, "kernels": 23 / 24, "channels": 1.0, "filters": 1.0},
    ),
    "scattered": (
        lambda w: (w[0, 0, 0, 0].zero_(), w[3, 2, 1, 1].zero_(), w[5, 3, 2, 0].zero_()),
        {"elements": 213 / 216, "kernels": 1.0, "channels": 1.0, "filters": 1.0},
    ),
    "all": (
        lambda w: w.zero_(),
        {"elements": 0.0, "kernels": 0.0, "channels": 0.0, "filters": 0.0},
    ),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_kept_fractions_exact(case: str) -> None:
    zero, expected = CONV_CASES[case]
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    _ones(model[0])
    with torch.no_grad():
        zero(model[0].weight)
    row = report(model, torch.randn(1, 4, 5, 5)).rows[0]
    got = {
        "elements": row.kept_elements,
        "kernels": row.kept_kernels,
        "channels": row.kept_channels,
        "filters": row.kept_filters,
    }
    assert got == expected  # exact: both sides are the same ratio of integers
    assert row.params == 216
    assert row.kept_params == round(216 * expected["elements"])
    assert (row.name, row.module, row.shape) == ("0.weight", "Conv2d", (6, 4, 3, 3))


LINEAR_CASES: dict[str, tuple[Callable[[Tensor], None], dict[str, float]]] = {
    # Linear(5, 4): 4 neurons (filters) of 5 inputs (channels)
    "filter": (lambda w: w[1].zero_(), {"elements": 15 / 20, "channels": 1.0, "filters": 3 / 4}),
    "channel": (
        lambda w: w[:, 2].zero_(),
        {"elements": 16 / 20, "channels": 4 / 5, "filters": 1.0},
    ),
    "scattered": (
        lambda w: (w[0, 0].zero_(), w[3, 4].zero_()),
        {"elements": 18 / 20, "channels": 1.0, "filters": 1.0},
    ),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_kept_fractions_exact(case: str) -> None:
    zero, expected = LINEAR_CASES[case]
    model = nn.Sequential(nn.Linear(5, 4))
    _ones(model[0])
    with torch.no_grad():
        zero(model[0].weight)
    row = report(model, torch.randn(2, 5)).rows[0]
    assert row.kept_kernels is None  # a linear layer has no kernels
    got = {"elements": row.kept_elements, "channels": row.kept_channels}
    got["filters"] = row.kept_filters
    assert got == expected


def test_rows_follow_module_order_and_skip_other_modules() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, 3),
    )
    rep = report(model, torch.randn(2, 2, 10))
    assert [r.name for r in rep.rows] == ["0.weight", "4.weight"]
    assert [r.module for r in rep.rows] == ["Conv1d", "Linear"]
    assert rep.rows[0].dense_bytes == 4 * 2 * 3 * 4  # float32
    assert rep.total["model_params"] == sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------- MACs


@pytest.mark.parametrize(
    "layer, x, macs",
    [
        (nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 10, 10), 8 * 3 * 9 * 100),
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.randn(2, 3, 10, 10), 8 * 3 * 9 * 25),
        (nn.Conv2d(4, 8, 3, padding=1, groups=2), torch.randn(1, 4, 6, 6), 8 * 2 * 9 * 36),
        (nn.Conv1d(2, 4, 3), torch.randn(1, 2, 10), 4 * 2 * 3 * 8),
        (nn.Conv3d(2, 3, 2), torch.randn(1, 2, 4, 4, 4), 3 * 2 * 8 * 27),
        (nn.Linear(800, 10), torch.randn(2, 800), 800 * 10),
        (nn.Linear(6, 5), torch.randn(2, 7, 6), 7 * 6 * 5),
    ],
)
def test_dense_macs_match_hand_count(layer: nn.Module, x: Tensor, macs: int) -> None:
    """Per sample: the example batch (the first dimension) is divided out."""
    rep = report(nn.Sequential(layer), x)
    assert rep.macs_per == "sample" and rep.total["batch_size"] == x.shape[0]
    assert rep.rows[0].macs_dense == macs
    assert rep.rows[0].macs_remaining == macs
    assert rep.total["macs_dense"] == rep.total["model_macs"] == macs


def test_model_macs_include_work_outside_prunable_layers() -> None:
    class WithMatmul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) @ x.t()  # (2, 4) @ (4, 2): 16 MACs outside any layer

    rep = report(WithMatmul(), torch.randn(2, 4))  # per sample: halved
    assert rep.total["macs_dense"] == 4 * 4
    assert rep.total["model_macs"] == 4 * 4 + 8


def test_remaining_macs_scale_with_kept_fraction() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    _ones(model[0], model[2])
    with torch.no_grad():
        model[0].weight[:4] = 0  # half the filters
        model[2].weight.view(-1)[::4] = 0  # a quarter of the weights, scattered
    rep = report(model, torch.randn(1, 3, 10, 10))
    first, second = rep.rows
    assert first.macs_remaining * 2 == first.macs_dense == 8 * 3 * 9 * 100
    assert second.macs_remaining * 4 == second.macs_dense * 3
    assert rep.total["macs_remaining"] == first.macs_remaining + second.macs_remaining
    assert rep.total["mac_reduction"] == rep.total["macs_dense"] / rep.total["macs_remaining"]
    assert rep.total["pruning_ratio"] == rep.total["params"] / rep.total["kept_params"]


# ----------------------------------------------------------------------------- parametrized


def test_parametrized_model_reports_plain_names_and_masked_weights() -> None:
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 2))
    model = copy.deepcopy(dense)
    _ones(model[0])
    mask = torch.ones_like(model[0].weight)
    mask[1] = 0  # one filter of four
    parametrize.register_parametrization(model[0], "weight", Mask(mask))
    assert torch.count_nonzero(model[0].parametrizations.weight.original) == mask.numel()

    rep = report(model, torch.randn(1, 3, 6, 6))
    assert [r.name for r in rep.rows] == ["0.weight", "2.weight"]
    conv = rep.rows[0]
    assert conv.module == "Conv2d"
    assert conv.kept_filters == 3 / 4
    assert conv.kept_params == 3 * 27
    # the parametrization's own matmul is not the layer's work
    assert conv.macs_dense == report(dense, torch.randn(1, 3, 6, 6)).rows[0].macs_dense
    assert conv.macs_dense == 4 * 3 * 9 * 36


def test_report_restores_train_and_eval_modes() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout())
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    before = model[1].running_mean.clone()
    report(model, torch.randn(2, 1, 5, 5))
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert torch.equal(model[1].running_mean, before)  # eval: BN statistics untouched
    with pytest.raises(HwpruneError):
        report(model, torch.randn(2, 3, 5, 5))
    assert [m.training for m in model.modules()] == [True, True, True, False]


# ------------------------------------------------------------------------------------ RNNs


def test_lstm_rows_and_macs() -> None:
    inp, hid, steps, batch = 3, 5, 7, 2
    lstm = nn.LSTM(inp, hid, num_layers=2, batch_first=True)
    rep = report(lstm, torch.randn(batch, steps, inp))
    assert [r.name for r in rep.rows] == [
        "weight_ih_l0",
        "weight_hh_l0",
        "weight_ih_l1",
        "weight_hh_l1",
    ]
    assert all(r.module == "LSTM" and r.kept_kernels is None for r in rep.rows)
    per_step = {"weight_ih_l0": 4 * hid * inp, "weight_hh_l0": 4 * hid * hid}
    per_step |= {"weight_ih_l1": 4 * hid * hid, "weight_hh_l1": 4 * hid * hid}
    for r in rep.rows:  # per sample: batch-first, the batch is divided out
        assert r.macs_dense == per_step[r.name] * steps > 0
    # gates * hidden * (input + hidden) per step, per layer
    layer0 = 4 * hid * (inp + hid) * steps
    assert _row(rep, "weight_ih_l0").macs_dense + _row(rep, "weight_hh_l0").macs_dense == layer0
    assert rep.total["model_macs"] == rep.total["macs_dense"]


def test_gru_in_a_model_sequence_first_and_bidirectional() -> None:
    inp, hid, steps, batch = 4, 3, 5, 2
    model = Recurrent(nn.GRU(inp, hid, bidirectional=True), 2 * hid)
    with torch.no_grad():
        model.rnn.weight_hh_l0_reverse[:hid] = 0  # one gate of three
    # sequence-first: the batch is the second dimension, so it is given
    rep = report(model, torch.randn(steps, batch, inp), batch_size=batch)
    assert [r.name for r in rep.rows] == [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.weight_ih_l0_reverse",
        "rnn.weight_hh_l0_reverse",
        "fc.weight",
    ]
    hh = _row(rep, "rnn.weight_hh_l0_reverse")
    assert hh.macs_dense == 3 * hid * hid * steps
    assert hh.kept_filters == 2 / 3
    assert hh.macs_remaining * 3 == hh.macs_dense * 2
    assert _row(rep, "fc.weight").macs_dense == steps * 2 * hid * 2
    assert rep.total["model_macs"] == rep.total["macs_dense"]


# ---------------------------------------------------------------------------------- outputs


def _small() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
    model.append(nn.Linear(8 * 100, 10))
    with torch.no_grad():
        model[0].weight[::2] = 0
    return model


def test_to_json_round_trips(tmp_path) -> None:
    rep = report(_small(), torch.randn(1, 3, 10, 10), baseline=_small(), structures="filter")
    text = rep.to_json()
    assert json.loads(text) == rep.to_dict()
    loaded = json.loads(text)
    for got, row in zip(loaded["rows"], rep.rows, strict=True):
        assert got["name"] == row.name
        assert got["shape"] == list(row.shape)
        assert got["macs_dense"] == row.macs_dense
        assert got["macs_remaining"] == row.macs_remaining
        assert got["kept_elements"] == row.kept_elements
        assert got["stored_bytes"] == row.stored_bytes and got["encoding"] == row.encoding
    assert loaded["total"] == rep.total
    path = tmp_path / "report.json"
    assert json.loads(rep.to_json(path)) == json.loads(path.read_text())


def test_markdown_and_rich_table() -> None:
    rep = report(_small(), torch.randn(1, 3, 10, 10), name="small")
    md = rep.to_markdown()
    assert str(rep) == md
    lines = md.splitlines()
    assert lines[0] == "### small"
    for r in rep.rows:
        assert any(line.startswith(f"| {r.name} |") for line in lines)
    assert "| 0.weight | Conv2d | 8x3x3x3 | - | 50.0% | 50.0% | 100.0% | 50.0% | 216 |" in md
    assert "21.6K" in md and "8,000" in md  # MACs: suffixes for large, separators for small
    assert any(line.startswith("**Total**") for line in lines)

    buf = io.StringIO()
    rep.print(Console(file=buf, width=250))
    out = buf.getvalue()
    assert all(r.name in out for r in rep.rows)
    assert "pruning ratio" in out


def test_structures_column() -> None:
    model = _small()
    x = torch.randn(1, 3, 10, 10)
    assert [r.structure for r in report(model, x).rows] == ["-", "-"]
    assert [r.structure for r in report(model, x, structures="2:4").rows] == ["2:4", "2:4"]
    by_name = report(model, x, structures={"0.weight": KofN(2, 4), "3.weight": "FILTER"})
    assert [r.structure for r in by_name.rows] == ["2:4", "filter"]
    partial = report(model, x, structures={"0.parametrizations.weight.original": "kernel"})
    assert [r.structure for r in partial.rows] == ["kernel", "-"]


def test_structure_column_is_each_layers_own_structure_from_the_pruner() -> None:
    # DPP's "weight" rows are k-of-n over each layer's row length: the pruner's own structure
    # ("element") is no layer's structure
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 4))
    pruner = hp.DPP(model, "weight", k=2, targets=["0", "2", "4"])
    expected = {"0.weight": "2:8", "2.weight": "2:16", "4.weight": "2:12"}
    assert {n: str(layer.structure) for n, layer in pruner.layers.items()} == expected
    for live in (True, False):
        rep = report(model if live else pruner.finalize(), torch.randn(2, 8), pruner=pruner)
        assert {r.name: r.structure for r in rep.rows} == expected
        assert rep.hints() == expected
        assert "| 0.weight | Linear | 16x8 | 2:8 |" in rep.to_markdown()


# --------------------------------------------------------------------------------- baseline


def test_baseline_with_zeroed_filters() -> None:
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    pruned = copy.deepcopy(dense)
    _ones(dense[0], pruned[0], pruned[2])
    with torch.no_grad():
        pruned[0].weight[4:] = 0  # half the filters of the first layer
    x = torch.randn(1, 3, 10, 10)
    rep = report(pruned, x, baseline=dense)
    b = rep.baseline
    assert b is not None
    assert b["layers"]["0.weight"]["param_ratio"] == 2.0
    assert b["layers"]["0.weight"]["mac_ratio"] == 2.0
    assert b["layers"]["2.weight"]["param_ratio"] == 1.0
    assert b["params"] == rep.total["params"]
    assert b["param_ratio"] == b["params"] / rep.total["kept_params"]
    assert b["mac_ratio"] == b["macs"] / rep.total["macs_remaining"]
    assert "vs baseline" in rep.to_markdown() and "2.00x" in rep.to_markdown()
    assert report(pruned, x, baseline=report(dense, x)).baseline == b


def test_baseline_compares_a_shrunk_model_with_the_dense_one() -> None:
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 10, 10)
    rep = report(small, x, baseline=dense)
    b = rep.baseline
    assert b is not None
    assert b["layers"]["0.weight"]["param_ratio"] == 2.0
    assert b["layers"]["2.weight"]["param_ratio"] == 2.0
    assert b["param_ratio"] == 2.0 and b["mac_ratio"] == 2.0
    assert b["model_macs"] == 2 * rep.total["model_macs"]


# ----------------------------------------------------------------------------------- errors


def test_failing_inputs_name_the_shape_and_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(HwpruneError, match=r"\(1, 5, 10, 10\).*RuntimeError"):
        report(model, torch.randn(1, 5, 10, 10))
    with pytest.raises(HwpruneError, match="tensor or a tuple"):
        report(model, {"x": torch.randn(1, 3, 5, 5)})  # type: ignore[arg-type]


def test_tuple_inputs() -> None:
    rep = report(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 5)))
    assert [r.macs_dense for r in rep.rows] == [4 * 3, 5 * 3]
    with pytest.raises(HwpruneError, match=r"\(2, 4\), \(2, 4\)"):
        report(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 4)))


def test_model_without_prunable_weights() -> None:
    with pytest.raises(HwpruneError, match="no prunable weights"):
        report(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), torch.randn(2, 3))


def test_bad_structures() -> None:
    model, x = _small(), torch.randn(1, 3, 10, 10)
    with pytest.raises(HwpruneError, match="nope.weight"):
        report(model, x, structures={"nope.weight": "filter"})
    with pytest.raises(StructureError):
        report(model, x, structures="triangle")
    with pytest.raises(HwpruneError, match="baseline"):
        report(model, x, baseline="dense")  # type: ignore[arg-type]


@pytest.mark.parametrize("structure, sparsity, encoding", [
    ("2:4", None, "kofn"), ("block:4x4", 0.5, "block"), ("element", 0.9, None)])
def test_stored_bytes_are_the_data_hwprune_save_writes(tmp_path, structure, sparsity, encoding):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Flatten(),
                          nn.Linear(32 * 6 * 6, 64), nn.Linear(64, 10))
    pruner = hp.Magnitude(model, structure, sparsity)
    pruner.finalize()
    rep = report(model, torch.randn(1, 3, 10, 10), pruner=pruner)
    weights = {r.name: model.get_parameter(r.name).detach() for r in rep.rows}
    path = tmp_path / "weights.hwp"
    hp.save(weights, path, hints={r.name: r.structure for r in rep.rows if r.structure != "-"})
    layout = file_layout(path)
    assert layout["data_bytes"] == rep.total["stored_bytes"]
    assert layout["size"] == rep.total["stored_bytes"] + layout["header_bytes"]
    pruned = [r for r in rep.rows if r.structure != "-"]
    if encoding:
        assert {r.encoding for r in pruned} == {encoding}
    assert all(r.stored_bytes < r.dense_bytes for r in pruned)
    assert all(torch.equal(v, weights[k]) for k, v in hp.load(path).items())


# ---------------------------------------------------------------------------------- storage


def _linear_with(w: Tensor) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    return model


def test_storage_fields_of_a_2_of_4_weight_by_hand() -> None:
    # 6 x 16 weight, the 2 largest of every 4 consecutive inputs kept: 24 runs, 48 kept
    model = _linear_with(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)))
    hp.Magnitude(model, "2:4", None, targets=["0"]).finalize()
    rep = report(model, torch.randn(1, 16), structures="2:4")
    r = rep.rows[0]
    assert (r.encoding, r.dense_bytes, r.payload_bytes) == ("kofn", 384, 48 * 4)
    # rank code: ceil(log2 C(4, 2)) = 3 bits per run -> 72 bits = 9 bytes
    assert r.index_bytes == 9 and r.stored_bytes == 48 * 4 + 9
    assert r.min_index_bits == pytest.approx(24 * math.log2(6))
    assert r.compression_ratio == 384 / 201 and r.compression_ratio_no_index == 2.0
    assert r.compression_ratio_min == pytest.approx(384 / (192 + 24 * math.log2(6) / 8))
    assert r.index_bits_per_kept == 72 / 48 and r.stored_bits_per_kept == 8 * 201 / 48
    assert (r.selection_width, r.selection_inputs_per_kept) == (4.0, 4.0)  # one 4:1 per weight
    t = rep.total
    assert (t["stored_bytes"], t["index_bytes"], t["payload_bytes"]) == (201, 9, 192)
    assert t["compression_ratio_no_index"] == 2.0 and t["selection_width"] == 4.0


def test_selection_width_follows_darbs_decoding_cost() -> None:
    g = torch.Generator().manual_seed(0)
    irregular = torch.randn(8, 64, generator=g) * (torch.rand(8, 64, generator=g) < 0.1)
    r = report(_linear_with(irregular), torch.randn(1, 64)).rows[0]
    # any input of a row
    assert r.encoding in ("csr", "bitmask", "gaps") and r.selection_width == 64.0
    block = torch.randn(8, 64, generator=g)
    block.view(2, 4, 16, 4)[:, :, ::2] = 0  # half the 4x4 tiles zero
    r = report(_linear_with(block), torch.randn(1, 64), structures="block:4x4").rows[0]
    cost = decoding_cost(block != 0, "block", block=(4, 4))
    assert r.encoding == "block" and r.selection_width == cost["selection_width"] == 16.0
    assert r.selection_inputs_per_kept == cost["selection_inputs_per_kept"] == 16 * 16 / 256
    darb = _linear_with(torch.randn(16, 64, generator=g))
    hp.DARB(darb, ratio=8.0, targets=["0"]).finalize()
    r = report(darb, torch.randn(1, 64)).rows[0]
    enc = hp.storage.choose(darb[0].weight.detach())
    sizes = torch.from_numpy(RowBlock.row_sizes(enc))
    mask = darb[0].weight != 0
    assert r.encoding == "rowblock"  # one b_r:1 selection per kept weight, width b_r
    assert r.selection_width == (mask.sum(1) * sizes).sum() / mask.sum()
    assert r.selection_width == decoding_cost(mask, "bmwm", block_sizes=sizes)["selection_width"]
    dense = report(_linear_with(torch.randn(4, 8, generator=g) + 5), torch.randn(1, 8)).rows[0]
    assert (dense.encoding, dense.selection_width, dense.index_bits_per_kept) == ("dense", 1.0,
                                                                                  0.0)
    assert dense.min_index_bits == 0.0 and dense.compression_ratio_min == 1.0
    empty = report(_linear_with(torch.zeros(4, 8)), torch.randn(1, 8)).rows[0]
    assert empty.selection_width is None and empty.index_bits_per_kept is None


def test_report_and_methods_read_the_same_cost_model() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64)
    # DARB's extras and the report's storage columns: hwprune.hardware's decoding cost
    model = _linear_with(torch.randn(16, 64, generator=g))
    pruner = hp.DARB(model, ratio=8.0, targets=["0"])
    pruner.finalize()
    row = report(model, x, pruner=pruner).rows[0]
    mask = pruner.masks()["0.weight"]
    cost = hardware.decoding_cost(mask, "darb", block_sizes=pruner.block_sizes["0.weight"],
                                  allowed=pruner.allowed_sizes["0.weight"])
    assert row.extras["selection_width"] == cost["selection_width"]
    assert row.extras["index_bits_per_kept"] == cost["index_bits_per_kept"]
    enc = hp.storage.choose(model[0].weight.detach())
    sizes = torch.from_numpy(RowBlock.row_sizes(enc))
    assert (row.selection_width, row.selection_inputs_per_kept) == hardware.stored_selection(
        mask, enc.encoding, enc.meta, sizes)
    assert set(sizes.tolist()) <= set(hardware.ROW_BLOCK_SIZES)
    # ADMM's block states are the ones the unified encoding stores, and its multiplications
    # saved are hardware's count of them
    model = _linear_with(torch.randn(8, 64, generator=g))
    pruner = hp.ADMM(model, block=(1, 4), unify=0.5, zero=0.25, targets=["0"])
    pruner.hard_project()  # the pattern is fixed from here on
    states = pruner.layers["0.weight"].parametrization.states.clone()
    pruner.finalize()
    enc = hp.storage.encode(model[0].weight.detach(), "unified", bh=1, bw=4)
    stored = unpack_uint(enc.index["states"], hardware.BLOCK_STATE_BITS, states.numel())
    assert stored.tolist() == states.tolist()
    assert {hardware.ZERO, hardware.UNIFIED, hardware.FREE} == set(states.tolist())
    row = report(model, x, pruner=pruner).rows[0]
    saved = hardware.multiplications_saved(torch.full((states.numel(),), 4), states, 8 * 64)
    assert row.extras["mults_saved"] == saved["mults_saved"] == (64 * 3 + 32 * 4) / 512
    assert row.extras["mults_saved_by_unify"] == saved["mults_saved_by_unify"]


@pytest.mark.parametrize("live", [False, True])
def test_file_size_is_the_stored_total_plus_the_header(tmp_path, tiny, x8, live) -> None:
    pruner = hp.Magnitude(tiny, "2:4", None, targets=["conv2", "conv3", "fc1"])
    if not live:
        pruner.finalize()
    rep = report(tiny, x8, pruner=pruner)
    t = rep.total
    path = tmp_path / "m.hwp"
    size = hp.save(tiny, path, hints=rep.hints())
    layout = file_layout(path)
    assert size == path.stat().st_size == t["file_bytes"]
    assert t["file_bytes"] == t["file_tensor_bytes"] + t["file_header_bytes"]
    assert (layout["data_bytes"], layout["header_bytes"]) == (t["file_tensor_bytes"],
                                                              t["file_header_bytes"])
    state = tiny.state_dict()
    assert t["file_dense_bytes"] == sum(v.numel() * v.element_size() for v in state.values())
    if not live:  # the rows are state-dict tensors: the rest of the file is the other tensors
        others = sum(hp.storage.stored_bytes(v)["total_bytes"] for k, v in state.items()
                     if k not in {r.name for r in rep.rows})
        assert t["file_tensor_bytes"] == t["stored_bytes"] + others
        assert {r.encoding for r in rep.rows if r.structure == "2:4"} == {"kofn"}


def test_storage_table_in_markdown_and_terminal() -> None:
    rep = report(_small(), torch.randn(1, 3, 10, 10), name="small")
    md = rep.to_markdown()
    assert "| layer | encoding | dense | stored | index | min index | ratio |" in md
    assert f"hwprune.save file: {rep.total['file_bytes']:,} B" in md
    buf = io.StringIO()
    rep.print(Console(file=buf, width=250))
    assert "small: storage" in buf.getvalue() and "selection width" in buf.getvalue()
    assert json.loads(rep.to_json())["rows"][0]["compression_ratio_no_index"] is not None


def test_macs_are_per_sample_whatever_the_example_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 4))
    x = torch.randn(4, 3, 6, 6)
    one, four = report(model, x[:1]), report(model, x)
    for key in ("macs_dense", "macs_remaining", "model_macs", "model_macs_remaining"):
        assert one.total[key] == four.total[key] > 0, key
    assert [r.macs_dense for r in one.rows] == [r.macs_dense for r in four.rows]
    assert four.total["batch_size"] == 4 and four.to_dict()["macs_per"] == "sample"
    assert "MACs per sample (example batch of 4 divided out)" in four.to_markdown()
    assert report(model, x, batch_size=2).total["model_macs"] == 2 * one.total["model_macs"]
    with pytest.raises(HwpruneError, match="batch_size must be an int >= 1"):
        report(model, x, batch_size=0)
