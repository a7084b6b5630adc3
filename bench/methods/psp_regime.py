"""PSP in its regime: weight decay on the alphas of the usual size, the alphas at the weights'
learning rate, absolute and relative thresholds, against L1-norm magnitude pruning and PSP at a
fixed sparsity, all at one equal budget from the pretrained CIFAR-10 ResNet-20.

Every row is an ordinary ``hwprune run`` (``hwprune.app.runner.Run`` on a resolved recipe,
one pruning phase from the first step, SGD momentum 0.9, weight decay 5e-4, cosine learning
rate per epoch, crop + flip augmentation) with a watcher on the runner's ``on_step`` hook that
records, at a few steps, the distribution of the PSP alphas (pooled over layers, both
``|alpha|`` and ``|alpha| / the layer's max |alpha|``, as histogram counts) and, at the last
step, the column or channel sparsity of the masks.

Rows per structure (``column``: im2col columns, ``channel``: input channels; every conv but
the stem in both):

  psp-<mode>-<decay>   PSP ``variant="decay"`` with ``alpha_decay`` = decay and
                       ``threshold_mode`` = mode (``absolute``: |a| < eps; ``relative``:
                       |a| < eps * the layer's max |a|; ``off``: no thresholding at all, the
                       alphas' free evolution, for the histograms)
  magnitude-<s>        ``hp.Magnitude(norm="l1")`` at sparsity s (cubic ramp over the first
                       half of the steps)
  fixed-<s>            PSP ``variant="fixed"`` at sparsity s (same ramp; alpha decay 1e-3)
  dense                no method: what the budget alone does to the pretrained model

Each finished row is appended to ``OUT.jsonl`` at once (a rerun skips the rows already
there); ``OUT.md``, ``OUT.json``, ``OUT.png`` and ``OUT_alphas_<structure>.png`` are
rewritten after every row.

    python bench/methods/psp_regime.py --out bench/results/methods/psp_regime
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

from common import (
    ResultLog,
    arguments,
    command,
    group_sparsity,
    header,
    machine,
    parse,
    write_json,
    write_table,
)
from hwprune.app.recipe import dump, resolve
from hwprune.app.runner import Run

PRETRAINED = "weights/cifar10-resnet20-akamaster.th"
CONVS = "layer*"  # every conv but the stem: the only layers with columns
REL_BINS = (-3.0, 0.0, 30)  # log10(|a| / layer max): lower edge, upper edge, bins
ABS_BINS = (-4.0, 0.5, 36)  # log10 |a|


def psp_section(structure: str, mode: str, decay: float, eps: dict[str, float]) -> dict:
    section = {"name": "PSP", "structure": structure, "targets": CONVS, "variant": "decay",
               "alpha_decay": decay}
    if mode == "off":  # never threshold: the alphas evolve freely (a probe of the histograms)
        return {**section, "threshold_start": 10**9}
    return {**section, "threshold_mode": mode, "threshold": eps[mode]}


def ramp(steps: int) -> dict:
    return {"type": "cubic", "begin": 0, "end": max(steps // 2, 1), "every": max(steps // 20, 1)}


def rows(args, steps: int) -> list[tuple[str, str, dict | None]]:
    """(structure, row name, method section) in the order they run: per structure, two PSP
    rows, then two baseline rows, and so on (so an early stop leaves a comparable set)."""
    eps = {"absolute": args.eps_absolute, "relative": args.eps_relative}
    out: list[tuple[str, str, dict | None]] = []
    if "dense" in args.baselines:
        out.append(("-", "dense", None))
    for structure in args.structures:
        psp = [(structure, f"psp-{mode}-{decay:g}", psp_section(structure, mode, decay, eps))
               for decay in args.decays for mode in args.modes
               if mode != "absolute" or decay in args.absolute_decays]
        base = []
        for s in args.sparsities:
            if "magnitude" in args.baselines:
                base.append((structure, f"magnitude-{s:g}",
                             {"name": "Magnitude", "structure": structure, "targets": CONVS,
                              "norm": "l1", "sparsity": s, "schedule": ramp(steps)}))
            if "fixed" in args.baselines:
                base.append((structure, f"fixed-{s:g}",
                             {"name": "PSP", "structure": structure, "targets": CONVS,
                              "variant": "fixed", "alpha_decay": 1e-3, "sparsity": s,
                              "schedule": ramp(steps)}))
        while psp or base:
            out += psp[:2] + base[:2]
            psp, base = psp[2:], base[2:]
    return out


def recipe(name: str, method: dict | None, args) -> dict:
    return resolve({
        "name": name, "seed": args.seed,
        "model": {"name": "resnet20", "pretrained": PRETRAINED},
        "data": {"name": "cifar10", "dir": args.data_dir, "train_subset": args.train_subset,
                 "test_subset": args.test_subset, "augment": True},
        "method": method,
        "optimizer": {"lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4,
                      "lr_schedule": args.lr_schedule, "finetune_lr": args.finetune_lr},
        # no phase hook: the sweep follows the alphas through both phases (its committed
        # results ran so, before fix_pattern() was the runner's default)
        "train": {"prune_epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
                  "batch_size": args.batch_size, "phase_hook": None},
        "end": {"save": False, "report": False, "plots": False, "latency": False},
    }, name=name)


def histogram(values: torch.Tensor, bins: tuple[float, float, int]) -> list[int]:
    lo, hi, n = bins
    logs = values.clamp_min(10 ** lo).log10().clamp(lo, hi)
    return torch.histc(logs, bins=n, min=lo, max=hi).long().tolist()


class Watcher:
    """The runner's ``on_step`` hook: alpha snapshots at ``at``, group sparsity at ``last``."""

    def __init__(self, at: set[int], last: int):
        self.at, self.last, self.run = at, last, None
        self.snapshots: list[dict] = []
        self.sparsity = 0.0

    def __call__(self, step: int) -> None:
        pruner = self.run.pruner
        if pruner is None:
            return
        if step in self.at and hasattr(pruner, "alphas"):
            self.snapshots.append(alpha_snapshot(pruner, step))
        if step == self.last:
            self.sparsity = group_sparsity(pruner)


