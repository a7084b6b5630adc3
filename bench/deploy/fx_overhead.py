"""What a ``torch.fx.GraphModule`` costs per forward pass against the model's own class.

``hp.shrink`` returns the model's own class where it only narrowed layers, and a
GraphModule where it had to rewrite the graph. This measures the price of the second: the
same model, with the same weights, run as itself and as ``torch.fx.symbolic_trace(model)``,
timed in turns (``medians_in_turns`` of shrink_latency.py); the models are the digits CNN and
the pretrained CIFAR ResNet-20, at batch 1 and 64.

    python bench/fx_overhead.py [--threads 1] [--repeats 300]

Writes bench/results/fx_overhead.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.fx

from results_log import machine
from shrink_latency import OUT, load, medians_in_turns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
    lines = [
        "# The GraphModule's overhead: the same model as its own class and as fx", "",
        f"Command: `python bench/fx_overhead.py {' '.join(sys.argv[1:])}`. Machine: "
        f"{machine()}, `torch.set_num_threads({args.threads})`. Both forms run in turns "
        "within one loop; medians.", "",
        "| model | batch | repeats | ms own class | ms GraphModule | GraphModule / own |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['model']} | {r['batch']} | {r['repeats']} | {r['ms_own_class']:.4f} | "
              f"{r['ms_graph_module']:.4f} | {r['graph_module_over_own']:.3f}x |" for r in rows]
    (OUT / "fx_overhead.md").write_text("\n".join(lines) + "\n")
    (OUT / "fx_overhead.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
