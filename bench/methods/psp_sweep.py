"""PSP against its baselines: accuracy against structure sparsity (the shape of the PSP
paper's Fig. 3), one curve per variant, from a sweep of each variant's sparsity knob.

Variants: PSP with weight decay on the alphas (the method), PSP with an L1 penalty on the
alphas, PSP at a fixed sparsity, and L1-norm magnitude pruning (hp.Magnitude). Every point of
a task gets the same training budget (same steps, optimizer, learning-rate schedule, data
order); the fixed and magnitude variants reach their sparsity with a cubic ramp over the first
half of it, the learned variants as their alphas cross the threshold.

Tasks:
  digits          SmallCNN trained from scratch on scikit-learn's digits (CPU, minutes)
  cifar-resnet20  the pretrained akamaster ResNet-20 fine-tuned on CIFAR-10 (CPU, an hour)

Each finished point is appended to ``OUT.jsonl`` at once (a rerun skips the points already
there, so an interrupted sweep resumes), and ``OUT.md`` / ``OUT.png`` are rewritten from all
points after each one.

    python bench/psp_sweep.py digits --out bench/results/psp_digits
    python bench/psp_sweep.py cifar-resnet20 --out bench/results/psp_resnet20
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import hwprune as hp
from hwprune.data import augment_cifar, data_dir, load_cifar10, load_digits
from hwprune.models import SmallCNN, load_pretrained
from hwprune.report.plots import alpha_histograms
from hwprune.schedules import Cubic
from hwprune.training import evaluate, make_loader, recalibrate_batchnorm, train_epoch
from results_log import ResultLog

# decay-rel: the method with the scale-free threshold (|alpha| < eps * the layer's max |alpha|)
VARIANTS = ("decay", "l1", "fixed", "magnitude", "decay-rel")
STRUCTURES = ("channel", "column")


@dataclass
class Task:
    name: str
    epochs: int
    lr: float
    batch_size: int
    alpha_lr: float
    knobs: dict[str, list[float]]  # variant -> values of its sparsity knob
    seeds: list[int]
    train_subset: int | None = None  # train on the first N images only
    cosine_per: str = "epoch"  # the cosine LR schedule steps per "epoch" or per "step"


TASKS = {
    # alpha_lr > lr: the alphas must cross the threshold within a short budget
    "digits": Task("digits", epochs=15, lr=0.05, batch_size=64, alpha_lr=0.1,
                   knobs={"decay": [0.02, 0.04, 0.08, 0.16, 0.32],
                          "decay-rel": [0.02, 0.04, 0.08, 0.16, 0.32],
                          "l1": [0.0075, 0.01, 0.015, 0.02, 0.04],
                          "fixed": [0.25, 0.5, 0.75, 0.9, 0.95],
                          "magnitude": [0.25, 0.5, 0.75, 0.9, 0.95]},
                   seeds=[0, 1, 2]),
    # a 20,000-image subset, one pass (156 steps): what fits a CPU session for 12 points
    "cifar-resnet20": Task("cifar-resnet20", epochs=1, lr=0.01, batch_size=128, alpha_lr=0.02,
                           knobs={"decay": [0.2, 0.4, 0.8], "decay-rel": [0.2, 0.4, 0.8],
                                  "l1": [0.05, 0.1, 0.2],
                                  "fixed": [0.3, 0.5, 0.7], "magnitude": [0.3, 0.5, 0.7]},
                           seeds=[0], train_subset=20_000, cosine_per="step"),
}


def make_pruner(model: nn.Module, variant: str, structure: str, knob: float, steps: int,
                alpha_lr: float):
    targets = None  # the default: every conv/linear but the first conv and the last linear
    if structure == "column":
        # columns exist only in convs: every conv but the first
        first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        targets = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and n != first]
    ramp = Cubic(0, max(steps // 2, 1), every=max(steps // 20, 1))
    if variant in ("decay", "decay-rel"):
        mode = "relative" if variant == "decay-rel" else "absolute"
        return hp.PSP(model, structure, alpha_decay=knob, alpha_lr=alpha_lr, targets=targets,
                      threshold_mode=mode)
    if variant == "l1":
        return hp.PSP(model, structure, alpha_decay=knob, variant="l1", alpha_lr=alpha_lr,
                      targets=targets)
    if variant == "fixed":
        return hp.PSP(model, structure, alpha_decay=0.0, variant="fixed", sparsity=knob,
                      schedule=ramp, alpha_lr=alpha_lr, targets=targets)
    return hp.Magnitude(model, structure, knob, schedule=ramp, norm="l1", targets=targets)


def structure_sparsity(pruner) -> float:
    """Fraction of the targeted groups (columns / channels) that are entirely zero."""
    removed = total = 0
    for name, mask in pruner.masks().items():
        kept = pruner.layers[name].structure.to_groups(mask.float()).amax(1) > 0
        removed += int((~kept).sum())
        total += kept.numel()
    return removed / total


def load_task_data(task: Task, root: str | None):
    if task.name == "digits":
        train, test = load_digits()
    else:
        root = data_dir(root)
        train, test = load_cifar10(root, train=True), load_cifar10(root, train=False)
    if task.train_subset:
        train = torch.utils.data.Subset(train, range(task.train_subset))
    return train, test, augment_cifar if task.name != "digits" else None


def base_model(task: Task, root: str | None) -> nn.Module:
    if task.name == "digits":
        return SmallCNN()
    return load_pretrained(data_dir(root) / "weights" / "cifar10-resnet20-akamaster.th")


def run_point(task, model0, train, test, augment, variant, structure, knob, seed,
              out: Path | None = None, recalibrate: int = 0):
    torch.manual_seed(seed)
    model = copy.deepcopy(model0)
    loader = make_loader(train, task.batch_size, shuffle=True, seed=seed)
    steps = task.epochs * math.ceil(len(train) / task.batch_size)
    pruner = make_pruner(model, variant, structure, knob, steps, task.alpha_lr)
    opt = torch.optim.SGD(pruner.param_groups(lr=task.lr, momentum=0.9, weight_decay=5e-4))
    # with one epoch, cosine per step, to zero at the end: learned scales stop moving before
    # the evaluation, so BatchNorm's running statistics have caught up with them
    per_step = task.cosine_per == "step"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps if per_step else task.epochs)
    start = time.perf_counter()
    for _ in range(task.epochs):
        train_epoch(model, loader, opt, pruner, augment=augment,
                    on_step=sched.step if per_step else None)
        if not per_step:
            sched.step()
    sparsity = structure_sparsity(pruner)
    if out is not None and variant.startswith("decay") and seed == task.seeds[0]:
        # the alpha distribution PSP's decay produced (the gap below/above the threshold)
        alpha_histograms(pruner.layer_extras(),
                         out.parent / f"{out.name}_alphas_{variant}_{structure}_{knob:g}.png")
    pruner.finalize()
    if recalibrate:  # the same for every variant: fresh BatchNorm statistics of the final model
        recalibrate_batchnorm(model, make_loader(train, task.batch_size, shuffle=True,
                                                 seed=seed + 1), recalibrate)
    accuracy = evaluate(model, make_loader(test, 1000, shuffle=False))
    return {"task": task.name, "structure": structure, "variant": variant, "knob": knob,
            "seed": seed, "sparsity": sparsity, "accuracy": accuracy, "steps": steps,
            "seconds": round(time.perf_counter() - start, 1)}


def write_summary(out: Path, records: list[dict], header: dict) -> None:
    """Markdown table (mean over seeds) and one accuracy-vs-sparsity plot per structure."""
    rows = {}
    for r in records:
        if r["variant"] == "dense":
            continue
        rows.setdefault((r["structure"], r["variant"], r["knob"]), []).append(r)
    dense = [r["accuracy"] for r in records if r["variant"] == "dense"]
    lines = [f"# PSP sweep: {header['task']}", "", f"Command: `{header['command']}`", "",
             f"Machine: {header['machine']}", ""]
    if dense:
        lines += [f"Dense reference accuracy: {100 * sum(dense) / len(dense):.2f} % "
                  f"({len(dense)} run(s)).", ""]
    lines += ["Sparsity: fraction of the targeted groups (channels or im2col columns) that are "
              "entirely zero. Mean over seeds; ± is the spread (max - min) / 2.", "",
              "| structure | variant | knob | seeds | sparsity % | accuracy % |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for (structure, variant, knob), rs in sorted(rows.items()):
        sp = [r["sparsity"] for r in rs]
        acc = [r["accuracy"] for r in rs]
        lines.append(f"| {structure} | {variant} | {knob:g} | {len(rs)} | "
                     f"{100 * sum(sp) / len(sp):.1f} | {100 * sum(acc) / len(acc):.2f} "
                     f"± {50 * (max(acc) - min(acc)):.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    structures = sorted({s for s, _, _ in rows})
    fig, axes = plt.subplots(1, len(structures), figsize=(5.5 * len(structures), 4), squeeze=False)
    for ax, structure in zip(axes[0], structures, strict=True):
        for variant in VARIANTS:
            pts = sorted((sum(r["sparsity"] for r in rs) / len(rs),
                          sum(r["accuracy"] for r in rs) / len(rs))
                         for (s, v, _), rs in rows.items() if s == structure and v == variant)
            if pts:
                ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "o-",
                        label=variant if variant != "magnitude" else "L1-norm magnitude")
        if dense:
            ax.axhline(100 * sum(dense) / len(dense), color="gray", ls="--", label="dense")
        ax.set_xlabel(f"{structure} sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{header['task']}: {structure}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--out", required=True, help="path prefix for .jsonl, .md and .png")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:4]), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override the task budget")
    parser.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                        help="re-estimate BatchNorm statistics on this many training batches "
                             "before evaluating (every variant alike)")
    args = parser.parse_args(argv)

    torch.set_num_threads(torch.get_num_threads())
    task = TASKS[args.task]
    if args.seeds:
        task.seeds = args.seeds
    if args.epochs:
        task.epochs = args.epochs
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out.with_suffix(".jsonl"),
                    lambda r: (r["structure"], r["variant"], r["knob"], r["seed"]))
    header = {"task": task.name,
              "command": "python bench/psp_sweep.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
                         f"budget {task.epochs} epoch(s) of "
                         f"{task.train_subset or 'all'} training images, batch "
                         f"{task.batch_size}, SGD lr {task.lr} (alphas {task.alpha_lr}) momentum "
                         f"0.9, cosine per {task.cosine_per}; BatchNorm statistics "
                         + (f"re-estimated on {args.recalibrate_bn} batches before evaluation"
                            if args.recalibrate_bn else "as trained")}

    train, test, augment = load_task_data(task, args.data_dir)
    model0 = base_model(task, args.data_dir)
    for seed in task.seeds:
        if not log.done("-", "dense", 0.0, seed):
            if task.name == "digits":  # the dense model trained with the same budget
                r = run_point(task, model0, train, test, augment, "magnitude", "channel", 0.0,
                              seed)
            else:  # the pretrained checkpoint as it is
                r = {"task": task.name, "accuracy": evaluate(model0, make_loader(test, 1000,
                     shuffle=False)), "sparsity": 0.0, "seed": seed}
            r.update(structure="-", variant="dense", knob=0.0)
            log.add(r)
    for structure in args.structures:
        for variant in args.variants:
            for knob in task.knobs[variant]:
                for seed in task.seeds:
                    if not log.done(structure, variant, knob, seed):
                        log.add(run_point(task, model0, train, test, augment, variant,
                                          structure, knob, seed, out, args.recalibrate_bn))
                        write_summary(out, log.records, header)
    write_summary(out, log.records, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