def alpha_snapshot(pruner, step: int) -> dict:
    """Pooled over layers: histograms of |a| and |a| / layer max, and the fractions under the
    usual thresholds (what decides the absolute and the relative rule)."""
    absolute, relative = [], []
    for a in pruner.alphas().values():
        a = a.abs().float().flatten()
        absolute.append(a)
        relative.append(a / a.max().clamp_min(1e-30))
    absolute, relative = torch.cat(absolute), torch.cat(relative)
    return {"step": step, "abs_hist": histogram(absolute, ABS_BINS),
            "rel_hist": histogram(relative, REL_BINS),
            "abs_median": absolute.median().item(), "abs_max": absolute.max().item(),
            "abs_under_0.01": (absolute < 0.01).float().mean().item(),
            **{f"rel_under_{e:g}": (relative < e).float().mean().item()
               for e in (0.01, 0.05, 0.1, 0.2)}}


def run_row(structure: str, name: str, method: dict | None, args, at: set[int]) -> dict:
    cfg = recipe(name, method, args)
    folder = Path(args.runs) / f"{structure}-{name}"
    watcher = Watcher(set(at), 0)
    run = Run(cfg, on_step=watcher)
    steps = (args.epochs + args.finetune_epochs) * run.loop.plan.steps_per_epoch()
    watcher.run, watcher.last = run, steps
    watcher.at.add(steps)
    try:
        summary = run.execute(folder, force=True,
                              command=f"hwprune run {folder / 'recipe.yaml'} --out {folder}")
    finally:
        run.close()
    return {"structure": structure, "row": name, "method": method, "steps": steps,
            "sparsity": watcher.sparsity, "accuracy": summary["accuracy"],
            "pretrained_accuracy": summary["dense_accuracy"],
            "seconds": summary["seconds"], "snapshots": watcher.snapshots,
            "history": [{k: h[k] for k in ("epoch", "lr", "train_loss", "test_accuracy",
                                           "sparsity")} for h in run.history]}


def kind(row: str) -> str:
    """The plot's series of a row: 'psp-relative', 'magnitude', ..."""
    return row.rsplit("-", 1)[0] if row.startswith("psp-") else row.split("-")[0]


def min_rel(record: dict) -> float:
    """Upper edge of the lowest non-empty bin of |a| / layer max, over all snapshots."""
    lo, hi, n = REL_BINS
    first = min(next(i for i, c in enumerate(s["rel_hist"]) if c) for s in record["snapshots"])
    return 10 ** (lo + (hi - lo) * (first + 1) / n)


