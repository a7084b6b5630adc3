"""File bytes of models with a tied embedding: hp.save against torch.save, safetensors and xz.

A language model whose output layer shares the embedding's weight (GPT-2, and the small Llama
and Qwen variants) has that tensor under two names in its state dict. torch.save stores the
shared memory once, safetensors' ``save_model`` drops the second name; hp.save stores it once
as an alias record (container version 6) and loads both names as one tensor. Models are
built from transformers configs (nothing downloaded), their weights initialised as
transformers does (normal, std 0.02: full-entropy low mantissa bytes, as trained weights
have), dense and pruned 2:4 by magnitude (every Linear/Conv1D of the blocks); each file is
loaded back and checked bit for bit, and the tie checked.

    python bench/storage/storage_tied.py --out bench/results/storage/storage_tied

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import lzma
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import safetensors.torch
import torch
import transformers

import hwprune as hp
from common import arguments, command, header, machine, parse, write_json, write_table
from hwprune.storage.aliases import find_aliases


def gpt2_small() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config())  # 124 M parameters


def qwen2_tiny() -> torch.nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True))


MODELS = {"GPT-2 small": (gpt2_small, "transformer.h.*"),
          "Qwen2-style, 4 layers, vocab 32k": (qwen2_tiny, "model.layers.*")}


def measure(label: str, model: torch.nn.Module, case: str, tmp: Path) -> dict:
    state = model.state_dict()
    tied = find_aliases(state)  # {entry: the earlier entry it is tied to}
    paths = {k: tmp / f"m.{k}" for k in ("hwp", "pt", "st", "hwp_old")}
    hp.save(state, paths["hwp"])
    torch.save(state, paths["pt"])
    safetensors.torch.save_model(model, str(paths["st"]))
    back = hp.load(paths["hwp"])
    exact = list(back) == list(state) and all(
        torch.equal(back[n].view(torch.uint8), state[n].contiguous().view(torch.uint8))
        for n in state)
    ties_kept = bool(tied) and all(back[n] is back[of] for n, of in tied.items())
    # the bytes a file without alias records takes: the tied entries stored again
    untied = {n: (t.clone() if n in tied else t) for n, t in state.items()}
    hp.save(untied, paths["hwp_old"])
    size = {k: p.stat().st_size for k, p in paths.items()}
    xz = len(lzma.compress(paths["st"].read_bytes(), preset=9))
    return {"model": label, "case": case, "params": sum(p.numel() for p in model.parameters()),
            "tied": [f"{n} = {of}" for n, of in tied.items()], "hp_save": size["hwp"],
            "hp_save_untied": size["hwp_old"],
            "torch_save": size["pt"], "safetensors": size["st"], "safetensors_xz9": xz,
            "exact": exact, "ties_kept": ties_kept}


def main(argv: list[str] | None = None) -> int:
    args = parse(arguments(__doc__, "path prefix for .md and .json"), argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, (build, blocks) in MODELS.items():
            model = build().eval()
            rows.append(measure(label, model, "dense", Path(tmp)))
            hp.Magnitude(model, "2:4", targets=blocks).finalize()
            rows.append(measure(label, model, "2:4 in the blocks", Path(tmp)))
            print(rows[-2], rows[-1], flush=True)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), rows)
    columns = ["model", "case", "params", "tied entries", "hp.save", "hp.save, tie stored twice",
               "torch.save", "safetensors save_model", "safetensors + xz -9",
               "hp.save / torch.save", "exact", "tie kept"]
    body = [[r["model"], r["case"], f"{r['params']:,}", ", ".join(r["tied"]),
             f"{r['hp_save']:,}", f"{r['hp_save_untied']:,}", f"{r['torch_save']:,}",
             f"{r['safetensors']:,}", f"{r['safetensors_xz9']:,}",
             f"{r['hp_save'] / r['torch_save']:.3f}", "yes" if r["exact"] else "**no**",
             "yes" if r["ties_kept"] else "**no**"] for r in rows]
    lines = [header("Tied embeddings: file bytes", command(__file__, argv), machine()), "",
             "Bytes of each file. 'hp.save, tie stored twice': the same state with the tied "
             "entries cloned, which is what hp.save wrote before alias records (container "
             "version 5). safetensors' save_model drops the second name of a tied tensor.", ""]
    write_table(out.with_suffix(".md"), lines, columns, "llrlrrrrrrll", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
