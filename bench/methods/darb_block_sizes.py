"""How DARB cuts a trained model: per layer and ratio, the reference pruning's row densities,
the block sizes chosen, and how close the kept count lands to the target (no training).

    python bench/methods/darb_block_sizes.py --ckpt /tmp/hwprune_darb_lstm_dense.pt \
        --out bench/results/methods/darb/darb_block_sizes_lstm

The checkpoint is the dense model ``darb_lstm.py`` trains (its ``--ckpt``; same ``--hidden``
and ``--embedding``); without ``--ckpt`` the pretrained CIFAR-10 ResNet-20 is used.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from torch import nn

import hwprune as hp
from common import arguments, command, header, machine, parse, table, write_lines
from hwprune.data import data_dir, load_tinyshakespeare
from hwprune.models import CharLSTM, load_pretrained


def main(argv=None) -> int:
    parser = arguments(__doc__, "path prefix for the .md")
    parser.add_argument("--ckpt", default=None, help="darb_lstm.py's dense checkpoint")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--ratios", type=float, nargs="+", default=[4, 8, 13, 16, 25])
    args = parse(parser, argv)
    if args.ckpt:
        vocab = load_tinyshakespeare()[2]
        model = CharLSTM(len(vocab), args.embedding, args.hidden)
        model.load_state_dict(torch.load(args.ckpt, weights_only=True))
        targets, what = nn.LSTM, f"char LSTM (hidden {args.hidden}) from {args.ckpt}"
    else:
        model = load_pretrained(data_dir() / "weights" / "cifar10-resnet20-akamaster.th")
        targets, what = None, "pretrained CIFAR-10 ResNet-20, every conv but the first"
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    lines = [header(f"DARB block sizes and ratio accuracy: {what}", command(__file__, argv),
                    f"{machine()}. "
                    "Row density spread: max / min survivors per row of the reference "
                    "(irregular magnitude) pruning, and the 95th / 5th percentile. Tolerance "
                    "bound: the documented max_step / 2 (module docstring of "
                    "hwprune.methods.darb)."), "",
             *table(["ratio", "layer", "rows x cols", "density spread max/min (p95/p5)",
                     "block sizes (rows)", "target kept", "kept", "deviation", "bound"],
                    "rllllrrrr", [])]
    for ratio in args.ratios:
        model.load_state_dict(dense)
        pruner = hp.DARB(model, ratio, targets=targets)
        for name, mask in pruner.masks().items():
            w = dense[name]
            rows, cols = mask.shape[0], mask[0].numel()
            kept_ref = round(rows * cols / ratio)
            ref = torch.zeros(rows * cols, dtype=torch.bool)
            ref[w.detach().abs().reshape(-1).argsort(descending=True)[:kept_ref]] = True
            nnz = ref.reshape(rows, cols).sum(1).float()
            q = torch.quantile(nnz, torch.tensor([0.05, 0.95]))
            sizes = pruner.allowed_sizes[name]
            bound = max((math.ceil(cols / a) - math.ceil(cols / b))
                        for a, b in zip(sizes, sizes[1:], strict=False)) / 2
            hist = Counter(pruner.block_sizes[name].tolist())
            kept = int(mask.sum())
            target = rows * cols / ratio
            lines.append(
                f"| {ratio:g} | {name} | {rows}x{cols} | {nnz.max() / max(nnz.min(), 1):.1f} "
                f"({q[1] / max(q[0], 1):.1f}) | "
                + ", ".join(f"{b}: {hist[b]}" for b in sorted(hist))
                + f" | {target:.0f} | {kept} | {100 * (kept - target) / target:+.3f} % | "
                f"{bound:g} |")
        pruner.finalize()
    write_lines(Path(args.out).with_suffix(".md"), lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
