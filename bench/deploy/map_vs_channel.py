"""MACs removed by shrink after ``Magnitude("map")`` against ``Magnitude("channel")``.

"channel" zeroes one conv's input channels, so a channel a residual addition ties to other
layers stays wherever something else still writes or reads it; "map" zeroes every weight of a
coupled feature map, so shrink removes it whole. Both prune the same fraction of their groups
one-shot on randomly initialised CIFAR ResNets with projection (option B) shortcuts; the MACs
are ``hp.report``'s at batch 1 (one sample), the parameters and the output check are
``hp.shrink``'s. No training: this measures what is removed, not accuracy.

    python bench/deploy/map_vs_channel.py [--depths 20 56] [--sparsity 0.5]

Writes bench/results/deploy/map_vs_channel.md and .json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import RESULTS, arguments, command, header, machine, parse, write_json, write_table
from hwprune.models import resnet_cifar

OUT = RESULTS / "deploy"


def measure(depth: int, structure: str, sparsity: float) -> dict:
    torch.manual_seed(0)
    model = resnet_cifar(depth, shortcut="B").eval()
    x = torch.randn(1, 3, 32, 32)
    dense_macs = hp.report(model, x).total["model_macs"]
    start = time.perf_counter()
    kw = {"example_inputs": x} if structure == "map" else {}
    pruned = hp.Magnitude(model, structure, sparsity, **kw).finalize()
    result = hp.shrink(pruned, x, return_result=True)
    seconds = time.perf_counter() - start
    macs = hp.report(result.model, x).total["model_macs"]
    return {"model": f"resnet{depth}-B", "structure": structure, "sparsity": sparsity,
            "macs_dense": dense_macs, "macs_shrunk": macs,
            "mac_reduction": round(dense_macs / macs, 3),
            "params_dense": result.params_before, "params_shrunk": result.params_after,
            "kept_zero_groups": len(result.kept), "max_abs_diff": result.max_abs_diff,
            "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, None, threads=1)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parse(parser, argv)
    rows = []
    for depth in args.depths:
        for structure in ("map", "channel"):
            rows.append(measure(depth, structure, args.sparsity))
            print(json.dumps(rows[-1]), flush=True)
    lines = [header("Shrink after Magnitude: coupled feature maps against input channels",
                    command(__file__, argv), f"{machine()}, `torch.set_num_threads("
                    f"{args.threads})`", inline=True), "",
             "Random initialisation, one-shot `hp.Magnitude(model, structure, sparsity)` "
             "(L1, layer scope), `finalize()`, `hp.shrink`. MACs per sample (`hp.report` at "
             "batch 1). `kept zero groups`: groups shrink found zero or constant somewhere but "
             "had to keep (`ShrinkResult.kept`). `seconds`: prune, finalize and shrink. "
             "Torch-Pruning is not compared here (it needs its own install).", ""]
    write_table(OUT / "map_vs_channel.md", lines,
                ["model", "structure", "sparsity", "MACs dense", "MACs shrunk", "MAC reduction",
                 "params dense", "params shrunk", "kept zero groups", "max abs diff",
                 "seconds"], "llrrrrrrrrr",
                [[r["model"], r["structure"], r["sparsity"], f"{r['macs_dense']:,}",
                  f"{r['macs_shrunk']:,}", f"{r['mac_reduction']:.2f}x",
                  f"{r['params_dense']:,}", f"{r['params_shrunk']:,}", r["kept_zero_groups"],
                  f"{r['max_abs_diff']:.1e}", r["seconds"]] for r in rows])
    write_json(OUT / "map_vs_channel.json", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
