"""What ``round_to`` buys: map-pruned torchvision models whose channel counts are multiples of 8
against the same pruning without rounding, in PyTorch eager and in onnxruntime.

Each model (random weights, ImageNet input size, batch 1): dense; ``Magnitude("map", ratio)``
+ ``finalize()`` + ``hp.shrink`` + ``hp.fold_batchnorm`` without rounding; the same with
``round_to=8``. The three are timed in turns in one loop (``bench/deploy/latency.py``),
eager and onnxruntime, median of the repeats. MACs per sample by hwprune's counter.

Needs torchvision and onnxruntime (the zoo venv, ``make zoo``)::

    .venv-zoo/bin/python bench/deploy/round_to_latency.py [--models mobilenet_v2 resnet18]

Writes bench/results/deploy/round_to_latency.md and .json.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import RESULTS, arguments, command, machine, parse, write_json, write_table
from deploy.latency import eager, medians_in_turns, onnxruntime_call, timing_header
from zoo.peer import macs

OUT = RESULTS / "deploy" / "round_to_latency"
MODELS = ["mobilenet_v2", "efficientnet_b0", "resnet18", "convnext_tiny"]


def variants(name: str, ratio: float, round_to: int) -> dict[str, torch.nn.Module]:
    import torchvision  # the zoo venv only

    torch.manual_seed(0)
    dense = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    out = {"dense": dense}
    for m in (1, round_to):
        pruned = hp.Magnitude(copy.deepcopy(dense), "map", ratio, example_inputs=x,
                              round_to=m).finalize()
        out[f"round_to={m}"] = hp.fold_batchnorm(hp.shrink(pruned, x), x)
    return out


def measure(name: str, ratio: float, round_to: int, repeats: int) -> list[dict]:
    models = variants(name, ratio, round_to)
    x = torch.randn(1, 3, 224, 224)
    names = list(models)
    with tempfile.TemporaryDirectory() as folder:
        calls = [eager(models[n], x) for n in names]
        calls += [onnxruntime_call(models[n], x, folder) for n in names]
        seconds = medians_in_turns(calls, repeats)
    k = len(names)
    dense_macs = macs(models["dense"], x)
    return [{"model": name, "variant": n, "macs": macs(models[n], x),
             "mac_reduction": round(dense_macs / macs(models[n], x), 3),
             "eager_ms": round(seconds[i] * 1e3, 3), "ort_ms": round(seconds[k + i] * 1e3, 3),
             "eager_speedup": round(seconds[0] / seconds[i], 3),
             "ort_speedup": round(seconds[k] / seconds[k + i], 3), "repeats": repeats}
            for i, n in enumerate(names)]


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, None, threads=1, repeats=21)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--round-to", type=int, default=8)
    args = parse(parser, argv)
    rows = []
    for name in args.models:
        rows += measure(name, args.ratio, args.round_to, args.repeats)
        print(rows[-3:], flush=True)
    lines = [timing_header("round_to: channel counts that vector units divide",
                           command(__file__, argv), machine(), args.threads), "",
             f"Random weights, batch 1, 224 x 224. `Magnitude(\"map\", {args.ratio}, "
             f"round_to=...)`, `finalize()`, `hp.shrink`, `hp.fold_batchnorm`; the dense model "
             "and both pruned ones timed in turns in one loop, eager and onnxruntime, median "
             "of the repeats; speed-up over the dense model in the same runtime.", ""]
    write_table(OUT.with_suffix(".md"), lines,
                ["model", "variant", "MACs", "MAC reduction", "eager ms", "eager speed-up",
                 "ORT ms", "ORT speed-up"], "llrrrrrr",
                [[r["model"], r["variant"], f"{r['macs']:,}", f"{r['mac_reduction']:.2f}x",
                  f"{r['eager_ms']:.2f}", f"{r['eager_speedup']:.2f}x", f"{r['ort_ms']:.2f}",
                  f"{r['ort_speedup']:.2f}x"] for r in rows])
    write_json(OUT.with_suffix(".json"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
