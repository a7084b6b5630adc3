"""hwprune against Torch-Pruning on ResNet-56 (option B) at 50 % (or a torchvision model,
``--model``): MACs, parameters and CPU latency in PyTorch eager and in onnxruntime.

hwprune: ``Magnitude("map", 0.5)`` one-shot, ``finalize()``, ``hp.shrink``, then
``hp.fold_batchnorm``. Torch-Pruning: ``MagnitudePruner`` at ``pruning_ratio=0.5`` (L1
importance, the classifier ignored), then the same ``hp.fold_batchnorm`` so that both
deployable models are folded alike (Torch-Pruning's own model, unfolded, is timed too). Random
initialisation (option B has no pretrained weights here; latency does not depend on the
values, and neither does the MAC count). MACs per sample by hwprune's counter for every
model. Every model of one batch size is timed in turns in one loop (eager and onnxruntime
sessions alike; ``bench/deploy/latency.py``); the median of the repeats. onnxruntime runs the
file ``hp.export_model(..., format="onnx")`` wrote and checked, exported per batch size.

Needs Torch-Pruning and onnxruntime (the zoo venv, ``make zoo``)::

    .venv-zoo/bin/python bench/deploy/vs_torch_pruning.py [--repeats 30] [--threads 1]
    .venv-zoo/bin/python bench/deploy/vs_torch_pruning.py --model convnext_tiny --ratio 0.3 \
        --batches 1

Writes bench/results/deploy/vs_torch_pruning.md and .json (``--model`` other than resnet56:
``vs_torch_pruning_<model>.md`` and .json). torchvision models are built with random weights
at ImageNet input size.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import RESULTS, arguments, command, machine, parse, write_json, write_table
from deploy.latency import eager, medians_in_turns, onnxruntime_call, timing_header
from hwprune.models import resnet_cifar
from zoo.peer import macs, params, torch_pruning

OUT = RESULTS / "deploy"
CIFAR, IMAGENET = (3, 32, 32), (3, 224, 224)


def dense_model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The dense model and its input shape (one sample)."""
    torch.manual_seed(0)
    if name == "resnet56":
        return resnet_cifar(56, shortcut="B").eval(), CIFAR
    import torchvision  # the zoo venv only

    return getattr(torchvision.models, name)(weights=None).eval(), IMAGENET


def build(name: str, ratio: float, round_to: int = 1
          ) -> tuple[dict[str, torch.nn.Module], tuple[int, ...]]:
    """The models compared, by name, and the input shape; ``round_to`` > 1: both sides keep
    multiples of it (hwprune's and Torch-Pruning's ``round_to``)."""
    dense, shape = dense_model(name)
    x = torch.randn(2, *shape)
    start = time.perf_counter()
    pruned = hp.Magnitude(copy.deepcopy(dense), "map", ratio, example_inputs=x[:1],
                          round_to=round_to).finalize()
    small = hp.shrink(pruned, x)
    print(f"hwprune prune + shrink: {time.perf_counter() - start:.2f} s", flush=True)
    peer, seconds = torch_pruning(copy.deepcopy(dense), x[:1], ratio,
                                  round_to if round_to > 1 else None)
    print(f"Torch-Pruning: {seconds:.2f} s", flush=True)
    return {"dense": dense, "hwprune": hp.fold_batchnorm(small, x),
            "Torch-Pruning": peer.eval(),
            "Torch-Pruning folded": hp.fold_batchnorm(peer, x)}, shape


def measure(models: dict[str, torch.nn.Module], shape: tuple[int, ...], batch: int,
            repeats: int, folder: str) -> list[dict]:
    x = torch.randn(batch, *shape)
    x1 = x[:1]
    names = list(models)
    calls = [eager(models[n], x) for n in names]
    calls += [onnxruntime_call(models[n], x, folder) for n in names]
    seconds = medians_in_turns(calls, repeats)
    dense_macs, dense_params = macs(models["dense"], x1), params(models["dense"])
    rows = []
    for i, name in enumerate(names):
        m = macs(models[name], x1)
        eager_ms, ort_ms = seconds[i] * 1e3, seconds[len(names) + i] * 1e3
        rows.append({"model": name, "batch": batch, "repeats": repeats, "macs": m,
                     "mac_reduction": round(dense_macs / m, 3), "params": params(models[name]),
                     "param_reduction": round(dense_params / params(models[name]), 3),
                     "eager_ms": round(eager_ms, 3), "ort_ms": round(ort_ms, 3),
                     "eager_speedup": round(seconds[0] / seconds[i], 3),
                     "ort_speedup": round(seconds[len(names)] / seconds[len(names) + i], 3),
                     "ort_over_eager": round(ort_ms / eager_ms, 3),
                     "class": type(models[name]).__name__})
    return rows


