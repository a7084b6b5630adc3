"""PSP against its baselines: accuracy against structure sparsity (the shape of the PSP
paper's Fig. 3), one curve per variant, from a sweep of each variant's sparsity knob.

Variants: PSP with weight decay on the alphas (the method), PSP with an L1 penalty on the
alphas, PSP at a fixed sparsity, and L1-norm magnitude pruning (hp.Magnitude). Every point of
a task gets the same training budget (same steps, optimizer, learning-rate schedule, data
order); the fixed and magnitude variants reach their sparsity with a cubic ramp over the first
half of it, the learned variants as their alphas cross the threshold.

Tasks:
  digits          SmallCNN trained from scratch on scikit-learn's digits (CPU, minutes); every
                  point is an ordinary ``hwprune run`` (``hwprune.app.runner.Run`` on a resolved
                  recipe, in ``--runs``/NAME): a single pruning phase of ``epochs`` epochs with
                  the method from the first step, the runner's data split and batch order
  cifar-resnet20  the pretrained akamaster ResNet-20 fine-tuned on CIFAR-10 (CPU, an hour); its
                  own loop: the first ``train_subset`` images and a cosine LR stepped per step
                  within the single epoch, neither of which a recipe expresses

Each finished point is appended to ``OUT.jsonl`` at once (a rerun skips the points already
there, so an interrupted sweep resumes), and ``OUT.md`` / ``OUT.png`` are rewritten from all
points after each one.

    python bench/methods/psp_sweep.py digits --out bench/results/methods/psp/psp_digits
    python bench/methods/psp_sweep.py cifar-resnet20 --out bench/results/methods/psp/psp_resnet20

``--smoke`` (digits only) checks the runner path in seconds: one epoch of 3 steps, seed 0, the
first knob of each variant; point ``--out`` outside bench/results.
"""

from __future__ import annotations

import copy
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from torch import nn

from common import ResultLog, arguments, command, group_sparsity, header, parse, write_table
from hwprune.app.recipe import method_class, method_kwargs, resolve
from hwprune.app.runner import Run
from hwprune.data import augment_cifar, data_dir, load_cifar10
from hwprune.models import SmallCNN, load_pretrained
from hwprune.report.plots import alpha_histograms
from hwprune.training import evaluate, make_loader, recalibrate_batchnorm, train_epoch

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


