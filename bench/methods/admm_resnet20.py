"""ADMM weight unification and pruning of the pretrained CIFAR-10 ResNet-20, on a CPU.

From the pretrained (akamaster) checkpoint, each configuration runs ``--admm-steps`` ADMM steps
(SGD, constant LR) on a ``--train-subset`` image subset, then ``hard_project()`` and
``--retrain-steps`` steps of retraining with the pattern fixed (cosine LR to 0), and reports
the test accuracy and the stored size of the pruned layers, as ``hp.report`` counts it (the
bytes ``hp.save`` writes: a unified block is one magnitude plus one sign bit per weight, with
2 state bits per block). Configurations: unification only, pruning only, and both.

    nohup python bench/methods/admm_resnet20.py --out bench/results/methods/admm/admm_resnet20 \
        > admm_resnet20.log &

Resumable: finished configurations are skipped (``<out>.jsonl``); ``<out>.md`` is rewritten
after each one.
"""

from __future__ import annotations

import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import ResultLog, arguments, command, cpu_name, header, parse, write_table
from hwprune.data import augment_cifar, data_dir, load_cifar10
from hwprune.models import load_pretrained
from hwprune.targets import resolve_targets
from hwprune.training import evaluate, make_loader, train_epoch

#: (unify, zero) fractions of each layer's blocks
CONFIGS = [(0.5, 0.0), (0.75, 0.0), (0.0, 0.5), (0.0, 0.75), (0.5, 0.25), (0.25, 0.5)]


def steps_loop(model, loader, opt, pruner, steps: int, on_step=None) -> None:
    """``steps`` optimizer steps through the pruner's lifecycle, cycling over the loader."""
    done = 0
    while done < steps:
        sub = _Take(loader, steps - done)
        train_epoch(model, sub, opt, pruner, augment=augment_cifar, on_step=on_step)
        done += len(sub)


