"""DPP against magnitude pruning at the same pattern and budget, on scikit-learn's digits.

The small CNN is trained from scratch for ``--epochs`` epochs either way:

* DPP learns its k-of-n masks with the weights from the first step (its temperature anneals
  over the run);
* the magnitude baseline trains dense for the first half, prunes one-shot with the same
  pattern (``hp.Magnitude``: k:n tiles; for DPP's per-neuron "weight" rows, element pruning at
  the same sparsity, which is *less* constrained, so an upper bound for magnitude), and
  fine-tunes for the second half.

Targets: every conv and linear weight but the first conv and the last linear layer.

    python bench/methods/dpp_digits.py --out bench/results/methods/dpp/dpp_digits
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import ResultLog, arguments, command, header, machine, parse, write_table
from hwprune.data import load_digits
from hwprune.models import SmallCNN
from hwprune.training import evaluate, make_loader, train_epoch

#: (DPP structure, k, the magnitude baseline's structure, its sparsity)
PATTERNS = [
    ("2:4", None, "2:4", None),
    ("1:4", None, "1:4", None),
    ("2:8", None, "2:8", None),
    ("1:8", None, "1:8", None),
    ("weight", 0.5, "element", 0.5),
    ("weight", 0.25, "element", 0.75),
    ("weight", 0.1, "element", 0.9),
]


def run(method: str, pattern: tuple, seed: int, epochs: int, train, test,
        logit_lr: float | None) -> dict:
    dpp_structure, k, mag_structure, sparsity = pattern
    torch.manual_seed(seed)
    model = SmallCNN()
    loader = make_loader(train, 64, shuffle=True, seed=seed)
    start = time.perf_counter()
    if method == "dpp":
        pruner = hp.DPP(model, dpp_structure, k=k, anneal_epochs=epochs, seed=seed,
                        logit_lr=logit_lr)
        opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9, weight_decay=5e-4))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs):
            train_epoch(model, loader, opt, pruner)
            sched.step()
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs // 2):
            train_epoch(model, loader, opt)
            sched.step()
        pruner = hp.Magnitude(model, mag_structure, sparsity)
        # the same optimizer and schedule continue over the same parameters
        for _ in range(epochs - epochs // 2):
            train_epoch(model, loader, opt, pruner)
            sched.step()
    extras = pruner.layer_extras()
    sparsity_now = pruner.sparsity()
    pruner.finalize()
    label = method if method != "dpp" or logit_lr is None else f"dpp lr={logit_lr:g}"
    return {"method": label, "pattern": f"{dpp_structure}" + (f" k={k}" if k else ""),
            "baseline_structure": mag_structure, "seed": seed, "sparsity": sparsity_now,
            "accuracy": evaluate(model, make_loader(test, 512, shuffle=False)),
            "confidence": _mean(extras, "confidence"), "diversity": _mean(extras, "diversity"),
            "seconds": round(time.perf_counter() - start, 1)}


def _mean(extras: dict, key: str) -> float | None:
    values = [e[key] for e in extras.values() if key in e]
    return sum(values) / len(values) if values else None


def write_summary(out: Path, records: list[dict], head: str) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["pattern"], r["method"]), []).append(r)
    rows = []
    first = {}  # rows of one pattern together, in the order the patterns were run
    for pattern, _ in groups:
        first.setdefault(pattern, len(first))
    for (pattern, method), rs in sorted(groups.items(), key=lambda g: first[g[0][0]]):
        acc = [r["accuracy"] for r in rs]
        conf = [r["confidence"] for r in rs if r["confidence"] is not None]
        div = [r["diversity"] for r in rs if r["diversity"] is not None]
        name = method if method.startswith("dpp") else f"magnitude ({rs[0]['baseline_structure']})"
        rows.append([pattern, name, len(rs), f"{100 * rs[0]['sparsity']:.1f}",
                     f"{100 * sum(acc) / len(acc):.2f} ± {50 * (max(acc) - min(acc)):.2f}",
                     *((f"{sum(conf) / len(conf):.3f}", f"{sum(div) / len(div):.3f}") if conf
                       else ("-", "-"))])
    write_table(out.with_suffix(".md"), [head, ""],
                ["pattern", "method", "seeds", "sparsity %", "accuracy %", "DPP confidence",
                 "DPP diversity"], "llrrrrr", rows)


def _optional_float(text: str) -> float | None:
    return None if text == "default" else float(text)


def main(argv=None) -> int:
    parser = arguments(__doc__, seeds=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--logit-lr", type=_optional_float, nargs="+", default=[None],
                        help="DPP logit learning rates to run ('default': the optimizer's)")
    args = parse(parser, argv)
    out = Path(args.out)
    log = ResultLog(out.with_suffix(".jsonl"), lambda r: (r["pattern"], r["method"], r["seed"]))
    head = header("DPP against magnitude pruning on digits", command(__file__, argv),
                  f"{machine()}. Budget: "
                  f"{args.epochs} epochs from scratch for both (magnitude: dense half, one-shot "
                  "prune, fine-tuned half), SGD lr 0.05 momentum 0.9; `dpp` trains its logits at "
                  "that lr, `dpp lr=X` at lr X (the confidence column shows whether they moved "
                  "from their initial value). "
                  "Mean over seeds; ± is (max - min) / 2. Sparsity: "
                  "fraction of the targeted weights removed.")
    train, test = load_digits()
    for pattern in PATTERNS:
        name = f"{pattern[0]}" + (f" k={pattern[1]}" if pattern[1] else "")
        runs = [("dpp", lr) for lr in args.logit_lr] + [("magnitude", None)]
        for method, lr in runs:
            label = method if lr is None else f"dpp lr={lr:g}"
            for seed in args.seeds:
                if not log.done(name, label, seed):
                    log.add(run(method, pattern, seed, args.epochs, train, test, lr))
                    write_summary(out, log.records, head)
    write_summary(out, log.records, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
