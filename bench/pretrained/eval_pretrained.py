"""Top-1 accuracy and CPU throughput of the pretrained akamaster CIFAR-10 ResNets.

Checks that the model zoo, the checkpoint loader and the CIFAR-10 normalisation reproduce the
published accuracies (ResNet-20/32/44/56: 91.73 / 92.63 / 93.10 / 93.39 % on the test set).

    python bench/pretrained/eval_pretrained.py [--data-dir DIR] [--depths 20 32 44 56]

Writes bench/results/pretrained/pretrained_accuracy.md and .json.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

from common import RESULTS, arguments, cpu_name, parse, table, write_json
from hwprune.data import CIFAR10_MEAN, CIFAR10_STD, data_dir, load_cifar10
from hwprune.models import load_pretrained

DEPTHS = (20, 32, 44, 56)


def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """(top-1 %, images per second) over the whole set, after one warm-up batch.

    Throughput is batch size over the median batch time: the machine is shared, and the median
    ignores batches slowed by other processes.
    """
    model.eval()
    with torch.inference_mode():
        model(x[:batch_size])
        correct = 0
        rates = []
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            start = time.perf_counter()
            logits = model(xb)
            rates.append(len(xb) / (time.perf_counter() - start))
            correct += int((logits.argmax(1) == yb).sum())
    return 100.0 * correct / len(y), statistics.median(rates)


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Pretrained CIFAR-10 ResNets (akamaster checkpoints)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['processor']}; {m['platform']}; torch {m['torch']}; "
        f"{m['threads']} threads; batch size {report['batch_size']}; 1-minute load average "
        f"{m['loadavg_1min_start_end'][0]} at start, {m['loadavg_1min_start_end'][1]} at end.",
        "",
        f"Data: `{report['test_set']}` ({report['n_test']} images), normalised with mean "
        f"{report['mean']} and std {report['std']}.",
        "",
    ]
    lines += table(["model", "params", "top-1 %", "expected %", "images/s"], "lrrrr", [
        [f"ResNet-{r['depth']}", f"{r['params']:,}", f"{r['top1']:.2f}",
         "" if r["expected_top1"] is None else f"{r['expected_top1']:.2f}",
         f"{r['images_per_s']:.0f}"] for r in report["results"]])
    lines += [
        "",
        "Expected values are those measured in /work/shared/data/README.md; images/s is the "
        "CPU inference throughput (float32, eval mode; median over batches) and varies with "
        "machine load.",
        "",
    ]
    return "\n".join(lines)


EXPECTED = {20: 91.73, 32: 92.63, 44: 93.10, 56: 93.39}


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__, None, data_dir=True)
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, default=RESULTS / "pretrained", help="a folder")
    args = parse(p, argv)

    load_start = round(os.getloadavg()[0], 2)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    root = data_dir(args.data_dir)
    x, y = load_cifar10(root / "cifar10", train=False).tensors

    results = []
    for depth in args.depths:
        ckpt = root / "weights" / f"cifar10-resnet{depth}-akamaster.th"
        model = load_pretrained(ckpt, depth=depth)
        top1, ips = evaluate(model, x, y, args.batch_size)
        params = sum(t.numel() for t in model.parameters())
        results.append(
            {
                "model": f"resnet{depth}",
                "depth": depth,
                "checkpoint": ckpt.name,
                "params": params,
                "top1": round(top1, 2),
                "expected_top1": EXPECTED.get(depth),
                "images_per_s": round(ips, 1),
            }
        )
        print(f"ResNet-{depth}: {params:,} params, top-1 {top1:.2f} %, {ips:.0f} images/s")

    report = {
        "command": shlex.join(["python", *sys.argv] if argv is None else ["python", *argv]),
        "machine": {
            "processor": cpu_name(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            # Other processes share the cores; the load average says how far to trust images/s.
            "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
        },
        "batch_size": args.batch_size,
        "test_set": str(root / "cifar10"),
        "n_test": len(y),
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "pretrained_accuracy.json", report)
    (args.out / "pretrained_accuracy.md").write_text(_markdown(report))
    print(f"wrote {args.out / 'pretrained_accuracy.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