class _Take:
    """The first ``n`` batches of a loader (a partial epoch)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, min(n, len(loader))

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                return
            yield batch

    def __len__(self) -> int:
        return self.n


def stored(model, pruner, example) -> dict:
    rep = hp.report(model, example, pruner=pruner)
    rows = [r for r in rep.rows if r.name in pruner.layers]
    dense = sum(r.dense_bytes for r in rows)
    size = sum(r.stored_bytes for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = hp.save(model, Path(tmp) / "m.hwp")
    return {"pruned_layers_dense_bytes": dense, "pruned_layers_stored_bytes": size,
            "bits_per_weight": 8 * size / sum(r.params for r in rows),
            "encodings": sorted({r.encoding for r in rows}),
            "all_weights_stored_bytes": rep.total["stored_bytes"], "saved_file_bytes": file_bytes}


def run(config, args, model_path, train, test) -> dict:
    unify, zero = config
    torch.manual_seed(args.seed)
    model = load_pretrained(model_path)
    loader = make_loader(train, args.batch_size, shuffle=True, seed=args.seed)
    start = time.perf_counter()
    pruner = hp.ADMM(model, block=tuple(args.block), unify=unify, zero=zero, rho=args.rho,
                     rho_growth=args.rho_growth, rho_max=args.rho_max,
                     admm_interval=args.admm_interval)
    opt = torch.optim.SGD(pruner.param_groups(lr=args.lr, momentum=0.9, weight_decay=5e-4))
    steps_loop(model, loader, opt, pruner, args.admm_steps)
    pruner.hard_project()
    after_projection = evaluate(model, make_loader(test, 500, shuffle=False))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.retrain_steps)
    steps_loop(model, loader, opt, pruner, args.retrain_steps, on_step=sched.step)
    extras = pruner.layer_extras()
    history = pruner.history
    pruner.finalize()
    n = sum(math.prod(layer.shape) for layer in pruner.layers.values())
    saved = sum(e["mults_saved"] * math.prod(pruner.layers[k].shape) for k, e in extras.items())
    return {"unify": unify, "zero": zero, "block": "x".join(map(str, args.block)),
            "seed": args.seed, "accuracy": evaluate(model, make_loader(test, 500, shuffle=False)),
            "accuracy_after_projection": after_projection,
            "relative_residual_first": history[0]["relative_residual"] if history else None,
            "relative_residual_last": history[-1]["relative_residual"] if history else None,
            "mults_saved": saved / n, "sparsity": pruner.sparsity(),
            **stored(model, pruner, test[0][0][None]),
            "seconds": round(time.perf_counter() - start, 1)}


def write_summary(out: Path, records: list[dict], head: str) -> None:
    lines, rows = [head, ""], []
    for r in records:
        if r.get("kind") == "dense":
            lines.insert(2, f"Pretrained dense accuracy: {100 * r['accuracy']:.2f} % "
                            f"(pruned layers: {r['pruned_layers_dense_bytes'] / 1024:.1f} KiB "
                            "as float32).\n")
            continue
        rows.append([
            r["unify"], r["zero"], f"{100 * r['accuracy']:.2f}",
            f"{100 * r['accuracy_after_projection']:.2f}",
            f"{r['relative_residual_first']:.3f} → {r['relative_residual_last']:.3f}",
            f"{100 * r['mults_saved']:.1f}",
            f"{r['pruned_layers_stored_bytes'] / 1024:.1f} "
            f"({r['pruned_layers_dense_bytes'] / 1024:.1f})", f"{r['bits_per_weight']:.2f}",
            ", ".join(r["encodings"]), r["seconds"]])
    write_table(out.with_suffix(".md"), lines,
        ["unify", "zero", "accuracy %", "after hard projection %", "residual first → last",
         "mults saved %", "pruned layers stored KiB (dense)", "bits/weight", "encodings",
         "seconds"], "rrrrlrrrlr", rows)


def main(argv=None) -> int:
    parser = arguments(__doc__, threads=1)
    parser.add_argument("--data", default=None, help="data folder (default: HWPRUNE_DATA_DIR)")
    parser.add_argument("--train-subset", type=int, default=10_000)
    parser.add_argument("--test-subset", type=int, default=10_000)
    parser.add_argument("--admm-steps", type=int, default=120)
    parser.add_argument("--retrain-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--block", type=int, nargs=2, default=[1, 4])
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--rho-growth", type=float, default=1.5)
    parser.add_argument("--rho-max", type=float, default=1.0)
    parser.add_argument("--admm-interval", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="run the first N")
    args = parse(parser, argv)
    out = Path(args.out)
    root = data_dir(args.data)
    model_path = root / "weights" / "cifar10-resnet20-akamaster.th"
    train = torch.utils.data.Subset(load_cifar10(root, train=True), range(args.train_subset))
    test = load_cifar10(root, train=False)
    if args.test_subset < len(test):
        test = torch.utils.data.Subset(test, range(args.test_subset))
    log = ResultLog(out.with_suffix(".jsonl"), lambda r: (r.get("unify"), r.get("zero"),
                                                         r.get("block"), r["seed"]))
    head = header(
        "ADMM unification and pruning: CIFAR-10 ResNet-20 (pretrained)", command(__file__, argv),
        f"{cpu_name()}, 2-core CPU ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"shared), torch {torch.__version__}. From the pretrained checkpoint: "
        f"{args.admm_steps} ADMM steps "
        f"(SGD lr {args.lr}, momentum 0.9, wd 5e-4, batch {args.batch_size}, rho {args.rho} "
        f"x{args.rho_growth} per round of {args.admm_interval} steps, cap {args.rho_max}) on "
        f"the first {args.train_subset} training images, hard projection, "
        f"{args.retrain_steps} retraining steps (cosine LR to 0). Blocks {args.block[0]}x"
        f"{args.block[1]} of the im2col matrix; all convs but the first are constrained, the "
        f"classifier stays dense. Test accuracy on {len(test)} test images, seed {args.seed}. "
        "Stored: the pruned layers as hp.save stores them (report's stored bytes); bits/weight "
        "over those layers (float32 dense = 32). Mults saved: share of the pruned layers' "
        "multiplications a unified (m weights: 1 multiplication) or zero block removes.")
    if not log.done(None, None, None, args.seed):
        model = load_pretrained(model_path)
        dense_bytes = sum(4 * getattr(t.module, t.param).numel() for t in resolve_targets(model))
        log.add({"kind": "dense", "seed": args.seed, "pruned_layers_dense_bytes": dense_bytes,
                 "accuracy": evaluate(model, make_loader(test, 500, shuffle=False))})
    for config in CONFIGS[:args.configs]:
        if not log.done(*config, "x".join(map(str, args.block)), args.seed):
            log.add(run(config, args, model_path, train, test))
            write_summary(out, log.records, head)
    write_summary(out, log.records, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
