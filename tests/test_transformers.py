"""Hugging Face transformers: GPT-2's Conv1D as a linear layer, every method on BERT and GPT-2
linear layers, attention heads and feed-forward neurons that shrink removes. Models are built
from tiny configs (never downloaded)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model
from transformers.pytorch_utils import Conv1D

import hwprune as hp
from hwprune.methods import get_method
from hwprune.methods.checks import check_finalize, check_masks_obey_structure, train_steps
from hwprune.structures import Head, KofN, parse_structure, transposed
from hwprune.targets import LINEAR_LAYOUTS, register_linear_layer, resolve_targets

HIDDEN, HEADS, D = 32, 4, 8
VOCAB, SEQ = 64, 8


def gpt2_config(layers: int = 2) -> GPT2Config:
    return GPT2Config(n_embd=HIDDEN, n_head=HEADS, n_layer=layers, vocab_size=VOCAB,
                      n_positions=32, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def bert_config(layers: int = 2) -> BertConfig:
    return BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=64,
                      num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Embeds(nn.Module):
    """A transformer body fed embeddings (float inputs, as the conformance checks train)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(inputs_embeds=x).last_hidden_state


def random_biases(model: nn.Module) -> nn.Module:
    """HF initialises biases to zero; random ones make the constant folding matter."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def conv1d_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, Conv1D)}


# -- Conv1D is a linear layer -----------------------------------------------------------------

def test_gpt2_conv1d_layers_are_default_targets_and_transposed():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx cannot trace GPT-2: the last linear layer stays
        targets = resolve_targets(model)
    names = {t.name for t in targets}
    assert names == set(conv1d_weights(model)), names
    assert all(t.transposed for t in targets)
    c_fc = next(t for t in targets if t.name.endswith("h.0.mlp.c_fc.weight"))
    assert c_fc.out_in_shape == (4 * HIDDEN, HIDDEN)
    assert "lm_head.weight" not in names


class InOutLinear(nn.Module):
    """A linear layer of one's own that stores its weight (in, out), like Conv1D."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_a_registered_linear_layer_is_pruned_on_its_out_in_view():
    register_linear_layer(InOutLinear, transposed=True)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(InOutLinear(8, 6), nn.ReLU(), InOutLinear(6, 6), nn.Linear(6, 2))
        pruner = hp.Magnitude(model, "filter", sparsity=0.5, targets=InOutLinear)
        assert all(layer.target.transposed for layer in pruner.layers.values())
        pruner.finalize()
        w = model[0].weight  # (in=8, out=6): a filter is a column here
        assert int(w.ne(0).any(0).sum()) == 3 and bool(w.ne(0).any(1).all())
    finally:
        del LINEAR_LAYOUTS[f"{InOutLinear.__module__}.{InOutLinear.__qualname__}"]