def write_summary(out: Path, records: list[dict], head: str) -> None:
    cells = []
    for r in records:
        last = r["snapshots"][-1] if r["snapshots"] else {}
        cells.append([r["structure"], r["row"], r["steps"], f"{100 * r['sparsity']:.1f}",
                      f"{100 * r['accuracy']:.2f}",
                      f"{last['abs_median']:.3g}" if last else "-",
                      f"{100 * last['rel_under_0.05']:.1f}" if last else "-",
                      f"{100 * min_rel(r):.3g}" if last else "-",
                      f"{100 * last['abs_under_0.01']:.1f}" if last else "-",
                      f"{r['seconds']:.0f}"])
    notes = ["The alpha columns (PSP rows) describe the alphas at the last step: the median "
             "abs(alpha) over all groups; the groups a relative threshold of 5 % would cut; "
             "the smallest abs(alpha) / layer max over all snapshots (the lowest histogram "
             "bin it falls in, so an upper bound); and the groups an absolute threshold of "
             "0.01 would cut. `alphas` figure: `" + out.name + "_alphas_<structure>.png`.", ""]
    write_table(out.with_suffix(".md"), [head, "", *notes],
                ["structure", "row", "steps", "group sparsity %", "accuracy %",
                 "median abs(alpha)", "under 5 % of layer max, %", "min abs(alpha)/max, %",
                 "under 0.01 (absolute), %", "seconds"],
                "llrrrrrrrr", cells)
    write_json(out.with_suffix(".json"), records)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plot_accuracy(plt, out, records)
    for structure in sorted({r["structure"] for r in records if r["snapshots"]}):
        plot_alphas(plt, out, structure, [r for r in records
                                          if r["structure"] == structure and r["snapshots"]
                                          and r["row"].startswith("psp-")])