def _summary(rows: list[dict]) -> str:
    """hwprune's MAC reduction and times against Torch-Pruning's folded model, per batch."""
    by = {(r["model"], r["batch"]): r for r in rows}
    parts = []
    for batch in sorted({r["batch"] for r in rows}):
        h, t = by[("hwprune", batch)], by[("Torch-Pruning folded", batch)]
        parts.append(f"batch {batch}: eager {h['eager_ms'] / t['eager_ms']:.2f}, "
                     f"onnxruntime {h['ort_ms'] / t['ort_ms']:.2f}")
    h = next(r for r in rows if r["model"] == "hwprune")
    t = next(r for r in rows if r["model"] == "Torch-Pruning")
    return (f"MAC reduction: hwprune {h['mac_reduction']:.2f}x, Torch-Pruning "
            f"{t['mac_reduction']:.2f}x. hwprune's time over Torch-Pruning's folded model's "
            f"(below 1: hwprune faster): {'; '.join(parts)}.")


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, None, threads=1, repeats=30)
    parser.add_argument("--model", default="resnet56",
                        help="resnet56 (CIFAR, option B) or a torchvision model's name")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=1,
                        help="both pruners keep multiples of this many maps (1: no rounding)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parse(parser, argv)
    models, shape = build(args.model, args.ratio, args.round_to)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for batch in args.batches:
            # batch 64 of the dense model takes far longer: fewer repeats keep the run short
            reps = args.repeats if batch == 1 else max(5, args.repeats // 3)
            rows += measure(models, shape, batch, reps, folder)
            print(rows[-4:], flush=True)
    title = "ResNet-56 (option B)" if args.model == "resnet56" else f"torchvision {args.model}"
    rounded = "" if args.round_to == 1 else f", round_to={args.round_to}"
    lines = [timing_header(f"hwprune against Torch-Pruning: {title}",
                           command(__file__, argv), machine(), args.threads), "",
             f"Random initialisation, one-shot at {args.ratio:.0%}. `hwprune`: "
             f"`Magnitude(\"map\", {args.ratio}{rounded})`, `finalize()`, `hp.shrink`, "
             "`hp.fold_batchnorm`. `Torch-Pruning`: `MagnitudePruner(pruning_ratio="
             f"{args.ratio}{rounded})` (L1, classifier ignored); `folded`: then "
             "`hp.fold_batchnorm`. "
             "MACs per sample (hwprune's counter for every model). Latency: every model of "
             "one batch size in eager and in onnxruntime, timed in turns in one loop, median "
             "of the repeats; `speed-up` is over the dense model in the same runtime; `ORT / "
             "eager`: onnxruntime's time over eager's for the same model.", ""]
    lines += [_summary(rows), ""]
    out = OUT / ("vs_torch_pruning" + ("" if args.model == "resnet56" else f"_{args.model}")
                 + ("" if args.round_to == 1 else f"_round{args.round_to}"))
    write_table(out.with_suffix(".md"), lines,
                ["model", "class", "batch", "MACs", "MAC reduction", "params",
                 "param reduction", "eager ms", "eager speed-up", "ORT ms", "ORT speed-up",
                 "ORT / eager"], "llrrrrrrrrrr",
                [[r["model"], r["class"], r["batch"], f"{r['macs']:,}",
                  f"{r['mac_reduction']:.2f}x", f"{r['params']:,}",
                  f"{r['param_reduction']:.2f}x", f"{r['eager_ms']:.2f}",
                  f"{r['eager_speedup']:.2f}x", f"{r['ort_ms']:.2f}",
                  f"{r['ort_speedup']:.2f}x", f"{r['ort_over_eager']:.2f}"] for r in rows])
    write_json(out.with_suffix(".json"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
