"""DARB against BMWM, block pruning and irregular pruning on the pretrained CIFAR-10 ResNet-20
(akamaster checkpoint), conv layers, at pruning ratios 4x, 8x, 13x, with equal short retraining.

* Targets: the default (every conv but the first; the only linear, the classifier, stays dense).
* Methods as in ``darb_lstm.py`` (``make_pruner``): ``darb`` (``hp.DARB``), ``bmwm``
  (``hp.Magnitude`` ``"1:b"``, b the power of two nearest the ratio: runs of b input channels),
  ``block`` (``"block:4x4"`` tiles of the im2col matrix) and ``irregular`` (per-layer magnitude).
* Each point: one-shot from the pretrained weights, then ``--steps`` SGD steps (lr 0.01,
  momentum 0.9, weight decay 5e-4, cosine per step, crop + flip) on the first ``--subset``
  training images with the masks fixed; top-1 accuracy on the first ``--test-subset`` test
  images.

    nohup python bench/methods/darb_resnet20.py --out bench/results/methods/darb/darb_resnet20 \
        > /tmp/darb_r20.log &
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from darb_lstm import bench_setup, make_pruner, pending, point_record, shared_cpu, summary_table

from common import command, header, write_lines
from hwprune.data import augment_cifar, data_dir, load_cifar10
from hwprune.models import load_pretrained
from hwprune.training import evaluate, make_loader, train_epoch


def write_summary(out: Path, records: list[dict], head: str) -> None:
    dense = next((r for r in records if r["method"] == "dense"), None)
    lines = [head, ""]
    if dense:
        lines += [f"Pretrained dense model: {100 * dense['accuracy']:.2f} % on the same test "
                  "images.", ""]
    lines += summary_table(records, [("accuracy", "{accuracy:.2%}")])
    write_lines(out.with_suffix(".md"), lines)


def _resnet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--subset", type=int, default=10_000)
    parser.add_argument("--test-subset", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=128)


def main(argv=None) -> int:
    args, out, log = bench_setup(__doc__, [4, 8, 13], argv, _resnet_args)
    head = header(
        "DARB on CIFAR-10 ResNet-20 (pretrained), conv layers", command(__file__, argv),
        f"{shared_cpu(args.threads)}. Each point: one-shot from the pretrained akamaster "
        "ResNet-20, then "
        f"{args.steps} SGD steps (batch {args.batch}, lr 0.01, momentum 0.9, wd 5e-4, cosine, "
        f"crop + flip) on the first {args.subset} training images with the masks fixed, the same "
        f"batches for every method. Accuracy: the first {args.test_subset} test images. Pruned: "
        f"every conv but the first (18 layers). Block pruning uses 4x4 tiles of the im2col "
        f"matrix; BMWM is 1:b over input channels with b the power of two nearest the target.")
    root = data_dir(args.data_dir)
    train = torch.utils.data.Subset(load_cifar10(root, train=True), range(args.subset))
    test = torch.utils.data.Subset(load_cifar10(root, train=False), range(args.test_subset))
    test_loader = make_loader(test, 500, shuffle=False)
    weights = root / "weights" / "cifar10-resnet20-akamaster.th"
    if not log.done("dense", 1.0):
        log.add({"method": "dense", "target_ratio": 1.0, "ratio": 1.0,
                 "accuracy": evaluate(load_pretrained(weights), test_loader)})
    write_summary(out, log.records, head)
    for ratio, method in pending(args, log):
        start = time.perf_counter()
        torch.manual_seed(0)
        model = load_pretrained(weights).train()
        pruner = make_pruner(method, model, ratio, targets=None)
        opt = torch.optim.SGD(pruner.param_groups(lr=0.01, momentum=0.9, weight_decay=5e-4))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
        gen = torch.Generator().manual_seed(0)
        done = 0
        while done < args.steps:  # whole epochs of the subset, then part of one
            part = range(min(len(train), (args.steps - done) * args.batch))
            loader = make_loader(torch.utils.data.Subset(train, part), args.batch,
                                 shuffle=True, seed=done)
            train_epoch(model, loader, opt, pruner,
                        augment=partial(augment_cifar, generator=gen), on_step=sched.step)
            done += len(loader)
        log.add(point_record(method, ratio, pruner, start, lambda: {  # called at once
            "accuracy": evaluate(model, test_loader), "steps": done}))  # noqa: B023
        write_summary(out, log.records, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
