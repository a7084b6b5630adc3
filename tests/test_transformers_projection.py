"""hp.shrink on transformers 5's projection layout (``q_proj/k_proj/v_proj/o_proj`` with
``head_dim``; ``fc1/fc2`` and gated ``gate_proj/up_proj/down_proj`` feed-forward blocks):
Llama with grouped-query attention, with and without biases, and ViT. Models are built from
tiny configs (never downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GemmaConfig,
    GemmaModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralModel,
    Olmo2Config,
    Olmo2Model,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
    ViTConfig,
    ViTModel,
    WhisperConfig,
    WhisperModel,
)

import hwprune as hp

HIDDEN, HEADS, KV_HEADS, D = 32, 4, 2, 8
GROUP = HEADS // KV_HEADS  # query heads per key/value head
VOCAB, SEQ = 64, 8


def decoder_config(config_class=LlamaConfig, layers: int = 2, **kwargs):
    return config_class(hidden_size=HIDDEN, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, head_dim=D, intermediate_size=64,
                        num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=32,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)


def llama(biases: bool = False, layers: int = 2) -> LlamaModel:
    torch.manual_seed(0)
    model = LlamaModel(decoder_config(layers=layers, attention_bias=biases, mlp_bias=biases))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # HF initialises biases to zero; random ones make folding matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def same_function(before: nn.Module, after: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = before.eval()(x).last_hidden_state
        got = after(x).last_hidden_state
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_a_key_value_head_goes_with_its_group_of_query_heads():
    model = llama()
    # one of the two groups of query heads (2 heads x 8 columns of o_proj) per layer
    hp.Magnitude(model, f"head:{GROUP * D}", sparsity=0.5,
                 targets="layers.*.self_attn.o_proj").finalize()
    result = hp.shrink(model, tokens(), return_result=True)
    for layer in result.model.layers:
        att = layer.self_attn
        assert (att.q_proj.out_features, att.o_proj.in_features) == (GROUP * D, GROUP * D)
        assert att.k_proj.out_features == att.v_proj.out_features == D
        assert att.num_key_value_groups == GROUP
    assert result.layers["layers.0.self_attn (key/value groups)"] == ((KV_HEADS, KV_HEADS), (1, 1))
    assert result.params_after < result.params_before
    same_function(model, result.model, tokens())


def test_a_query_head_whose_group_stays_stays():
    model = llama()
    with torch.no_grad():  # query head 2 alone: its key/value head serves head 3 too
        model.layers[0].self_attn.o_proj.weight[:, 2 * D:3 * D] = 0
    result = hp.shrink(model, tokens(), return_result=True)
    assert result.layers == {}
    assert result.model.layers[0].self_attn.q_proj.out_features == HEADS * D
    same_function(model, result.model, tokens())


def test_gated_neurons_go_where_a_factor_is_a_constant_zero():
    model = llama()
    hp.Magnitude(model, "filter", sparsity=0.5, targets="layers.*.mlp.gate_proj").finalize()
    result = hp.shrink(model, tokens(), return_result=True)
    for layer in result.model.layers:  # silu(0) = 0: a zero gate row silences its neuron
        mlp = layer.mlp
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 32
        assert mlp.down_proj.in_features == 32
    same_function(model, result.model, tokens())


def test_biases_fold_where_a_unit_outputs_a_constant():
    model = llama(biases=True, layers=1)
    att, mlp = model.layers[0].self_attn, model.layers[0].mlp
    with torch.no_grad():
        att.v_proj.weight[D:] = 0  # key/value head 1: its value bias goes into o_proj's bias
        mlp.gate_proj.weight[:8] = 0  # gate and up rows zero: act(gate bias) * up bias
        mlp.up_proj.weight[:8] = 0
        mlp.gate_proj.weight[8:16] = 0  # the gate alone: act(bias) != 0 times a varying up
    result = hp.shrink(model, tokens(), return_result=True)
    shrunk = result.model.layers[0]
    assert shrunk.self_attn.k_proj.out_features == D
    assert shrunk.self_attn.q_proj.out_features == GROUP * D
    assert shrunk.mlp.down_proj.in_features == 64 - 8
    same_function(model, result.model, tokens())


def test_a_constant_without_a_bias_to_take_it_gets_one():
    model = llama(layers=1)  # no biases anywhere
    mlp = model.layers[0].mlp
    with torch.no_grad():  # silu(1) * 2, a constant the down projection must add
        mlp.gate_proj.weight[:4] = 0
        mlp.up_proj.weight[:4] = 0
    mlp.gate_proj.bias = nn.Parameter(torch.ones(64))
    mlp.up_proj.bias = nn.Parameter(torch.full((64,), 2.0))
    result = hp.shrink(model, tokens(), return_result=True)
    down = result.model.layers[0].mlp.down_proj
    assert down.in_features == 60 and down.bias is not None
    same_function(model, result.model, tokens())


@pytest.mark.parametrize("prune", ["heads", "neurons"])
def test_vit_heads_and_neurons_removed_by_shrink(prune):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                               num_attention_heads=HEADS, intermediate_size=64,
                               num_hidden_layers=2), add_pooling_layer=False).eval()
    if prune == "heads":
        hp.Magnitude(model, f"head:{D}", sparsity=0.5,
                     targets="layers.*.attention.o_proj").finalize()
    else:
        hp.Magnitude(model, "channel", sparsity=0.75, targets="layers.*.mlp.fc2").finalize()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = hp.shrink(model, x, return_result=True)
    for layer in result.model.layers:
        if prune == "heads":
            assert layer.attention.q_proj.out_features == 2 * D
            assert layer.attention.num_attention_heads == 2
        else:
            assert (layer.mlp.fc1.out_features, layer.mlp.fc2.in_features) == (16, 16)
    assert result.params_after < result.params_before
    same_function(model, result.model, x)


def test_greedy_generation_of_the_shrunk_model_gives_the_same_tokens():
    torch.manual_seed(0)
    model = LlamaForCausalLM(decoder_config()).eval()
    hp.Magnitude(model, f"head:{GROUP * D}", sparsity=0.5,
                 targets="model.layers.*.self_attn.o_proj").finalize()
    hp.Magnitude(model, "filter", sparsity=0.5, targets="model.layers.*.mlp.gate_proj").finalize()
    shrunk = hp.shrink(model, tokens())
    prompt = tokens()[:1, :5]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(shrunk.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_clip_out_proj_heads_and_fc_neurons_removed_by_shrink():
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64,
                                             num_attention_heads=HEADS, num_hidden_layers=2,
                                             image_size=16, patch_size=4)).eval()
    hp.Magnitude(model, f"head:{D}", sparsity=0.5, targets="*.self_attn.out_proj").finalize()
    hp.Magnitude(model, "channel", sparsity=0.5, targets="*.mlp.fc2").finalize()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = hp.shrink(model, x, return_result=True)
    for layer in result.model.encoder.layers:
        assert layer.self_attn.out_proj.in_features == 2 * D
        assert layer.mlp.fc1.out_features == 32
    same_function(model, result.model, x)


def test_a_layout_read_wrongly_is_refused_with_the_model_unchanged():
    torch.manual_seed(0)  # OLMo-2 normalises all heads' queries together: its norm is too wide
    model = Olmo2Model(decoder_config(Olmo2Config, layers=1)).eval()
    hp.Magnitude(model, f"head:{GROUP * D}", sparsity=0.5,
                 targets="layers.*.self_attn.o_proj").finalize()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hp.HwpruneError, match="fails on example_inputs"):
        hp.shrink(model, tokens())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize(("model_class", "config_class"), [
    (MistralModel, MistralConfig), (Qwen2Model, Qwen2Config), (Qwen3Model, Qwen3Config),
    (GemmaModel, GemmaConfig)], ids=["mistral", "qwen2", "qwen3", "gemma"])
def test_llama_kin_share_the_layout(model_class, config_class):
    torch.manual_seed(0)
    model = model_class(decoder_config(config_class, layers=1)).eval()
    hp.Magnitude(model, f"head:{GROUP * D}", sparsity=0.5,
                 targets="layers.*.self_attn.o_proj").finalize()
    hp.Magnitude(model, "filter", sparsity=0.5, targets="layers.*.mlp.gate_proj").finalize()
    result = hp.shrink(model, tokens(), return_result=True)
    assert result.layers == {"layers.0.self_attn (key/value groups)": ((2, 2), (1, 1)),
                             "layers.0.mlp (neurons)": ((64, 64), (32, 32))}
    same_function(model, result.model, tokens())


class EncoderDecoder(nn.Module):
    """An encoder-decoder model's last hidden state from its encoder's and decoder's inputs."""

    def __init__(self, body: nn.Module, encoder_input: str):
        super().__init__()
        self.body, self.encoder_input = body, encoder_input

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.body(**{self.encoder_input: source},
                         decoder_input_ids=target).last_hidden_state


