"""What exactness costs where a channel leaves a LayerNorm over the channels (ConvNeXt).

hwprune's shrink narrows such a norm to ``NarrowedLayerNorm``: the removed channels' constants
are padded back and the original width normalised, so the shrunk model computes exactly the
pruned one. Torch-Pruning narrows it to a plain ``LayerNorm`` over the kept channels, which
normalises over fewer channels (another function). This times, in turns in one loop, eager,
at batch 1: hwprune's shrunk and folded model; the same model with every narrowed norm
replaced by a plain LayerNorm over the kept channels (Torch-Pruning's function, same weights);
and Torch-Pruning's folded model of the same MACs.

Needs the zoo venv (``make zoo``)::

    .venv-zoo/bin/python bench/deploy/exact_norm_cost.py [--round-to 8] [--repeats 31]

Writes bench/results/deploy/exact_norm_cost.md and .json.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from torch import nn

from common import RESULTS, arguments, command, machine, parse, write_json, write_table
from deploy.latency import eager, medians_in_turns, timing_header
from deploy.vs_torch_pruning import build
from hwprune.deploy.shrink.norms import NarrowedLayerNorm

OUT = RESULTS / "deploy" / "exact_norm_cost"


def with_plain_norms(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every ``NarrowedLayerNorm`` replaced by a ``LayerNorm`` over
    its kept channels (the same weight and bias), and how many were replaced."""
    plain = copy.deepcopy(model)
    narrowed = [(n, m) for n, m in plain.named_modules() if isinstance(m, NarrowedLayerNorm)]
    for name, m in narrowed:
        norm = nn.LayerNorm(m.kept, eps=m.eps, elementwise_affine=m.weight is not None,
                            bias=m.bias is not None)
        with torch.no_grad():
            if m.weight is not None:
                norm.weight.copy_(m.weight)
            if m.bias is not None:
                norm.bias.copy_(m.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(parent), leaf, norm)
    return plain, len(narrowed)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, None, threads=1, repeats=31)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--round-to", type=int, default=8)
    args = parse(parser, argv)
    models, shape = build(args.model, args.ratio, args.round_to)
    exact = models["hwprune"]
    plain, replaced = with_plain_norms(exact)
    x = torch.randn(1, *shape)
    with torch.inference_mode():
        scale = exact(x).abs().max()
        changed = float((plain(x) - exact(x)).abs().max() / scale)
    names = ["hwprune (exact narrowed norms)", "hwprune, plain LayerNorms over the kept channels",
             "Torch-Pruning folded"]
    ms = [s * 1e3 for s in medians_in_turns(
        [eager(exact, x), eager(plain, x), eager(models["Torch-Pruning folded"], x)],
        args.repeats)]
    rows = [{"model": n, "eager_ms": round(t, 3), "over_torch_pruning": round(t / ms[2], 3)}
            for n, t in zip(names, ms, strict=True)]
    lines = [timing_header(f"The cost of exact narrowed LayerNorms: torchvision {args.model}",
                           command(__file__, argv), machine(), args.threads), "",
             f"Random initialisation, `Magnitude(\"map\", {args.ratio}, round_to="
             f"{args.round_to})` one-shot, shrunk and folded; Torch-Pruning at the same ratio "
             f"and `round_to`. {replaced} narrowed norms replaced; the plain norms change the "
             f"output by {changed:.2e} of its scale (they are another function). Eager, "
             f"batch 1, median of {args.repeats} rounds in turns.", ""]
    write_table(OUT.with_suffix(".md"), lines, ["model", "eager ms", "over Torch-Pruning's"],
                "lrr", [[r["model"], f"{r['eager_ms']:.2f}", f"{r['over_torch_pruning']:.3f}"]
                        for r in rows])
    write_json(OUT.with_suffix(".json"), {"rows": rows, "replaced": replaced,
                                          "relative_change": changed})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
