"""The leaderboard: every method on pretrained CIFAR-10 ResNet-20 under one equal budget.

Each row is an ordinary ``hwprune run`` (the runner, the recipe schema and the report are
the CLI's own), started from the pretrained checkpoint and given the same training budget:
``--epochs`` epochs over the same ``--train-subset`` images (batch 64, SGD, cosine learning
rate, augmentation), split into a pruning and a fine-tuning phase where the method has one.
Every result is finalized, shrunk (entirely zero channels removed), saved with ``hp.save``
(the stored bytes of the conv and linear weights include the index overhead) and timed at
batch 1 on this CPU against the dense model in the same run. Targets: every conv but the
first (the classifier stays dense).

Rows come in pairs: each learned or hardware-aware method next to magnitude pruning with the
same pattern, so the second table reads "learned minus magnitude" at equal pattern and budget.

Every row runs as its own process (``hwprune run RECIPE --out FOLDER``, the command printed
under the table), so several copies of this script can share the queue: each claims a row
before running it, and finished rows are kept (rerunning resumes the queue)::

    python bench/leaderboard/leaderboard.py --out bench/results/leaderboard/leaderboard &
    python bench/leaderboard/leaderboard.py --out bench/results/leaderboard/leaderboard &
    python bench/leaderboard/leaderboard.py --out ... --seed 1 --only dpp-1of8 magnitude-1of8

``--table-only`` rewrites the tables and the plot from the finished rows; a file
``<out>_note.md`` beside them (how the rows ran: which copies, at which commits) is put under
the header. The run folders are not committed: in a checkout without them, every row of the
committed ``<out>.json`` first gets its folder back (its ``summary.json``), so that a run of
a few rows adds them to the table instead of replacing it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

from common import arguments, command, header, parse, write_json
from hwprune.app.compare import compare_markdown, compare_plot, load_runs
from hwprune.app.recipe import dump, resolve
from hwprune.errors import HwpruneError

PRETRAINED = "weights/cifar10-resnet20-akamaster.th"
CONVS = "layer*"  # the stem conv and the classifier stay dense for every method


#: a cubic ramp over the first 3 of 4 pruning epochs of 12,500 images at batch 64 (196 steps
#: an epoch), updating every 15 steps
GRADUAL = {"type": "cubic", "begin": 0, "end": 585, "every": 15, "unit": "step"}


def _magnitude(structure: str, sparsity: float | None = None,
               schedule: dict | None = None) -> dict:
    method = {"name": "Magnitude", "structure": structure, "targets": CONVS}
    if sparsity is not None:
        method["sparsity"] = sparsity
    if schedule is not None:
        method["schedule"] = schedule
    return method


def _psp_gradual(sparsity: float) -> dict:
    return {"name": "PSP", "structure": "channel", "variant": "fixed", "sparsity": sparsity,
            "rank_by": "scaled", "revive": False, "schedule": GRADUAL, "targets": CONVS}


#: (row name, method section, fraction of the epochs spent in the pruning phase, the
#: magnitude rows it is compared with: the same pattern, or for a hardware-aware pattern also
#: the structured pattern it replaces). In queue order: the high-compression pairs
#: first. The learned rows use each method's defaults except where a comment says why.
ENTRIES: list[tuple[str, dict, float, tuple[str, ...]]] = [
    ("magnitude-1of8", _magnitude("1:8"), 0.0, ()),
    ("dpp-1of8", {"name": "DPP", "structure": "1:8", "targets": CONVS}, 0.75, ("magnitude-1of8",)),
    # a pretrained model's own magnitudes as DPP's starting logits, against the default
    # (uniform) start, which loses the pretrained function at this budget: the 1:4 and map
    # rows start from the magnitudes only
    ("dpp-1of8-magnitude-init", {"name": "DPP", "structure": "1:8", "logit_init": "magnitude",
                                 "targets": CONVS}, 0.75, ("magnitude-1of8",)),
    ("magnitude-element-8x", _magnitude("element", 0.875), 0.0, ()),
    # DARB is a regular pattern: against irregular magnitude and against 1x4 blocks
    ("darb-8x", {"name": "DARB", "ratio": 8.0, "targets": CONVS}, 0.0,
     ("magnitude-element-8x", "magnitude-block-8x")),
    ("magnitude-block-4x", _magnitude("block:1x4", 0.75), 0.0, ()),
    ("admm-zero-4x", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                      "admm_interval": 20, "targets": CONVS}, 0.5, ("magnitude-block-4x",)),
    ("magnitude-1of4", _magnitude("1:4"), 0.0, ()),
    ("dpp-1of4-magnitude-init", {"name": "DPP", "structure": "1:4", "logit_init": "magnitude",
                                 "targets": CONVS}, 0.75, ("magnitude-1of4",)),
    ("magnitude-channel-75", _magnitude("channel", 0.75), 0.0, ()),
    # PSP at a fixed sparsity (the decay variant prunes nothing at this budget: psp.md)
    ("psp-channel-75", {"name": "PSP", "structure": "channel", "variant": "fixed",
                        "sparsity": 0.75, "rank_by": "scaled", "targets": CONVS}, 0.5,
     ("magnitude-channel-75",)),
    ("magnitude-map-50", _magnitude("map", 0.5), 0.0, ()),
    ("dpp-map-50-magnitude-init", {"name": "DPP", "structure": "map", "k": 0.5,
                                   "logit_init": "magnitude", "targets": CONVS}, 0.75,
     ("magnitude-map-50",)),
    ("magnitude-element-4x", _magnitude("element", 0.75), 0.0, ()),
    ("darb-4x", {"name": "DARB", "ratio": 4.0, "targets": CONVS}, 0.0,
     ("magnitude-element-4x", "magnitude-block-4x")),
    ("magnitude-channel-50", _magnitude("channel", 0.5), 0.0, ()),
    ("psp-channel-50", {"name": "PSP", "structure": "channel", "variant": "fixed",
                        "sparsity": 0.5, "rank_by": "scaled", "targets": CONVS}, 0.5,
     ("magnitude-channel-50",)),
    ("admm-unify-zero", {"name": "ADMM", "block": [1, 4], "unify": 0.5, "zero": 0.25,
                         "admm_interval": 20, "targets": CONVS}, 0.5, ()),
    # round 3: where a gradual method should gain on one-shot magnitude (high sparsity), and
    # DPP with half the budget left for fine-tuning its final mask (magnitude fine-tunes all 8)
    ("admm-element-8x", {"name": "ADMM", "block": "element", "unify": 0.0, "zero": 0.875,
                         "admm_interval": 20, "targets": CONVS}, 0.5, ("magnitude-element-8x",)),
    ("magnitude-block-8x", _magnitude("block:1x4", 0.875), 0.0, ()),
    ("admm-zero-8x", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.875,
                      "admm_interval": 20, "targets": CONVS}, 0.5, ("magnitude-block-8x",)),
    ("dpp-1of8-magnitude-init-half", {"name": "DPP", "structure": "1:8",
                                      "logit_init": "magnitude", "targets": CONVS}, 0.5,
     ("magnitude-1of8",)),
    # the reference code's conv noise (METHODS.md), on the same half-and-half split
    ("dpp-1of8-magnitude-init-noise01", {"name": "DPP", "structure": "1:8",
                                         "logit_init": "magnitude", "noise_scale": 0.01,
                                         "targets": CONVS}, 0.5, ("magnitude-1of8",)),
    # round 4: the half-and-half split that brought DPP 1:8 level with magnitude, at 1:4 and
    # on feature maps
    ("dpp-1of4-magnitude-init-half", {"name": "DPP", "structure": "1:4",
                                      "logit_init": "magnitude", "targets": CONVS}, 0.5,
     ("magnitude-1of4",)),
    ("dpp-map-50-magnitude-init-half", {"name": "DPP", "structure": "map", "k": 0.5,
                                        "logit_init": "magnitude", "targets": CONVS}, 0.5,
     ("magnitude-map-50",)),
    # PSP ramping its channel sparsity up (cubic, over 3 of the 4 pruning epochs) with no
    # revival, so the kept set only shrinks: the rows above re-rank every step at full
    # sparsity. Magnitude on the same ramp separates the schedule's share from the alphas'.
    ("psp-channel-50-gradual", _psp_gradual(0.5), 0.5,
     ("magnitude-channel-50", "magnitude-channel-50-gradual")),
    ("magnitude-channel-50-gradual", _magnitude("channel", 0.5, GRADUAL), 0.5, ()),
    ("psp-channel-75-gradual", _psp_gradual(0.75), 0.5,
     ("magnitude-channel-75", "magnitude-channel-75-gradual")),
    ("magnitude-channel-75-gradual", _magnitude("channel", 0.75, GRADUAL), 0.5, ()),
    # a quarter of the budget learning the masks, three quarters fine-tuning the final one
    # (the 6 + 2 split trailed the 4 + 4 one at 1:8)
    ("dpp-1of4-magnitude-init-quarter", {"name": "DPP", "structure": "1:4",
                                         "logit_init": "magnitude", "targets": CONVS}, 0.25,
     ("magnitude-1of4",)),
    ("dpp-map-50-magnitude-init-quarter", {"name": "DPP", "structure": "map", "k": 0.5,
                                           "logit_init": "magnitude", "targets": CONVS}, 0.25,
     ("magnitude-map-50",)),
    # round 5: ADMM on a quarter of the budget (2 epochs, a round every 10 steps, rho from
    # 1e-2 so that it reaches its cap of 1 halfway and W settles onto Z before the
    # projection), leaving 6 epochs to fine-tune the fixed pattern (it trailed the 4 + 4
    # split, so the 8x row was not run)
    ("admm-zero-4x-quarter", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                              "rho": 0.01, "admm_interval": 10, "targets": CONVS}, 0.25,
     ("magnitude-block-4x",)),
    # DPP with every default (logits from a random start, the default noise, entropy and
    # temperature) on the half-and-half split of the other DPP rows
    ("dpp-1of8-half", {"name": "DPP", "structure": "1:8", "targets": CONVS}, 0.5,
     ("magnitude-1of8",)),
    # ADMM with rho capped at 0.1 (rows above: 1), where the penalty's pull on a pruned
    # weight (rho |w - z|) stays of the order of the task's gradient, so that the pattern is
    # chosen with the task still in the loss: at a cap of 1 the ADMM epochs drag W onto Z and
    # the test accuracy falls to about half before the projection (metrics.csv of those rows)
    ("admm-zero-4x-rho-cap", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                              "rho": 0.01, "rho_max": 0.1, "admm_interval": 20,
                              "targets": CONVS}, 0.5, ("magnitude-block-4x",)),
    ("admm-element-8x-rho-cap", {"name": "ADMM", "block": "element", "unify": 0.0,
                                 "zero": 0.875, "rho": 0.01, "rho_max": 0.1,
                                 "admm_interval": 20, "targets": CONVS}, 0.5,
     ("magnitude-element-8x",)),
    # rho reaching its cap of 1 only at the end of the ADMM epochs (x1.2 a round: 39 rounds
    # from 1e-3), so that the task stays in the loss longer; and 3 ADMM epochs (a round every
    # 15 steps, the default growth) leaving 5 to fine-tune
    ("admm-zero-4x-slow-rho", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                               "rho_growth": 1.2, "admm_interval": 20, "targets": CONVS}, 0.5,
     ("magnitude-block-4x",)),
    ("admm-zero-4x-three", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                            "admm_interval": 15, "targets": CONVS}, 0.375,
     ("magnitude-block-4x",)),
    ("admm-element-8x-slow-rho", {"name": "ADMM", "block": "element", "unify": 0.0,
                                  "zero": 0.875, "rho_growth": 1.2, "admm_interval": 20,
                                  "targets": CONVS}, 0.5, ("magnitude-element-8x",)),
    # slower still at first: rho from 1e-4, x1.27 a round, also at its cap only at the end
    ("admm-zero-4x-low-rho", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                              "rho": 1e-4, "rho_growth": 1.27, "admm_interval": 20,
                              "targets": CONVS}, 0.5, ("magnitude-block-4x",)),
    # the runner's default since round 5: no growth given (null), so ADMM fits it to the
    # pruning phase the runner passes (admm_steps), reaching the cap at the last round
    ("admm-zero-4x-fitted", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                             "rho_growth": None, "admm_interval": 20, "targets": CONVS}, 0.5,
     ("magnitude-block-4x",)),
    # round 6: DARB reaching its ratio gradually (the cubic ramp of the PSP rows: block sizes
    # and masks recomputed from the current weights every 15 steps), then fine-tuning the
    # fixed pattern; against 1:8 / 1:4 too, DARB's pattern with one block size for every row
    ("darb-8x-gradual", {"name": "DARB", "ratio": 8.0, "schedule": GRADUAL,
                         "targets": CONVS}, 0.5,
     ("magnitude-element-8x", "magnitude-1of8", "darb-8x")),
    ("darb-4x-gradual", {"name": "DARB", "ratio": 4.0, "schedule": GRADUAL,
                         "targets": CONVS}, 0.5,
     ("magnitude-element-4x", "magnitude-1of4", "darb-4x")),
    # round 7: ADMM's accuracy rose with its share of the budget (2 + 6 < 3 + 5 < 4 + 4 at 4x
    # blocks): 6 ADMM epochs with the fitted growth, 2 to fine-tune the fixed pattern
    ("admm-zero-4x-fitted-long", {"name": "ADMM", "block": [1, 4], "unify": 0.0, "zero": 0.75,
                                  "rho_growth": None, "admm_interval": 20,
                                  "targets": CONVS}, 0.75, ("magnitude-block-4x",)),
    ("admm-element-8x-fitted-long", {"name": "ADMM", "block": "element", "unify": 0.0,
                                     "zero": 0.875, "rho_growth": None, "admm_interval": 20,
                                     "targets": CONVS}, 0.75, ("magnitude-element-8x",)),
]
BASELINE = {name: base for name, _, _, base in ENTRIES}


#: the rho growth every ADMM row without its own ran with, before the runner fitted the
#: growth to the pruning phase (``ADMM(admm_steps=...)``): written out, so that those rows
#: run as they ran
ADMM_ROUND_GROWTH = 1.3


def recipe(name: str, method: dict, prune_share: float, args) -> dict:
    prune = round(args.epochs * prune_share)
    if method["name"] == "ADMM" and "rho_growth" not in method:
        method = {**method, "rho_growth": ADMM_ROUND_GROWTH}
    return resolve({
        "name": name, "seed": args.seed,
        "model": {"name": "resnet20", "pretrained": PRETRAINED},
        "data": {"name": "cifar10", "dir": args.data_dir, "train_subset": args.train_subset,
                 "test_subset": args.test_subset, "augment": True},
        "method": method,
        "optimizer": {"lr": args.lr, "finetune_lr": args.lr},
        "train": {"prune_epochs": prune, "finetune_epochs": args.epochs - prune,
                  "batch_size": args.batch_size},
        "end": {"shrink": True, "plots": False},
    }, name=name)


def row_folder(runs: Path, name: str, seed: int) -> Path:
    return runs / (name if seed == 0 else f"{name}-s{seed}")


def claim(folder: Path) -> bool:
    """True if this process may run ``folder``'s row: nobody finished or holds it (a claim
    whose process is gone is taken over)."""
    if (folder / "summary.json").exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / "claimed-by"
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(mark.read_text() or 0), 0)
            return False  # alive: another copy runs it
        except (ProcessLookupError, ValueError):
            mark.unlink(missing_ok=True)
            return claim(folder)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


#: fields ``load_runs`` adds to a summary (not stored in a run folder's summary.json)
_DERIVED = ("dir", "delta", "speedup")


def restore_finished(out: Path, runs: Path) -> list[Path]:
    """The run folder (its ``summary.json``) of every row in the committed ``<out>.json``
    whose folder is missing under ``runs``; a folder that exists (finished, running or
    stopped) is left as it is. Returns the folders made."""
    table = out.with_suffix(".json")
    if not table.exists():
        return []
    made = []
    for row in json.loads(table.read_text()):
        folder = runs / Path(row["dir"]).name
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        summary = {k: v for k, v in row.items() if k not in _DERIVED}
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        made.append(folder)
    return made


def finished(runs: Path) -> list[Path]:
    """Every finished row folder under ``runs``, in queue order, seeds in order."""
    out = []
    for name, *_ in ENTRIES:
        for folder in sorted(runs.glob(f"{name}*"), key=lambda p: p.name):
            if folder.name == name or folder.name.removeprefix(name + "-s").isdigit():
                if (folder / "summary.json").exists():
                    out.append(folder)
    return out


def versus_magnitude(rows: list[dict]) -> str:
    """Learned minus magnitude accuracy at equal pattern, mean over the seeds run."""
    acc: dict[str, list[float]] = {}
    for r in rows:  # seeds of one row together: "name-sN" is seed N of "name"
        acc.setdefault(re.sub(r"-s\d+$", "", r["name"]), []).append(100 * r["accuracy"])
    lines = ["| row | magnitude row | accuracy % (seeds) | magnitude % (seeds) | difference |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name, base in ((n, b) for n, bases in BASELINE.items() for b in bases):
        if name not in acc or base not in acc:
            continue
        a, b = acc[name], acc[base]
        cells = [f"{statistics.mean(a):.2f} ({', '.join(f'{x:.2f}' for x in a)})",
                 f"{statistics.mean(b):.2f} ({', '.join(f'{x:.2f}' for x in b)})",
                 f"{statistics.mean(a) - statistics.mean(b):+.2f}"]
        lines.append(f"| {name} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, runs: Path, args, argv) -> None:
    folders = finished(runs)
    if not folders:
        return
    rows = load_runs(folders)
    head = header(
        "Leaderboard: every method on pretrained CIFAR-10 ResNet-20", command(__file__, argv),
        f"{rows[0].get('machine', '?')}, 1 torch thread per row, rows run as parallel "
        "processes (the queue's copies; the machine was shared). "
        f"Budget, equal for all: {args.epochs} epochs over {args.train_subset} training images "
        f"(batch {args.batch_size}, SGD lr {args.lr}, momentum 0.9, cosine, augmentation), "
        "from the pretrained checkpoint; the pruning phase's share of the epochs is in each "
        f"recipe; test: {args.test_subset or 'the 10,000'} CIFAR-10 test images. Every conv "
        "but the stem is pruned. Stored bytes: the conv and linear weights of the finalized, "
        "shrunk model as `hp.save` stores them, index included (the whole file is "
        "`file_bytes` in the JSON); latency: batch 1, median, against the dense model timed "
        "in the same run (other rows ran at the same time: compare latencies only within a "
        "row, and read the speed-up column as noise except for shrunk channel and map rows). A row "
        "named `-sN` is the same recipe with seed N. Each row's command is listed below the "
        f"table (the recipes are in `{out.name}_recipes/`).\n\n")
    note = out.parent / f"{out.name}_note.md"  # how the rows ran (committed beside the table)
    if note.exists():
        head += note.read_text().strip() + "\n\n"
    versus = ("\n## Learned against magnitude at equal pattern and budget\n\n"
              "Accuracy of each method's row minus the magnitude row it is paired with: the "
              "same pattern, and for DARB also 1x4 blocks at its ratio, the fixed structured "
              "pattern it competes with (mean over the seeds run; each seed's value in "
              "brackets).\n\n"
              + versus_magnitude(rows))
    missing = [name for name, *_ in ENTRIES if not (runs / name / "summary.json").exists()]
    if missing:
        versus += f"\nNot run (queued, not finished): {', '.join(missing)}.\n"
    out.with_suffix(".md").write_text(head + compare_markdown(rows) + versus)
    write_json(out.with_suffix(".json"), rows)
    try:
        compare_plot(rows, out.with_suffix(".png"))
    except HwpruneError as e:  # matplotlib missing: the table stands
        print(f"plot skipped: {e}")


def main(argv=None) -> int:
    parser = arguments(__doc__, "path prefix for the .md/.json/.png", data_dir=True)
    parser.add_argument("--runs", default="bench/out/leaderboard",
                        help="where the run folders go (not committed)")
    parser.add_argument("--train-subset", type=int, default=12_500)
    parser.add_argument("--test-subset", type=int, default=None, help="smoke runs only")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", help="run only these rows")
    parser.add_argument("--table-only", action="store_true",
                        help="only rewrite the tables from the finished rows")
    args = parse(parser, argv)
    out, runs = Path(args.out), Path(args.runs)
    unknown = set(args.only or ()) - set(BASELINE)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; allowed: {list(BASELINE)}")
    restored = restore_finished(out, runs)
    if restored:
        print(f"restored {len(restored)} finished rows from {out.with_suffix('.json')} "
              f"into {runs}", flush=True)
    for name, method, share, _ in ([] if args.table_only else ENTRIES):
        if args.only and name not in args.only:
            continue
        folder = row_folder(runs, name, args.seed)
        if not claim(folder):
            continue
        cfg = recipe(folder.name, method, share, args)
        recipe_file = out.parent / f"{out.name}_recipes" / f"{folder.name}.yaml"  # committed
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(dump(cfg))
        resume = ["--resume"] if (folder / "checkpoint.pt").exists() else ["--force"]
        row_command = ["hwprune", "run", str(recipe_file), "--out", str(folder)]
        print(" ".join(row_command), flush=True)
        done = subprocess.run([sys.executable, "-m", "hwprune", *row_command[1:], *resume])
        (folder / "claimed-by").unlink(missing_ok=True)
        if done.returncode:
            print(f"{folder.name}: exit {done.returncode}", flush=True)
        write_tables(out, runs, args, argv)
    write_tables(out, runs, args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