def method_section(model: nn.Module, variant: str, structure: str, knob: float, steps: int,
                   alpha_lr: float) -> dict:
    """The recipe's ``method`` section of one point (both tasks build their pruner from it)."""
    section: dict = {"structure": structure}
    if structure == "column":
        # columns exist only in convs: every conv but the first (otherwise the default
        # targets: every conv/linear but the first conv and the last linear)
        first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        section["targets"] = [n for n, m in model.named_modules()
                              if isinstance(m, nn.Conv2d) and n != first]
    ramp = {"type": "cubic", "begin": 0, "end": max(steps // 2, 1),
            "every": max(steps // 20, 1)}
    if variant in ("decay", "decay-rel"):
        mode = "relative" if variant == "decay-rel" else "absolute"
        return {"name": "PSP", **section, "alpha_decay": knob, "alpha_lr": alpha_lr,
                "threshold_mode": mode}
    if variant == "l1":
        return {"name": "PSP", **section, "alpha_decay": knob, "variant": "l1",
                "alpha_lr": alpha_lr}
    if variant == "fixed":
        return {"name": "PSP", **section, "alpha_decay": 0.0, "variant": "fixed",
                "sparsity": knob, "schedule": ramp, "alpha_lr": alpha_lr}
    return {"name": "Magnitude", **section, "sparsity": knob, "schedule": ramp, "norm": "l1"}


def make_pruner(model: nn.Module, section: dict):
    return method_class(section["name"])(model, **method_kwargs(section))


def save_alphas(out: Path, pruner, variant: str, structure: str, knob: float) -> None:
    """The alpha distribution PSP's decay produced (the gap below/above the threshold)."""
    alpha_histograms(pruner.layer_extras(),
                     out.parent / f"{out.name}_alphas_{variant}_{structure}_{knob:g}.png")


def digits_recipe(task: Task, seed: int, method: dict | None, name: str, args) -> dict:
    """One digits point as a resolved recipe: ``task.epochs`` epochs of one pruning phase
    (the method from the first step), SGD momentum 0.9, weight decay 5e-4, cosine per epoch."""
    return resolve({
        "name": name, "seed": seed, "model": {"name": "small_cnn"}, "data": {"name": "digits"},
        "method": method,
        "optimizer": {"lr": task.lr, "momentum": 0.9, "weight_decay": 5e-4,
                      "lr_schedule": "cosine"},
        "train": {"prune_epochs": task.epochs, "batch_size": task.batch_size,
                  "steps_per_epoch": 3 if args.smoke else None},
        "end": {"recalibrate_bn": args.recalibrate_bn, "save": False, "report": False,
                "plots": False, "latency": False},
    }, name=name)


def runner_point(task: Task, variant: str, structure: str, knob: float, seed: int, args,
                 out: Path) -> dict:
    """A digits point through ``hwprune.app.runner.Run`` (the dense reference: ``variant``
    "dense", no method)."""
    name = f"{variant}-{structure}-{knob:g}-seed{seed}"
    dense = digits_recipe(task, seed, None, name, args)
    method = None
    if variant != "dense":
        steps = task.epochs * Run(dense).steps_per_epoch()
        method = method_section(SmallCNN(), variant, structure, knob, steps, task.alpha_lr)
    run = Run(digits_recipe(task, seed, method, name, args))
    folder = Path(args.runs) / name
    try:
        summary = run.execute(folder, force=True,
                              command=f"hwprune run {folder / 'recipe.yaml'} --out {folder}")
    finally:
        run.close()
    if variant.startswith("decay") and seed == task.seeds[0]:
        save_alphas(out, run.pruner, variant, structure, knob)
    return {"task": task.name, "structure": structure, "variant": variant, "knob": knob,
            "seed": seed, "sparsity": group_sparsity(run.pruner) if method else 0.0,
            "accuracy": summary["accuracy"], "steps": summary["steps"],
            "seconds": round(summary["seconds"], 1)}


def load_cifar_task(task: Task, root: str | None):
    root = data_dir(root)
    train, test = load_cifar10(root, train=True), load_cifar10(root, train=False)
    train = torch.utils.data.Subset(train, range(task.train_subset))
    return train, test, load_pretrained(root / "weights" / "cifar10-resnet20-akamaster.th")


def loop_point(task, model0, train, test, variant, structure, knob, seed,
               out: Path | None = None, recalibrate: int = 0):
    """A CIFAR point through this script's own loop."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model0)
    loader = make_loader(train, task.batch_size, shuffle=True, seed=seed)
    steps = task.epochs * math.ceil(len(train) / task.batch_size)
    pruner = make_pruner(model, method_section(model, variant, structure, knob, steps,
                                               task.alpha_lr))
    opt = torch.optim.SGD(pruner.param_groups(lr=task.lr, momentum=0.9, weight_decay=5e-4))
    # with one epoch, cosine per step, to zero at the end: learned scales stop moving before
    # the evaluation, so BatchNorm's running statistics have caught up with them
    per_step = task.cosine_per == "step"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps if per_step else task.epochs)
    start = time.perf_counter()
    for _ in range(task.epochs):
        train_epoch(model, loader, opt, pruner, augment=augment_cifar,
                    on_step=sched.step if per_step else None)
        if not per_step:
            sched.step()
    sparsity = group_sparsity(pruner)
    if out is not None and variant.startswith("decay") and seed == task.seeds[0]:
        save_alphas(out, pruner, variant, structure, knob)
    pruner.finalize()
    if recalibrate:  # the same for every variant: fresh BatchNorm statistics of the final model
        recalibrate_batchnorm(model, make_loader(train, task.batch_size, shuffle=True,
                                                 seed=seed + 1), recalibrate)
    accuracy = evaluate(model, make_loader(test, 1000, shuffle=False))
    return {"task": task.name, "structure": structure, "variant": variant, "knob": knob,
            "seed": seed, "sparsity": sparsity, "accuracy": accuracy, "steps": steps,
            "seconds": round(time.perf_counter() - start, 1)}


def write_summary(out: Path, records: list[dict], head: dict) -> None:
    """Markdown table (mean over seeds) and one accuracy-vs-sparsity plot per structure."""
    rows = {}
    for r in records:
        if r["variant"] == "dense":
            continue
        rows.setdefault((r["structure"], r["variant"], r["knob"]), []).append(r)
    dense = [r["accuracy"] for r in records if r["variant"] == "dense"]
    lines = [header(f"PSP sweep: {head['task']}", head["command"], head["machine"]), ""]
    if dense:
        lines += [f"Dense reference accuracy: {100 * sum(dense) / len(dense):.2f} % "
                  f"({len(dense)} run(s)).", ""]
    lines += ["Sparsity: fraction of the targeted groups (channels or im2col columns) that are "
              "entirely zero. Mean over seeds; ± is the spread (max - min) / 2.", ""]
    cells = []
    for (structure, variant, knob), rs in sorted(rows.items()):
        sp = [r["sparsity"] for r in rs]
        acc = [r["accuracy"] for r in rs]
        cells.append([structure, variant, f"{knob:g}", len(rs), f"{100 * sum(sp) / len(sp):.1f}",
                      f"{100 * sum(acc) / len(acc):.2f} ± {50 * (max(acc) - min(acc)):.2f}"])
    write_table(out.with_suffix(".md"), lines,
        ["structure", "variant", "knob", "seeds", "sparsity %", "accuracy %"], "llrrrr", cells)
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
        ax.set_title(f"{head['task']}: {structure}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = arguments(__doc__, "path prefix for .jsonl, .md and .png", data_dir=True)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--runs", default="bench/out/psp_sweep",
                        help="digits: where the run folders go (not committed)")
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:4]), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override the task budget")
    parser.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                        help="re-estimate BatchNorm statistics on this many training batches "
                             "before evaluating (every variant alike)")
    parser.add_argument("--smoke", action="store_true",
                        help="digits: 1 epoch of 3 steps, seed 0, the first knob of each variant")
    args = parse(parser, argv)

    torch.set_num_threads(torch.get_num_threads())
    task = TASKS[args.task]
    if args.smoke:
        if task.name != "digits":
            parser.error("--smoke: digits only")
        task.seeds, task.epochs = [0], 1
        task.knobs = {v: k[:1] for v, k in task.knobs.items()}
    if args.seeds:
        task.seeds = args.seeds
    if args.epochs:
        task.epochs = args.epochs
    out = Path(args.out)
    log = ResultLog(out.with_suffix(".jsonl"),
                    lambda r: (r["structure"], r["variant"], r["knob"], r["seed"]))
    head = {"task": task.name, "command": command(__file__, argv),
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
                       f"budget {task.epochs} epoch(s) of "
                       f"{task.train_subset or 'all'} training images, batch "
                       f"{task.batch_size}, SGD lr {task.lr} (alphas {task.alpha_lr}) momentum "
                       f"0.9, cosine per {task.cosine_per}; BatchNorm statistics "
                       + (f"re-estimated on {args.recalibrate_bn} batches before evaluation"
                          if args.recalibrate_bn else "as trained")
                       + ("; each point an `hwprune run` (runner)" if task.name == "digits"
                          else "")}

    if task.name == "digits":
        def point(variant, structure, knob, seed):
            return runner_point(task, variant, structure, knob, seed, args, out)
    else:
        train, test, model0 = load_cifar_task(task, args.data_dir)

        def point(variant, structure, knob, seed):
            return loop_point(task, model0, train, test, variant, structure, knob, seed, out,
                              args.recalibrate_bn)
    for seed in task.seeds:
        if not log.done("-", "dense", 0.0, seed):
            if task.name == "digits":  # the dense model trained with the same budget
                r = runner_point(task, "dense", "-", 0.0, seed, args, out)
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
                        log.add(point(variant, structure, knob, seed))
                        write_summary(out, log.records, head)
    write_summary(out, log.records, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
