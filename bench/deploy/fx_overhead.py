"""What a ``torch.fx.GraphModule`` costs per forward pass against the model's own class.

``hp.shrink`` returns the model's own class where it only narrowed layers, and a
GraphModule where it had to rewrite the graph. This measures the price of the second: the
same model, with the same weights, run as itself and as ``torch.fx.symbolic_trace(model)``,
timed in turns (``medians_in_turns`` of shrink_latency.py); the models are the digits CNN and
the pretrained CIFAR ResNet-20, at batch 1 and 64.

    python bench/deploy/fx_overhead.py [--threads 1] [--repeats 300]

Writes bench/results/deploy/fx_overhead.md and .json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
import torch.fx
from shrink_latency import OUT, load, medians_in_turns

from common import arguments, command, header, machine, parse, write_json, write_table


def main(argv: list[str] | None = None) -> int:
    args = parse(arguments(__doc__, None, threads=1, repeats=300), argv)
    rows = []
    for name in ("digits-cnn", "resnet20"):
        model, shape, _ = load(name)
        traced = torch.fx.symbolic_trace(model).eval()
        for batch in (1, 64):
            x = torch.randn(batch, *shape)
            with torch.no_grad():
                assert torch.equal(model(x), traced(x))  # the same function, bit for bit
            repeats = args.repeats if batch == 1 else max(args.repeats // 10, 10)
            own, fx = medians_in_turns([model, traced], x, repeats)
            rows.append({"model": name, "batch": batch, "repeats": repeats,
                         "ms_own_class": round(own * 1e3, 4),
                         "ms_graph_module": round(fx * 1e3, 4),
                         "graph_module_over_own": round(fx / own, 3)})
            print(json.dumps(rows[-1]), flush=True)
    lines = [header("The GraphModule's overhead: the same model as its own class and as fx",
                    command(__file__, argv), f"{machine()}, `torch.set_num_threads("
                    f"{args.threads})`. Both forms run in turns within one loop; medians.",
                    inline=True), ""]
    write_table(OUT / "fx_overhead.md", lines,
                ["model", "batch", "repeats", "ms own class", "ms GraphModule",
                 "GraphModule / own"], "lrrrrr",
                [[r["model"], r["batch"], r["repeats"], f"{r['ms_own_class']:.4f}",
                  f"{r['ms_graph_module']:.4f}", f"{r['graph_module_over_own']:.3f}x"]
                 for r in rows])
    write_json(OUT / "fx_overhead.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
