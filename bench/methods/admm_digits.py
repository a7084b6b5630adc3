"""ADMM weight unification and pruning on scikit-learn's digits: accuracy against the fraction
unified and the fraction zeroed for three block shapes, and ADMM pruning against magnitude
pruning at the same structure and sparsity.

A SmallCNN is trained dense for ``--pretrain`` epochs (per seed, shared by every point), then
each point gets the same budget of ``--admm-epochs + --retrain-epochs`` epochs:

* ADMM: ``--admm-epochs`` of ADMM (one round per epoch), ``hard_project()``, then
  ``--retrain-epochs`` of retraining with the pattern fixed (tied magnitudes);
* magnitude (zero-only points): ``hp.Magnitude`` one-shot at the same block structure and the
  same fraction of blocks, fine-tuned for the whole budget.

Targets: every conv and linear weight but the first conv and the last linear layer.

    python bench/methods/admm_digits.py --out bench/results/methods/admm/admm_digits
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import ResultLog, arguments, command, cpu_name, header, parse, write_table
from hwprune.data import load_digits
from hwprune.models import SmallCNN
from hwprune.structures import Block
from hwprune.training import evaluate, make_loader, train_epoch

#: (bh, bw) over the im2col matrix: 4 inputs of a filter, a 4x4 tile, a whole 3x3 kernel
BLOCKS = [(1, 4), (4, 4), (1, 9)]
#: (unify, zero) fractions of each layer's blocks
POINTS = [(0.5, 0.0), (0.75, 0.0), (0.9, 0.0), (0.0, 0.5), (0.0, 0.75), (0.0, 0.9),
          (0.5, 0.25), (0.25, 0.5)]


def pretrained(seed: int, epochs: int, train) -> dict:
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loader = make_loader(train, 64, shuffle=True, seed=seed)
    for _ in range(epochs):
        train_epoch(model, loader, opt)
        sched.step()
    return copy.deepcopy(model.state_dict())


def run(method: str, block, point, seed: int, state: dict, args, train, test) -> dict:
    unify, zero = point
    torch.manual_seed(seed)
    model = SmallCNN()
    model.load_state_dict(state)
    loader = make_loader(train, 64, shuffle=True, seed=seed + 1)
    epochs = args.admm_epochs + args.retrain_epochs
    start = time.perf_counter()
    if method == "admm":
        pruner = hp.ADMM(model, block=block, unify=unify, zero=zero, rho=args.rho,
                         rho_growth=args.rho_growth, admm_interval=len(loader))
    else:
        pruner = hp.Magnitude(model, Block(*block), zero)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.02, momentum=0.9, weight_decay=5e-4))
    for epoch in range(epochs):
        if method == "admm" and epoch == args.admm_epochs:
            pruner.hard_project()
            # the retraining phase gets its own cosine decay
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.retrain_epochs)
        train_epoch(model, loader, opt, pruner)
        if method == "admm" and epoch >= args.admm_epochs:
            sched.step()
    extras = pruner.layer_extras()
    sparsity = pruner.sparsity()
    pruner.finalize()
    rep = hp.report(model, test[0][0][None], pruner=pruner)
    rows = [r for r in rep.rows if r.name in pruner.layers]
    return {"method": method, "block": f"{block[0]}x{block[1]}", "unify": unify, "zero": zero,
            "seed": seed, "accuracy": evaluate(model, make_loader(test, 512, shuffle=False)),
            "sparsity": sparsity,
            "mults_saved": (sum(e["mults_saved"] * r.params for r in rows
                                for e in [extras[r.name]]) / sum(r.params for r in rows)
                            if method == "admm" else sparsity),
            "bits_per_weight": 8 * sum(r.stored_bytes for r in rows) / sum(r.params for r in rows),
            "encodings": sorted({r.encoding for r in rows}),
            "seconds": round(time.perf_counter() - start, 1)}


def write_summary(out: Path, records: list[dict], head: str) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["method"] != "dense":
            groups.setdefault((r["block"], r["unify"], r["zero"], r["method"]), []).append(r)
    dense = [r["accuracy"] for r in records if r["method"] == "dense"]
    lines = [head, ""]
    if dense:
        lines += [f"Dense (pretrained) accuracy: {100 * sum(dense) / len(dense):.2f} % over "
                  f"{len(dense)} seeds.", ""]
    rows = []
    for (block, unify, zero, method), rs in sorted(groups.items()):
        acc = [r["accuracy"] for r in rs]
        rows.append([block, unify, zero, method, len(rs),
                     f"{100 * sum(acc) / len(acc):.2f} ± {50 * (max(acc) - min(acc)):.2f}",
                     f"{100 * rs[0]['mults_saved']:.1f}", f"{rs[0]['bits_per_weight']:.2f}",
                     ", ".join(rs[0]["encodings"])])
    write_table(out.with_suffix(".md"), lines,
        ["block", "unify", "zero", "method", "seeds", "accuracy %", "mults saved %",
         "bits/weight", "encodings"], "lrrlrrrrl", rows)


def main(argv=None) -> int:
    parser = arguments(__doc__, seeds=[0, 1], threads=1)
    parser.add_argument("--pretrain", type=int, default=10)
    parser.add_argument("--admm-epochs", type=int, default=4)
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--rho-growth", type=float, default=1.5)
    args = parse(parser, argv)
    out = Path(args.out)
    log = ResultLog(out.with_suffix(".jsonl"),
                    lambda r: (r["method"], r.get("block"), r.get("unify"), r.get("zero"),
                               r["seed"]))
    head = header(
        "ADMM weight unification and pruning on digits", command(__file__, argv),
        f"{cpu_name()}, 2-core CPU ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"shared), torch {torch.__version__}. SmallCNN trained dense {args.pretrain} epochs, "
        "then per point "
        f"{args.admm_epochs + args.retrain_epochs} epochs (SGD lr 0.02, momentum 0.9, wd 5e-4): "
        f"ADMM {args.admm_epochs} epochs (a round per epoch, rho {args.rho} x{args.rho_growth} "
        f"per round) + {args.retrain_epochs} retraining epochs with the pattern fixed (cosine "
        "LR); magnitude: one-shot at the same blocks and fraction, fine-tuned for the whole "
        "budget. Mean over seeds, ± is (max - min) / 2. Mults saved: share of the constrained "
        "layers' multiplications removed by unified (m weights: 1 multiplication) and zero "
        "blocks. Bits/weight: the constrained layers as hp.save stores them (float32 = 32).")
    train, test = load_digits()
    for seed in args.seeds:
        state = pretrained(seed, args.pretrain, train)
        if not log.done("dense", None, None, None, seed):
            model = SmallCNN()
            model.load_state_dict(state)
            log.add({"method": "dense", "seed": seed,
                     "accuracy": evaluate(model, make_loader(test, 512, shuffle=False))})
        for block in BLOCKS:
            for point in POINTS:
                methods = ("admm", "magnitude") if point[0] == 0 else ("admm",)
                for method in methods:
                    key = (method, f"{block[0]}x{block[1]}", *point, seed)
                    if not log.done(*key):
                        log.add(run(method, block, point, seed, state, args, train, test))
                        write_summary(out, log.records, head)
    write_summary(out, log.records, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