def plot_accuracy(plt, out: Path, records: list[dict]) -> None:
    structures = sorted({r["structure"] for r in records} - {"-"})
    if not structures:
        return
    fig, axes = plt.subplots(1, len(structures), figsize=(6 * len(structures), 4.5),
                             squeeze=False)
    dense = [r for r in records if r["row"] == "dense"]
    for ax, structure in zip(axes[0], structures, strict=True):
        mine = [r for r in records if r["structure"] == structure]
        for series in sorted({kind(r["row"]) for r in mine}):
            pts = sorted((100 * r["sparsity"], 100 * r["accuracy"], r["row"].rsplit("-", 1)[1])
                         for r in mine if kind(r["row"]) == series)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o",
                    label="L1-norm magnitude" if series == "magnitude" else series)
            if series.startswith("psp-"):  # label each point with its alpha decay
                for x, y, label in pts:
                    ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        ax.axhline(100 * mine[0]["pretrained_accuracy"], color="gray", ls=":",
                   label="pretrained")
        if dense:
            ax.axhline(100 * dense[0]["accuracy"], color="gray", ls="--",
                       label="dense, same budget")
        ax.set_xlabel(f"{structure} sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"ResNet-20 CIFAR-10: {structure}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def plot_alphas(plt, out: Path, structure: str, records: list[dict]) -> None:
    """One row of panels per PSP setting, one column per snapshot: log10(|a| / layer max)
    (blue) and log10 |a| (orange, step line)."""
    if not records:
        return
    cols = max(len(r["snapshots"]) for r in records)
    fig, axes = plt.subplots(len(records), cols, figsize=(2.6 * cols, 1.7 * len(records)),
                             squeeze=False, sharex=True)
    for axrow, r in zip(axes, records, strict=True):
        for ax, snap in zip(axrow, r["snapshots"], strict=False):
            for key, bins, color, style in (("rel_hist", REL_BINS, "tab:blue", "bar"),
                                            ("abs_hist", ABS_BINS, "tab:orange", "step")):
                lo, hi, n = bins
                edges = [lo + (hi - lo) * i / n for i in range(n + 1)]
                ax.hist(edges[:-1], bins=edges, weights=snap[key], color=color,
                        histtype=style, alpha=0.7 if style == "bar" else 1.0)
            ax.axvline(math.log10(0.05), color="tab:blue", ls="--", lw=0.8)
            ax.axvline(-2.0, color="tab:orange", ls="--", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{r['row']}, step {snap['step']}", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in axrow[len(r["snapshots"]):]:
            ax.set_visible(False)
    fig.supxlabel("log10 |alpha| / layer max (blue; dashed: relative eps 0.05), log10 |alpha| "
                  "(orange; dashed: absolute eps 0.01)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_alphas_{structure}.png", dpi=100)
    plt.close(fig)


def merge(out: Path, logs: list[Path], head: str) -> int:
    """The summary of sweeps that ran in parallel (each with its own ``--out``): their records
    into ``OUT.jsonl``, their commands (the first line of each one's .md) into the header."""
    records, commands = [], []
    for log in logs:
        records += ResultLog(log, lambda r: r["row"]).records
        md = log.with_suffix(".md").read_text().splitlines()
        commands += [line for line in md if line.startswith("Command:")][:1]
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    head = head.split("\n\nMachine:")[1].strip()
    write_summary(out, records, "# PSP in its regime: pretrained ResNet-20 on CIFAR-10\n\n"
                  "The rows ran as these commands, in parallel:\n\n"
                  + "\n".join(f"- {c.removeprefix('Command: ')}" for c in commands)
                  + f"\n\nMachine: {head}")
    return 0


def main(argv=None) -> int:
    parser = arguments(__doc__, "path prefix for .jsonl, .md, .json and .png", data_dir=True)
    parser.add_argument("--runs", default="bench/out/psp_regime",
                        help="where the run folders go (not committed)")
    parser.add_argument("--structures", nargs="+", default=["column", "channel"],
                        choices=["column", "channel"])
    parser.add_argument("--decays", nargs="*", type=float, default=[1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--modes", nargs="+", default=["relative", "absolute"],
                        choices=["relative", "absolute", "off"])
    parser.add_argument("--absolute-decays", nargs="+", type=float, default=[1e-2],
                        help="the decays that also get an absolute-threshold row (below "
                             "them, no alpha can reach eps within the budget: see the "
                             "snapshots' abs_under_0.01 of the relative rows)")
    parser.add_argument("--eps-absolute", type=float, default=1e-2)
    parser.add_argument("--eps-relative", type=float, default=5e-2)
    parser.add_argument("--baselines", nargs="*", default=["dense", "magnitude", "fixed"],
                        choices=["dense", "magnitude", "fixed"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--train-subset", type=int, default=6400)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="the pruning phase")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05,
                        help="the weights' learning rate, and the alphas' (as in the paper)")
    parser.add_argument("--lr-schedule", default="constant", choices=["cosine", "constant"],
                        help="per phase, per epoch")
    parser.add_argument("--finetune-epochs", type=int, default=1,
                        help="a second phase at --finetune-lr (every method keeps training in "
                             "it: PSP's alphas and thresholds too)")
    parser.add_argument("--finetune-lr", type=float, default=0.005)
    parser.add_argument("--snapshots", type=int, default=4,
                        help="alpha snapshots per run, evenly spaced (the last at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", nargs="+", metavar="JSONL",
                        help="run nothing: write OUT's summary from these sweeps' logs (the "
                             "same budget arguments as theirs)")
    parser.add_argument("--threads", type=int, default=1)
    args = parse(parser, argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    steps = args.epochs * math.ceil(args.train_subset / args.batch_size)  # the pruning phase
    at = {round(steps * (i + 1) / args.snapshots) for i in range(args.snapshots)}
    head = header(
        "PSP in its regime: pretrained ResNet-20 on CIFAR-10", command(__file__, argv),
        f"{machine()}, {args.threads} thread(s). Budget, equal for every row: "
        f"{args.epochs} + {args.finetune_epochs} epochs over {args.train_subset} training "
        f"images (seeded subset), batch {args.batch_size}: {steps} SGD steps at lr {args.lr} "
        f"(weights and alphas alike), then {args.finetune_epochs} epoch(s) at lr "
        f"{args.finetune_lr} ({args.lr_schedule} within each phase; the method keeps "
        "training in both), momentum 0.9, weight decay 5e-4, augmentation; test: "
        f"{args.test_subset} CIFAR-10 test images. Thresholds: absolute eps "
        f"{args.eps_absolute:g}, relative eps {args.eps_relative:g} of the layer's max "
        "|alpha|. Group sparsity: fraction of the targeted columns / input channels (every "
        "conv but the stem) that are entirely zero. Each row is an `hwprune run`.")
    if args.merge:
        return merge(out, [Path(p) for p in args.merge], head)
    log = ResultLog(out.with_suffix(".jsonl"), lambda r: (r["structure"], r["row"]))
    for structure, name, method in rows(args, steps):
        if not log.done(structure, name):
            log.add(run_row(structure, name, method, args, at))
            write_summary(out, log.records, head)
    if log.records:
        write_summary(out, log.records, head)
    print(dump({"rows": len(log.records)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
