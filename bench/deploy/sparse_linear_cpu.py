"""Sparse CSR/BSR Linear against dense on this CPU: where does sparse start to pay?

Weights of realistic Linear shapes (out x in: a 512-wide MLP, a BERT-base FFN up/down
projection, a 1024-wide square layer), pruned at random to each sparsity: element-wise
(irregular, for CSR) and in 16x16 blocks (for BSR, the block size ``to_sparse_kernels`` tries
first). Timed: ``F.linear`` dense, and the ``SparseLinear`` module of
``hwprune.deploy.sparse_kernels`` (``torch.sparse.mm`` on the sparse weight), median over the
repeats, at batch 1 and 64 rows.

    python bench/deploy/sparse_linear_cpu.py [--threads 1] [--repeats 20]

Writes bench/results/deploy/sparse_linear_cpu.jsonl (resumable) and .md.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
import torch.nn.functional as F
from shrink_latency import MACHINE, OUT

from common import ResultLog, arguments, command, header, parse, table, write_lines
from hwprune.deploy.sparse_kernels import SparseLinear, median_timer

SHAPES = [(512, 512), (3072, 768), (768, 3072), (1024, 1024)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]


def weight(shape: tuple[int, int], sparsity: float, block: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    keep = torch.rand(shape[0] // block, shape[1] // block, generator=g) >= sparsity
    return w * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def run(shape: tuple[int, int], sparsity: float, batch: int, repeats: int) -> dict:
    x = torch.randn(batch, shape[1])
    median_ms = median_timer(torch.device("cpu"))
    rec = {"shape": list(shape), "sparsity": sparsity, "batch": batch, "repeats": repeats}
    with torch.inference_mode():
        for fmt, block in (("csr", 1), ("bsr", 16)):
            w = weight(shape, sparsity, block)
            sw = w.to_sparse_csr() if fmt == "csr" else w.to_sparse_bsr((16, 16))
            layer = SparseLinear(sw, None, fmt, shape[1], shape[0])
            assert torch.allclose(layer(x), F.linear(x, w), atol=1e-3)
            dense = median_ms(lambda w=w: F.linear(x, w), repeats)
            sparse = median_ms(lambda layer=layer: layer(x), repeats)
            rec[f"{fmt}_dense_ms"], rec[f"{fmt}_ms"] = round(dense, 4), round(sparse, 4)
            rec[f"{fmt}_speedup"] = round(dense / sparse, 3)
            rec[f"{fmt}_actual_sparsity"] = round(float((w == 0).float().mean()), 4)
    return rec


def write_markdown(records: list[dict], cmd: str, threads: int) -> None:
    lines = [header("Sparse CSR/BSR Linear against dense (CPU)", cmd,
                    f"{MACHINE}, `torch.set_num_threads({threads})`. "
                    "Random element-wise sparsity for CSR, random 16x16-block sparsity for BSR; "
                    "`torch.sparse.mm` through `hwprune.deploy.sparse_kernels.SparseLinear` "
                    "against `F.linear`; median ms of the repeats. Speed-up > 1: sparse is "
                    "faster.", inline=True), ""]
    lines += table(["shape (out x in)", "batch", "sparsity", "dense ms", "CSR ms", "CSR speed-up",
                    "BSR 16x16 ms", "BSR speed-up"], "lrrrrrrr",
                   [[f"{r['shape'][0]}x{r['shape'][1]}", r["batch"], f"{r['sparsity']:.2f}",
                     f"{r['csr_dense_ms']:.3f}", f"{r['csr_ms']:.3f}", f"{r['csr_speedup']:.2f}x",
                     f"{r['bsr_ms']:.3f}", f"{r['bsr_speedup']:.2f}x"] for r in records])
    lines += ["", "Crossover (lowest sparsity where sparse is faster than dense):", ""]
    for shape in SHAPES:
        for batch in sorted({r["batch"] for r in records}):
            rows = [r for r in records if r["shape"] == list(shape) and r["batch"] == batch]
            for fmt in ("csr", "bsr"):
                wins = [r["sparsity"] for r in rows if r[f"{fmt}_speedup"] > 1]
                at = f"{min(wins):.2f}" if wins else "none up to 0.98"
                lines.append(f"- {shape[0]}x{shape[1]}, batch {batch}, {fmt.upper()}: {at}")
    write_lines(OUT / "sparse_linear_cpu.md", lines)


def main() -> None:
    ap = arguments(__doc__, None, threads=1, repeats=20)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    args = parse(ap, None)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    log = ResultLog(OUT / "sparse_linear_cpu.jsonl",
                    key=lambda r: (tuple(r["shape"]), r["sparsity"], r["batch"]))
    for shape in SHAPES:
        for batch in args.batches:
            for sparsity in SPARSITIES:
                if not log.done(shape, sparsity, batch):
                    log.add(run(shape, sparsity, batch, args.repeats))
    write_markdown(log.records, command(__file__), args.threads)


if __name__ == "__main__":
    main()
