"""A character-level LSTM language model (2 layers by default), standing in for the PTB LSTM of
the DARB paper, plus the batching and the bits-per-character evaluation it is judged by.

Its LSTM weight matrices (``lstm.weight_ih_l*``, ``lstm.weight_hh_l*``) are what pruning
targets: pass ``targets=torch.nn.LSTM``. (The default targets, every Conv/Linear but the last
linear, select nothing here: the only Linear is the output head.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwprune.errors import HwpruneError

__all__ = ["CharLSTM", "sample_batch", "bits_per_character"]


class CharLSTM(nn.Module):
    """Embedding -> LSTM (``layers`` x ``hidden``) -> linear head over the vocabulary.

    Args:
        vocab_size: number of distinct characters.
        embedding: embedding width (default 64).
        hidden: LSTM hidden width (default 256).
        layers: LSTM layers (default 2).
        dropout: dropout between LSTM layers and before the head (default 0.0).

    ``forward(x)`` takes int64 ids ``(batch, time)`` and returns logits ``(batch, time, vocab)``.
    """

    def __init__(self, vocab_size: int, embedding: int = 64, hidden: int = 256, layers: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for field, v in (("vocab_size", vocab_size), ("embedding", embedding),
                         ("hidden", hidden), ("layers", layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HwpruneError(f"CharLSTM {field} must be a positive integer, got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise HwpruneError(f"CharLSTM dropout must be in [0, 1), got {dropout!r}")
        self.embed = nn.Embedding(vocab_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.lstm(self.embed(x))[0]))


def sample_batch(data: Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of ``data``: inputs ``(B, T)`` and next-character targets."""
    if data.numel() < seq_len + 1:
        raise HwpruneError(f"text of {data.numel()} characters is shorter than seq_len + 1 = "
                           f"{seq_len + 1}")
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def bits_per_character(model: nn.Module, data: Tensor, seq_len: int = 128,
                       batch_size: int = 256, max_chars: int | None = None) -> float:
    """Mean cross-entropy in bits per predicted character over consecutive non-overlapping
    windows of ``seq_len`` (each window starts from a zero LSTM state), in eval mode.
    ``max_chars`` limits the evaluation to the first that many characters of ``data``."""
    if max_chars is not None:
        data = data[:max_chars + 1]
    n = (data.numel() - 1) // seq_len
    if n < 1:
        raise HwpruneError(f"text of {data.numel()} characters holds no window of {seq_len}")
    x = data[:n * seq_len].reshape(n, seq_len)
    y = data[1:n * seq_len + 1].reshape(n, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i:i + batch_size])
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten(),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n * seq_len) / math.log(2)
