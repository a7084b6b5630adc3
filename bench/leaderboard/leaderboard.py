"""The leaderboard: every method on pretrained CIFAR-10 ResNet-20 under one equal budget.

Each row is an ordinary ``hwprune run`` (the runner, the recipe schema and the report are
the CLI's own), started from the pretrained checkpoint and given the same training budget:
``--epochs`` epochs over the same ``--train-subset`` images (batch 128, SGD, cosine learning
rate, augmentation), split into a pruning and a fine-tuning phase where the method has one.
Every result is finalized, shrunk (entirely zero channels removed), saved with ``hp.save``
(the stored bytes of the conv and linear weights include the index overhead) and timed at
batch 1 on this CPU against the dense model in the same run. Targets: every conv but the
first (and, for Magnitude/DARB, nothing else: the classifier stays dense).

    python bench/leaderboard/leaderboard.py --out bench/results/leaderboard/leaderboard

Each row's own command (``hwprune run ... --set ...``) is written next to it, so a single row
can be reproduced without this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

from common import arguments, command, header, machine, parse, write_json
from hwprune.app.compare import compare_markdown, compare_plot, load_runs
from hwprune.app.recipe import dump, resolve
from hwprune.app.runner import Run
from hwprune.errors import HwpruneError

PRETRAINED = "weights/cifar10-resnet20-akamaster.th"
CONVS = "layer*"  # the stem conv and the classifier stay dense for every method

#: (row name, method section, fraction of the epochs spent in the pruning phase)
ENTRIES: list[tuple[str, dict, float]] = [
    ("magnitude-element-4x", {"name": "Magnitude", "structure": "element", "sparsity": 0.75,
                              "targets": CONVS}, 0.0),
    ("magnitude-element-8x", {"name": "Magnitude", "structure": "element", "sparsity": 0.875,
                              "targets": CONVS}, 0.0),
    ("magnitude-channel-50", {"name": "Magnitude", "structure": "channel", "sparsity": 0.5,
                              "targets": CONVS}, 0.0),
    ("psp-channel-50", {"name": "PSP", "structure": "channel", "variant": "fixed",
                        "sparsity": 0.5, "targets": CONVS}, 0.5),
    ("dpp-1of4", {"name": "DPP", "structure": "1:4", "logit_lr": 20.0, "anneal_epochs": 2,
                  "targets": CONVS}, 1.0),
    ("dpp-1of8", {"name": "DPP", "structure": "1:8", "logit_lr": 20.0, "anneal_epochs": 2,
                  "targets": CONVS}, 1.0),
    ("admm-zero-4x", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                      "admm_interval": 20, "targets": CONVS}, 0.5),
    ("admm-unify-zero", {"name": "ADMM", "block": [1, 4], "unify": 0.5, "zero": 0.25,
                         "admm_interval": 20, "targets": CONVS}, 0.5),
    ("darb-4x", {"name": "DARB", "ratio": 4.0, "targets": CONVS}, 0.0),
    ("darb-8x", {"name": "DARB", "ratio": 8.0, "targets": CONVS}, 0.0),
]


def recipe(name: str, method: dict, prune_share: float, args) -> dict:
    prune = round(args.epochs * prune_share)
    return resolve({
        "name": name, "seed": args.seed,
        "model": {"name": "resnet20", "pretrained": PRETRAINED},
        "data": {"name": "cifar10", "dir": args.data_dir, "train_subset": args.train_subset,
                 "test_subset": args.test_subset, "augment": True},
        "method": method,
        "optimizer": {"lr": args.lr, "finetune_lr": args.lr},
        "train": {"prune_epochs": prune, "finetune_epochs": args.epochs - prune,
                  "batch_size": 128},
        "end": {"shrink": True, "plots": False},
    }, name=name)


def main(argv=None) -> int:
    parser = arguments(__doc__, "path prefix for the .md/.json/.png", data_dir=True)
    parser.add_argument("--runs", default="bench/out/leaderboard",
                        help="where the run folders go (not committed)")
    parser.add_argument("--train-subset", type=int, default=10_000)
    parser.add_argument("--test-subset", type=int, default=None, help="smoke runs only")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", help="run only these rows")
    args = parse(parser, argv)
    out, runs = Path(args.out), Path(args.runs)
    done = []
    for name, method, share in ENTRIES:
        if args.only and name not in args.only:
            continue
        cfg = recipe(name, method, share, args)
        folder = runs / name
        recipe_file = out.parent / f"{out.name}_recipes" / f"{name}.yaml"  # committed
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(dump(cfg))
        row_command = f"hwprune run {recipe_file} --out {folder}"
        if not (folder / "summary.json").exists():  # finished rows are kept: resumable
            Run(cfg).execute(folder, force=True, command=row_command)
        done.append(folder)
        rows = load_runs(done)
        head = header(
            "Leaderboard: every method on pretrained CIFAR-10 ResNet-20", command(__file__, argv),
            f"{machine()} (shared with other jobs: latencies are only compared within a row). "
            f"Budget, equal for all: {args.epochs} epochs over {args.train_subset} training "
            f"images (batch 128, SGD lr {args.lr}, momentum 0.9, cosine, augmentation), from "
            f"the pretrained checkpoint; test: {args.test_subset or 'the 10,000'} CIFAR-10 test "
            "images. Every conv but the stem is pruned. Stored bytes: the conv and linear "
            "weights of the finalized, shrunk model as `hp.save` stores them, index included "
            "(the whole file, with BatchNorm, biases and header, is `file_bytes` in the JSON); "
            "latency: batch 1, median, against the dense model timed in the same run. Each "
            "row's command is listed below the table "
            f"(the recipes are in `{out.name}_recipes/`).\n\n")
        out.with_suffix(".md").write_text(head + compare_markdown(rows))
        write_json(out.with_suffix(".json"), rows)
        try:
            compare_plot(rows, out.with_suffix(".png"))
        except HwpruneError as e:  # matplotlib missing: the table stands
            print(f"plot skipped: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
