"""The Tiny Shakespeare loader (on a small fake text in tmp_path) and the character LSTM:
splits, vocabulary, batching, bits per character, and a small real training run pruned by DARB
through ``targets=nn.LSTM``."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwprune as hp
from hwprune.data import load_tinyshakespeare
from hwprune.errors import HwpruneError, TargetError
from hwprune.models import MODELS, CharLSTM, bits_per_character, get_model, sample_batch


def _fake_root(tmp_path, text):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "tinyshakespeare.txt").write_text(text, encoding="utf-8")
    return tmp_path


def test_split_is_first_90_percent_and_vocab_covers_both(tmp_path):
    text = "abcdefghij" * 9 + "XYZ\n!xyzab"  # 100 characters; X, Y, Z, !, \n only at the end
    train, val, vocab = load_tinyshakespeare(_fake_root(tmp_path, text))
    assert vocab == "".join(sorted(set(text)))
    assert (train.numel(), val.numel()) == (90, 10)
    assert train.dtype == val.dtype == torch.int64
    assert "".join(vocab[i] for i in train) == text[:90]
    assert "".join(vocab[i] for i in val) == text[90:]


def test_loader_reads_the_env_data_dir_and_reports_problems(tmp_path, monkeypatch):
    monkeypatch.setenv("HWPRUNE_DATA_DIR", str(_fake_root(tmp_path, "hello world")))
    train, val, vocab = load_tinyshakespeare(val_fraction=0.5)
    assert train.numel() + val.numel() == 11 and len(vocab) == 8
    with pytest.raises(HwpruneError, match="val_fraction must be in"):
        load_tinyshakespeare(tmp_path, val_fraction=1.0)
    with pytest.raises(HwpruneError, match="tinyshakespeare.txt"):
        load_tinyshakespeare(tmp_path / "text")


def test_model_shapes_targets_and_registry():
    model = get_model("char_lstm", vocab_size=11, embedding=8, hidden=16)
    assert MODELS["char_lstm"] is CharLSTM
    assert model(torch.randint(0, 11, (3, 7))).shape == (3, 7, 11)
    pruner = hp.DARB(model, 4.0, targets=nn.LSTM)
    assert list(pruner.masks()) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0",
                                    "lstm.weight_ih_l1", "lstm.weight_hh_l1"]
    with pytest.raises(TargetError, match="selects no weight"):
        hp.DARB(CharLSTM(11, 8, 16), 4.0)  # the default skips the only linear (the head)
    with pytest.raises(HwpruneError, match="hidden must be a positive integer"):
        CharLSTM(11, hidden=0)


def test_sample_batch_targets_are_the_next_characters():
    data = torch.arange(50)
    x, y = sample_batch(data, 4, 6, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 6)
    assert torch.equal(y, x + 1)
    with pytest.raises(HwpruneError, match="shorter than seq_len"):
        sample_batch(data[:5], 1, 6)


def test_bits_per_character_of_a_uniform_model_is_log2_vocab():
    model = CharLSTM(13, 8, 16)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert bits_per_character(model, torch.randint(0, 13, (301,)), seq_len=10) == (
        pytest.approx(math.log2(13), rel=1e-6))


def test_a_small_lstm_learns_a_periodic_text_and_recovers_after_darb():
    torch.manual_seed(0)
    data = torch.tensor([0, 1, 2, 3, 1, 2, 0, 3] * 64)
    model = CharLSTM(4, embedding=8, hidden=16)
    gen = torch.Generator().manual_seed(0)

    def fit(steps, pruner=None):
        params = pruner.param_groups(lr=0.02) if pruner else model.parameters()
        opt = torch.optim.Adam(params, lr=0.02)
        for _ in range(steps):
            x, y = sample_batch(data, 8, 16, gen)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()

    start = bits_per_character(model, data, seq_len=16)
    fit(50)
    dense = bits_per_character(model, data, seq_len=16)
    assert start > 1.5 and dense < 0.5  # 2 bits (4 symbols) down to the period's structure
    pruner = hp.DARB(model, 4.0, targets=nn.LSTM)
    masks = pruner.masks()
    fit(30, pruner)
    assert all(torch.equal(m, masks[n]) for n, m in pruner.masks().items())
    assert bits_per_character(model, data, seq_len=16) < 0.6
    assert 3.9 < 1 / (1 - pruner.sparsity()) < 4.1
