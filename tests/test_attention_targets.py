"""nn.MultiheadAttention's projections are linear weights: targets by default, name and type."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import hwprune as hp
from hwprune.targets import resolve_targets


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.encoder = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


ATTENTION = ["encoder.self_attn.in_proj_weight", "encoder.self_attn.out_proj.weight"]


def test_attention_projections_are_default_targets():
    with warnings.catch_warnings():  # the encoder layer is traced as a whole, the head found
        warnings.simplefilter("error")
        names = [t.name for t in resolve_targets(TinyEncoder())]
    assert names == ["embed.weight", *ATTENTION, "encoder.linear1.weight",
                     "encoder.linear2.weight"]


def test_attention_projections_are_selected_by_name_glob_and_type():
    model = TinyEncoder()
    assert [t.name for t in resolve_targets(model, "encoder.self_attn.in_proj_weight")] == \
        ATTENTION[:1]
    assert [t.name for t in resolve_targets(model, "encoder.self_attn*")] == ATTENTION
    assert [t.name for t in resolve_targets(model, nn.MultiheadAttention)] == ATTENTION[:1]


def test_separate_key_value_sizes_give_three_projections():
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert [t.name for t in resolve_targets(attention, nn.MultiheadAttention)] == [
        "q_proj_weight", "k_proj_weight", "v_proj_weight"]


@pytest.mark.parametrize("structure, sparsity", [("2:4", None), ("element", 0.5),
                                                 ("block:4x4", 0.5)])
def test_pruned_attention_finalizes_to_plain_modules_with_the_same_function(structure, sparsity):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    x = torch.randn(2, 5, 6)
    pruner = hp.Magnitude(model, structure, sparsity, targets=ATTENTION)
    with torch.no_grad():
        pruned = model(x)
    in_proj = pruner.masks()[ATTENTION[0]]
    assert in_proj.shape == (48, 16) and 0.4 < 1 - in_proj.float().mean() < 0.6
    if structure == "2:4":  # runs of 4 along the input dimension keep exactly 2
        assert (in_proj.reshape(-1, 4).sum(1) == 2).all()
    pruner.finalize()
    attention = model.encoder.self_attn
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(attention) is nn.MultiheadAttention
    assert torch.equal(attention.in_proj_weight != 0, in_proj)
    with torch.no_grad():
        assert torch.allclose(model(x), pruned, atol=1e-6)


def test_report_has_a_row_for_the_input_projection_with_its_macs():
    model = TinyEncoder()
    pruner = hp.Magnitude(model, "2:4", targets=ATTENTION)
    pruner.finalize()
    rep = hp.report(model, torch.randn(1, 5, 6), pruner=pruner)
    row = {r.name: r for r in rep.rows}[ATTENTION[0]]
    assert row.structure == "2:4" and row.kept_elements == 0.5
    assert row.macs_dense == 5 * 48 * 16  # 5 tokens x (3 x 16) outputs x 16 inputs
    assert row.macs_remaining == row.macs_dense // 2
