"""Shrinking BERT-base-sized and GPT-2-sized transformer layers: half the heads, half the
feed-forward neurons.

Models: ``BertModel`` and ``GPT2Model`` built from configs with BERT-base's layer sizes
(hidden 768, 12 heads of 64, feed-forward 3072), ``--layers`` layers, random weights and a
small vocabulary (never downloaded). Pruning: ``Magnitude("head:64", 0.5)`` on every
attention output projection (half of each layer's heads) and ``Magnitude("filter", 0.5)``
on every feed-forward up projection (half its neurons), one-shot, then ``hp.shrink``.
Reported: parameters and MACs per sample (``FlopCounterMode``, attention matmuls included),
and CPU latency of the dense and the shrunk model, timed in turns (``medians_in_turns`` of
shrink_latency.py), median of ``--repeats``.

    python bench/deploy/transformer_shrink.py [--threads 1] [--repeats 15] [--layers 2]

Writes bench/results/deploy/transformer_shrink.md and .json.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from shrink_latency import MACHINE, OUT, macs, medians_in_turns
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import hwprune as hp
from common import arguments, command, header, parse, write_json, write_table

VOCAB = 1000


def build(family: str, layers: int) -> tuple[torch.nn.Module, str, str]:
    """The dense model and the targets of its heads and its feed-forward neurons."""
    torch.manual_seed(0)
    if family == "bert":
        model = BertModel(BertConfig(hidden_size=768, num_attention_heads=12,
                                     intermediate_size=3072, num_hidden_layers=layers,
                                     vocab_size=VOCAB, max_position_embeddings=512))
        return model.eval(), "encoder.layer.*.attention.output.dense", \
            "encoder.layer.*.intermediate.dense"
    model = GPT2Model(GPT2Config(n_embd=768, n_head=12, n_layer=layers, vocab_size=VOCAB,
                                 n_positions=512, bos_token_id=0, eos_token_id=0))
    return model.eval(), "h.*.attn.c_proj", "h.*.mlp.c_fc"


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, None, threads=1, repeats=15)
    parser.add_argument("--layers", type=int, default=2)
    args = parse(parser, argv)
    began = time.perf_counter()
    rows = []
    for family in ("bert", "gpt2"):
        dense, heads, ffn = build(family, args.layers)
        pruned, _, _ = build(family, args.layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx cannot trace the model for default targets
            hp.Magnitude(pruned, "head:64", sparsity=0.5, targets=heads).finalize()
            hp.Magnitude(pruned, "filter", sparsity=0.5, targets=ffn).finalize()
        for batch, seq in ((1, 128), (4, 128)):
            x = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
            start = time.perf_counter()
            result = hp.shrink(pruned, x, return_result=True)
            shrink_s = time.perf_counter() - start
            shrunk = result.model
            repeats = args.repeats if batch == 1 else max(args.repeats // 3, 3)
            t_dense, t_shrunk = medians_in_turns([dense, shrunk], x, repeats)
            m_dense, m_shrunk = macs(dense, x) // batch, macs(shrunk, x) // batch
            rows.append({"model": family, "layers": args.layers, "batch": batch, "seq": seq,
                         "params_dense": params(dense), "params_shrunk": params(shrunk),
                         "macs_dense": m_dense, "macs_shrunk": m_shrunk,
                         "ms_dense": round(t_dense * 1e3, 3),
                         "ms_shrunk": round(t_shrunk * 1e3, 3),
                         "speedup": round(t_dense / t_shrunk, 3), "repeats": repeats,
                         "shrink_s": round(shrink_s, 2),
                         "max_abs_diff": result.max_abs_diff})
            print(json.dumps(rows[-1]), flush=True)
    lines = [header("Shrinking transformer layers: half the heads, half the feed-forward "
                    "neurons", command(__file__, argv),
                    f"{MACHINE}, `torch.set_num_threads({args.threads})`", inline=True), "",
             f"BERT-base-sized layers (hidden 768, 12 heads of 64, feed-forward 3072), "
             f"{args.layers} of them, random weights, vocabulary {VOCAB}. "
             "`Magnitude(\"head:64\", 0.5)` on the attention output projections and "
             "`Magnitude(\"filter\", 0.5)` on the feed-forward up projections, then "
             "`hp.shrink`. MACs per sample, attention included; parameters include the "
             "embeddings. ms: one forward pass of the whole batch; dense and shrunk timed in "
             "turns, medians. Every matmul inside a block (projections, attention scores, "
             "feed-forward) halves; the hidden dimension stays (docs/transformers.md), and "
             f"BERT's pooler with it. Whole run: {time.perf_counter() - began:.0f} s; load "
             f"average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared "
             "machine: under load the latencies, and their ratio, vary from run to run; the "
             "MACs and parameters do not).", ""]
    write_table(OUT / "transformer_shrink.md", lines,
                ["model", "batch x seq", "params dense", "params shrunk", "MACs dense",
                 "MACs shrunk", "MAC reduction", "ms dense", "ms shrunk", "speed-up",
                 "repeats", "max abs diff"], "lrrrrrrrrrrr",
                [[r["model"], f"{r['batch']} x {r['seq']}", f"{r['params_dense']:,}",
                  f"{r['params_shrunk']:,}", f"{r['macs_dense'] / 1e6:.0f}M",
                  f"{r['macs_shrunk'] / 1e6:.0f}M",
                  f"{r['macs_dense'] / r['macs_shrunk']:.2f}x", f"{r['ms_dense']:.2f}",
                  f"{r['ms_shrunk']:.2f}", f"{r['speedup']:.2f}x", r["repeats"],
                  f"{r['max_abs_diff']:.1e}"] for r in rows])
    write_json(OUT / "transformer_shrink.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