def bart() -> tuple[nn.Module, torch.Tensor]:
    body = BartModel(BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1,
                                decoder_layers=1, encoder_attention_heads=HEADS,
                                decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                                decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=1,
                                bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))
    return EncoderDecoder(body, "input_ids"), tokens()


def whisper() -> tuple[nn.Module, torch.Tensor]:
    body = WhisperModel(WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1,
                                      decoder_layers=1, encoder_attention_heads=HEADS,
                                      decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, num_mel_bins=8,
                                      max_source_positions=SEQ, max_target_positions=32,
                                      pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                      decoder_start_token_id=2))
    # log-mel features: 8 bins, two frames per encoder position
    features = torch.randn(2, 8, 2 * SEQ, generator=torch.Generator().manual_seed(2))
    return EncoderDecoder(body, "input_features"), features


@pytest.mark.parametrize("build", [bart, whisper])
def test_encoder_decoder_self_and_cross_attention_heads_and_neurons_removed_by_shrink(build):
    torch.manual_seed(0)
    model, source = build()
    model.eval()
    hp.Magnitude(model, f"head:{D}", sparsity=0.5, targets="*.out_proj").finalize()
    hp.Magnitude(model, "channel", sparsity=0.5, targets="*.fc2").finalize()
    x = (source, tokens())
    result = hp.shrink(model, x, return_result=True)
    assert result.layers == {
        **{f"body.{a} (heads)": ((HEADS, HEADS), (2, 2)) for a in (
            "encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
            "decoder.layers.0.encoder_attn")},
        "body.encoder.layers.0 (neurons)": ((64, 64), (32, 32)),
        "body.decoder.layers.0 (neurons)": ((64, 64), (32, 32))}
    with torch.no_grad():
        ref, got = model(*x), result.model(*x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
