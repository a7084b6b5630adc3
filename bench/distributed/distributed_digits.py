"""The shipped digits recipes in one process and under ``torchrun --nproc_per_node 2``.

Same recipe, same global batch (``train.batch_size`` is split across the ranks), so the two
runs do the same optimisation up to BatchNorm statistics (per rank, over half the batch) and
float summation order. Records accuracy, sparsity, pruning ratio and wall time of each run
(the wall time of a 2-process run on a CPU says little about a real multi-GPU speed-up: the
ranks share the same cores).

Resumable: finished (recipe, processes) points in
bench/results/distributed/distributed_digits.jsonl are skipped. Run from the repository root::

    python bench/distributed/distributed_digits.py [--recipes dpp-digits psp-digits ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

from common import RESULTS, ResultLog, arguments, machine, parse, write_table

OUT = RESULTS / "distributed"
RECIPES = ("dpp-digits", "psp-digits", "magnitude-digits", "admm-digits", "darb-digits")


def run(recipe: str, nproc: int, out: Path) -> dict:
    cli = ["-m", "hwprune", "run", recipe, "--out", str(out), "--set", "end.latency=false",
           "--set", "end.plots=false"]
    if nproc == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"recipe": recipe, "processes": nproc, "accuracy": s["accuracy"],
            "dense_accuracy": s["dense_accuracy"], "sparsity": s["sparsity"],
            "pruning_ratio": s.get("pruning_ratio"), "seconds": round(seconds, 1),
            "command": " ".join(["python" if c == sys.executable else c for c in cmd]),
            "machine": machine()}


def write_markdown(log: ResultLog, path: Path) -> None:
    lines = ["# Digits recipes: one process vs torchrun with 2 processes (gloo, CPU)", "",
             "Written by `python bench/distributed/distributed_digits.py`; every run is "
             "`hwprune run RECIPE --set end.latency=false --set end.plots=false`, in one process "
             "or under `python -m torch.distributed.run --nproc_per_node 2 -m hwprune run ...`, "
             "`OMP_NUM_THREADS=1`. The global batch is the recipe's in both; the 2 ranks share "
             "this machine's cores, so the wall time is not a speed-up measurement.", ""]
    rows = []
    for r in sorted(log.records, key=lambda r: (RECIPES.index(r["recipe"]), r["processes"])):
        dense = "-" if r["dense_accuracy"] is None else f"{r['dense_accuracy']:.2%}"
        ratio = "-" if r["pruning_ratio"] is None else f"{r['pruning_ratio']:.2f}"
        rows.append([r["recipe"], r["processes"], f"{r['accuracy']:.2%}", dense,
                     f"{r['sparsity']:.1%}", ratio, r["seconds"], r["machine"]])
    write_table(path, lines,
        ["recipe", "processes", "accuracy", "dense accuracy", "sparsity", "pruning ratio",
         "wall s", "machine"], "lrrrrrrl", rows)


def main() -> None:
    parser = arguments(__doc__, None)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    args = parse(parser, None)
    OUT.mkdir(parents=True, exist_ok=True)
    log = ResultLog(OUT / "distributed_digits.jsonl",
                    key=lambda r: (r["recipe"], r["processes"]))
    for recipe in args.recipes:
        for nproc in args.processes:
            if log.done(recipe, nproc):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                log.add(run(recipe, nproc, Path(tmp) / "out"))
            write_markdown(log, OUT / "distributed_digits.md")
    write_markdown(log, OUT / "distributed_digits.md")


if __name__ == "__main__":
    main()