@pytest.mark.parametrize("method", ["Magnitude", "DPP"])
def test_two_of_four_runs_along_conv1d_input_dimension(method):
    torch.manual_seed(0)
    model = GPT2Model(gpt2_config())
    cls = get_method(method).cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cls(model, structure="2:4", targets=Conv1D)
    pruner.finalize()
    for name, w in conv1d_weights(model).items():
        n_in, n_out = w.shape  # Conv1D stores (in, out)
        runs = w.t().reshape(n_out, n_in // 4, 4).ne(0).sum(-1)
        assert (runs == 2).all(), f"{name}: runs keep {runs.unique().tolist()} of 4"
        # along the output dimension the pattern is not 2:4 (the wrong axis would be)
        wrong = w.reshape(n_in, n_out // 4, 4).ne(0).sum(-1)
        assert not (wrong == 2).all(), f"{name}: 2:4 along the output axis too"


def test_block_tiles_the_out_in_view_of_conv1d():
    torch.manual_seed(0)
    model = GPT2Model(gpt2_config())
    hp.Magnitude(model, "block:4x8", sparsity=0.5, targets=Conv1D).finalize()
    for name, w in conv1d_weights(model).items():
        m = w.t()  # (out, in)
        tiles = m.reshape(m.shape[0] // 4, 4, m.shape[1] // 8, 8).ne(0).sum((1, 3))
        assert set(tiles.unique().tolist()) <= {0, 32}, name
        assert (tiles == 0).any(), name


def test_darb_blocks_run_along_conv1d_rows_of_the_out_in_view():
    torch.manual_seed(0)
    model = GPT2Model(gpt2_config())
    pruner = hp.DARB(model, ratio=4.0, allowed=(2, 4, 8), targets=Conv1D)
    pruner.prune_to(0.75)
    sizes = {n: s.clone() for n, s in pruner.block_sizes.items()}
    pruner.finalize()
    for name, w in conv1d_weights(model).items():
        m = w.t()  # a row is one output unit over all inputs
        assert len(sizes[name]) == m.shape[0], name
        for r, b in enumerate(sizes[name].tolist()):
            per_block = m[r].reshape(-1, b).ne(0).sum(1)
            assert (per_block == 1).all(), f"{name} row {r}: {per_block.tolist()}"


def test_transposed_structure_round_trips_and_keeps_its_kind():
    s = transposed(parse_structure("2:4"))
    assert isinstance(s, KofN) and (s.k, s.n) == (2, 4) and str(s) == "2:4"
    w = torch.randn(16, 8)  # stored (in=16, out=8)
    assert torch.equal(s.from_groups(s.to_groups(w), w.shape), w)
    assert s.line_length(w.shape) == 16  # runs along the input dimension
    assert torch.equal(s.to_groups(w), parse_structure("2:4").to_groups(w.t()))


def test_head_structure_groups_a_heads_columns_or_rows():
    w = torch.arange(4 * 8 * 6, dtype=torch.float32).reshape(6, 32)  # (out, in = 4 heads of 8)
    cols = Head(8).to_groups(w)
    assert cols.shape == (4, 48) and set(cols[1].tolist()) == set(w[:, 8:16].reshape(-1).tolist())
    rows = parse_structure("head:2@0").to_groups(w)
    assert rows.shape == (3, 64) and torch.equal(rows[1], w[2:4].reshape(-1))
    with pytest.raises(hp.StructureError, match="whole number of heads"):
        Head(5).validate((6, 32), "out.weight")


# -- every method on BERT and GPT-2 linear layers ------------------------------------------

LINEAR_STRUCTURES = ("element", "weight", "filter", "channel", "block:2x2", "block:1x4", "2:4")
# every method x linear structure on GPT-2's Conv1D (new); one structure per method on BERT's
# nn.Linear layers (linear layers of the kind the conformance tests already cover)
CASES = [("gpt2", name, label) for name in ("Magnitude", "PSP", "DPP", "ADMM", "DARB")
         for label in get_method(name).configs if label in LINEAR_STRUCTURES]
CASES += [("bert", "Magnitude", "2:4"), ("bert", "PSP", "filter"), ("bert", "DPP", "2:4"),
          ("bert", "ADMM", "block:2x2"), ("bert", "DARB", "element")]


@pytest.mark.parametrize(("family", "method", "label"), CASES)
def test_finalize_keeps_exactly_the_pattern_on_transformer_layers(family, method, label):
    """The conformance checks that matter for a transposed weight: after training and after
    finalize every mask obeys its structure exactly in the (out, in) view, and finalize bakes
    in the zeros with the function unchanged."""
    spec = get_method(method)
    config = {**spec.configs[label], "targets": Conv1D if family == "gpt2" else nn.Linear}

    def factory() -> nn.Module:
        return Embeds(GPT2Model(gpt2_config(1)) if family == "gpt2"
                      else BertModel(bert_config(1)))

    inputs = torch.randn(2, SEQ, HIDDEN, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for check in (check_masks_obey_structure, check_finalize):
            check(spec.cls, config, factory, inputs)


# -- shrink: heads and feed-forward neurons ----------------------------------------------

def _shrunk(model: nn.Module, pruner_args: dict) -> tuple[nn.Module, hp.ShrinkResult]:
    hp.Magnitude(model, **pruner_args).finalize()
    result = hp.shrink(model, tokens(), return_result=True)
    return model, result


def _same_function(before: nn.Module, after: nn.Module) -> float:
    with torch.no_grad():
        ref = before.eval()(tokens()).last_hidden_state
        got = after(tokens()).last_hidden_state
    diff = float((got - ref).abs().max())
    assert diff <= 1e-5 * float(ref.abs().max()), diff
    return diff


@pytest.mark.parametrize(("targets", "structure"), [
    ("encoder.layer.*.attention.output.dense", "head:8"),  # the heads' output columns
    ("encoder.layer.*.attention.self.value", "head:8@0"),  # value rows: bias folds
])
def test_bert_heads_removed_by_shrink(targets, structure):
    torch.manual_seed(0)
    model = random_biases(BertModel(bert_config()))
    pruned, result = _shrunk(model, {"structure": structure, "sparsity": 0.5,
                                     "targets": targets})
    shrunk = result.model
    assert type(shrunk) is BertModel
    for layer in shrunk.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2 and att.query.out_features == 2 * D
        assert layer.attention.output.dense.in_features == 2 * D
    assert result.params_after < result.params_before
    _same_function(pruned, shrunk)


def test_bert_feed_forward_neurons_removed_by_shrink():
    torch.manual_seed(0)
    model = random_biases(BertModel(bert_config()))
    # rows of the up projection: each removed neuron leaves GELU(bias), folded into the next
    pruned, result = _shrunk(model, {"structure": "filter", "sparsity": 0.5,
                                     "targets": "encoder.layer.*.intermediate.dense"})
    for layer in result.model.encoder.layer:
        assert layer.intermediate.dense.out_features == 32
        assert layer.output.dense.in_features == 32
    _same_function(pruned, result.model)


def test_gpt2_heads_and_neurons_removed_by_shrink():
    torch.manual_seed(0)
    model = random_biases(GPT2Model(gpt2_config()))
    hp.Magnitude(model, "head:8", sparsity=0.5, targets="h.*.attn.c_proj").finalize()
    hp.Magnitude(model, "channel", sparsity=0.75, targets="h.*.mlp.c_proj").finalize()
    result = hp.shrink(model, tokens(), return_result=True)
    shrunk = result.model
    assert type(shrunk) is GPT2Model
    for block in shrunk.h:
        assert block.attn.num_heads == 2 and block.attn.split_size == 2 * D
        assert tuple(block.attn.c_attn.weight.shape) == (HIDDEN, 3 * 2 * D)  # (in, out)
        assert tuple(block.mlp.c_fc.weight.shape) == (HIDDEN, HIDDEN)
        assert tuple(block.mlp.c_proj.weight.shape) == (HIDDEN, HIDDEN)
    assert result.params_after < result.params_before
    _same_function(model, shrunk)


def test_gpt2_value_rows_fold_their_bias_into_the_output_projection():
    torch.manual_seed(0)
    model = random_biases(GPT2Model(gpt2_config()))
    with torch.no_grad():
        for block in model.h:  # zero head 1's value rows: c_attn's columns 2*32 + 8..16
            block.attn.c_attn.weight[:, 2 * HIDDEN + D:2 * HIDDEN + 2 * D] = 0
    result = hp.shrink(model, tokens(), return_result=True)
    assert all(b.attn.num_heads == HEADS - 1 for b in result.model.h)
    _same_function(model, result.model)


def test_a_head_with_zero_queries_stays_and_says_why():
    torch.manual_seed(0)
    model = random_biases(BertModel(bert_config()))
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight[:D] = 0
    result = hp.shrink(model, tokens(), return_result=True)
    assert result.model.encoder.layer[0].attention.self.num_attention_heads == HEADS
    assert any(k.channels == [0] and "uniform, not zero" in k.reason for k in result.kept)


def test_layernorm_over_the_channels_keeps_a_zero_channel_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[:, 5] = 0  # nothing reads LayerNorm's output channel 5
        model[0].weight[7] = 0
    result = hp.shrink(model, torch.randn(5, 8), return_result=True)
    assert result.params_after == result.params_before
    reasons = [k.reason for k in result.kept if 5 in k.channels]
    assert reasons and "normalises over the channel axis" in reasons[0]


def test_layernorm_over_another_axis_lets_channels_go():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 6, 1), nn.LayerNorm(10), nn.Conv1d(6, 2, 1))
    with torch.no_grad():
        model[2].weight[:, 1] = 0
    result = hp.shrink(model, torch.randn(5, 3, 10), return_result=True)
    assert result.layers["0"] == ((3, 6), (3, 5))


def test_report_counts_conv1d_filters_on_the_out_in_view():
    torch.manual_seed(0)
    model = GPT2Model(gpt2_config(1)).eval()
    pruner = hp.Magnitude(model, "filter", sparsity=0.5, targets="h.0.mlp.c_fc")
    rows = {r.name: r for r in hp.report(model, tokens(), pruner=pruner).rows}
    row = rows["h.0.mlp.c_fc.weight"]
    assert row.module == "Conv1D" and row.kept_filters == 0.5 and row.kept_channels == 1.0
    assert row.macs_dense == SEQ * HIDDEN * 4 * HIDDEN  # per sample: every token


@pytest.mark.parametrize(("method", "config"), [
    ("PSP", {"structure": "head:8", "variant": "fixed", "sparsity": 0.5}),
    ("ADMM", {"block": "head:8", "unify": 0.0, "zero": 0.5, "admm_interval": 2, "rho": 0.01}),
])
def test_learned_methods_prune_heads_that_shrink_removes(method, config):
    torch.manual_seed(0)
    body = random_biases(GPT2Model(gpt2_config(1)))
    model = Embeds(body)
    pruner = get_method(method).cls(model, targets="body.h.0.attn.c_proj", **config)
    optimizer = torch.optim.SGD(pruner.param_groups(lr=0.05))
    train_steps(model, pruner, optimizer, torch.randn(2, SEQ, HIDDEN), 8)
    pruner.finalize()
    result = hp.shrink(body, tokens(), return_result=True)
    assert result.layers == {"h.0.attn (heads)": ((HEADS, HEADS), (2, 2))}
    _same_function(body, result.model)


def test_a_transformer_inside_a_module_of_ones_own_is_shrunk_too():
    torch.manual_seed(0)
    body = random_biases(BertModel(bert_config(1)))
    model = Embeds(body).eval()
    with torch.no_grad():
        body.encoder.layer[0].output.dense.weight[:, :16] = 0  # 16 of 64 neurons unread
    x = torch.randn(2, SEQ, HIDDEN)
    result = hp.shrink(model, x, return_result=True)
    assert result.layers == {"body.encoder.layer.0 (neurons)": ((64, 64), (48, 48))}
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
