"""Stored bytes of pruned pretrained CIFAR ResNets: which encoding each weight takes, the index
overhead against its information-theoretic minimum, and the file sizes of ``save``.

One-shot magnitude pruning (no retraining: storage does not depend on accuracy) of the akamaster
checkpoints, for each structure; every file is loaded back and compared bitwise.

    python bench/storage/storage_sizes.py [--data-dir DIR] [--depths 20 56]

Writes bench/results/storage/storage_sizes.json and .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import RESULTS, arguments, command, parse, table, write_json
from hwprune.data import data_dir
from hwprune.models import load_pretrained
from hwprune.storage import file_layout, load, save, stored_bytes

CASES = [("dense", None, None), ("element", "element", 0.9), ("2:4", "2:4", None),
         ("block:4x4", "block:4x4", 0.5), ("channel", "channel", 0.5)]
OUT = RESULTS / "storage"


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bits (NaN and -0.0 included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()])))


def run_case(weights: Path, label: str, structure: str | None, sparsity: float | None) -> dict:
    torch.manual_seed(0)
    model = load_pretrained(weights)
    targets: list[str] = []
    if structure is not None:
        pruner = hp.Magnitude(model, structure, sparsity)
        targets = list(pruner.layers)
        model = pruner.finalize()
    state = model.state_dict()
    start = time.perf_counter()
    infos = {name: stored_bytes(t, hints=structure if name in targets else None)
             for name, t in state.items()}
    choose_s = time.perf_counter() - start
    prunable = targets or [n for n, t in state.items() if t.ndim >= 2]
    rows = [infos[n] for n in prunable]
    out = {
        "model": weights.stem, "case": label, "structure": structure, "sparsity": sparsity,
        "layers": len(prunable),
        "encodings": dict(Counter(r["encoding"] for r in rows)),
        "dense_bytes": sum(r["dense_bytes"] for r in rows),
        "stored_bytes": sum(r["total_bytes"] for r in rows),
        "index_bytes": sum(r["index_bytes"] for r in rows),
        "min_index_bytes": sum((r["min_index_bits"] or 0) for r in rows) / 8,
        "kept": sum(r["kept"] for r in rows),
        "stored_bits_per_kept_weight": 8 * sum(r["total_bytes"] for r in rows)
        / max(1, sum(r["kept"] for r in rows)),
        "choose_seconds_all_tensors": round(choose_s, 3),
    }
    with tempfile.TemporaryDirectory() as d:
        for compress in (None, "zlib", "lzma"):
            path = Path(d) / f"m-{compress}.hwp"
            start = time.perf_counter()
            save(state, path, compress=compress,
                 hints={n: structure for n in targets} if structure else None)
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            back = load(path)
            load_s = time.perf_counter() - start
            assert list(back) == list(state) and all(bits_equal(back[n], state[n]) for n in state)
            layout = file_layout(path)
            if compress is None:
                assert layout["data_bytes"] == sum(i["total_bytes"] for i in infos.values())
                out["file_bytes"] = layout["size"]
                out["file_header_bytes"] = layout["header_bytes"]
                out["state_dict_dense_bytes"] = sum(i["dense_bytes"] for i in infos.values())
                out["save_seconds"], out["load_seconds"] = round(save_s, 3), round(load_s, 3)
            else:
                out[f"file_bytes_{compress}"] = layout["size"]
    return out


def to_markdown(results: list[dict], cmd: str) -> str:
    lines = [
        "# Stored bytes of pruned CIFAR ResNets (hwprune.storage)", "",
        f"Command: `{cmd}`. One-shot magnitude pruning of the pretrained akamaster "
        "checkpoints (default targets: every conv and linear weight except the first conv and "
        "the last linear layer; `dense` counts the same weights unpruned). Bytes of the pruned "
        "weights: payload + index as stored; `min index` is the information-theoretic minimum "
        "of the chosen patterns (log2 C(n, k) per k-of-n run, log2 C(N, kept) for irregular). "
        "Files hold the whole state dict (BN included); every file was loaded back bitwise.",
        "",
    ]
    lines += table(
        ["model", "case", "encodings", "dense B", "stored B", "index B", "min index B",
         "bits/kept", "file B", "zlib B", "lzma B", "header B"], "lllrrrrrrrrr",
        [[r["model"], r["case"], ", ".join(f"{k} {v}" for k, v in sorted(r["encodings"].items())),
          f"{r['dense_bytes']:,}", f"{r['stored_bytes']:,}", f"{r['index_bytes']:,}",
          f"{r['min_index_bytes']:,.0f}", f"{r['stored_bits_per_kept_weight']:.2f}",
          f"{r['file_bytes']:,}", f"{r['file_bytes_zlib']:,}", f"{r['file_bytes_lzma']:,}",
          f"{r['file_header_bytes']:,}"] for r in results])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, None, data_dir=True)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    args = parse(parser, argv)
    root = data_dir(args.data_dir)
    results = []
    for depth in args.depths:
        weights = root / "weights" / f"cifar10-resnet{depth}-akamaster.th"
        for label, structure, sparsity in CASES:
            results.append(run_case(weights, label, structure, sparsity))
            print(json.dumps(results[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "storage_sizes.json", results)
    (OUT / "storage_sizes.md").write_text(to_markdown(results, command(__file__, argv)))


if __name__ == "__main__":
    main()
