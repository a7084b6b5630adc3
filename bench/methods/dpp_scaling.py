"""Training-step time and peak memory of every method against a dense step (DPP's scaling).

Two models: the CIFAR ResNet-20 (``hwprune.models``, batch 32 of 32x32 inputs) and an MLP of
three Linear(1024, 1024) layers with ReLUs between (batch 256). One step is forward,
cross-entropy + ``pruner.penalty()``, backward, SGD (momentum 0.9) and ``pruner.step()``.

* **time**: all variants of a model live in one process; each round times every variant in a
  rotated order (interleaved, so a busy machine slows all alike), ``--steps`` steps each; the
  table gives the median per-step time over ``--repeats`` rounds and its ratio to dense.
* **memory**: every variant runs in its own child process, forked before any model is built:
  build, three steps, then the child's peak resident set size (``VmHWM``). The table gives
  the peak, and the peak above the idle parent (torch and hwprune imported: the model's own
  memory), each as a ratio to dense.

    nohup nice -n 10 python bench/methods/dpp_scaling.py \
        --out bench/results/methods/dpp_scaling > dpp_scaling.log &
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
import torch.nn.functional as F
from torch import nn

import hwprune as hp
from common import arguments, command, header, machine, parse, table, write_json, write_lines
from hwprune.models import resnet20

#: name -> (method, keyword arguments); None: the dense step
VARIANTS: dict[str, tuple[type, dict] | None] = {
    "dense": None,
    "DPP weight k=n/2 (auto)": (hp.DPP, {"structure": "weight", "k": 0.5}),
    "DPP weight k=n/2 ksoftmax": (hp.DPP, {"structure": "weight", "k": 0.5,
                                           "relaxation": "ksoftmax"}),
    "DPP kernel k=n/2 (auto)": (hp.DPP, {"structure": "kernel", "k": 0.5}),
    "DPP 2:4 (auto)": (hp.DPP, {"structure": "2:4"}),
    "DPP 2:4 sigmoid": (hp.DPP, {"structure": "2:4", "relaxation": "sigmoid"}),
    "Magnitude element 50%": (hp.Magnitude, {"structure": "element", "sparsity": 0.5}),
    "Magnitude 2:4": (hp.Magnitude, {"structure": "2:4"}),
    "PSP channel": (hp.PSP, {"structure": "channel"}),
    "ADMM 1x4 unify 0.5 zero 0.25": (hp.ADMM, {"block": (1, 4), "unify": 0.5, "zero": 0.25}),
    "DARB 4x": (hp.DARB, {"ratio": 4.0}),
}
#: variants that do not apply to a model (kernels need convs) or cost minutes per step there
NOT_RUN = {"mlp": {"DPP kernel k=n/2 (auto)": "Linear weights have no kernels",
                   "DPP weight k=n/2 ksoftmax": "512 softmax passes over every row: "
                                                "seconds per step (see the ResNet-20 row)"}}


class MLP3(nn.Module):
    def __init__(self, width: int = 1024):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


#: name -> (model factory, input shape, number of classes)
MODELS = {"mlp": (MLP3, (256, 1024), 1024),
          "resnet20": (resnet20, (32, 3, 32, 32), 10)}


def build(model_name: str, variant: str):
    """(model, pruner or None, step function) with fixed seeds."""
    factory, shape, classes = MODELS[model_name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(shape)
    y = torch.randint(0, classes, (shape[0],))
    spec = VARIANTS[variant]
    pruner = None if spec is None else spec[0](model, **spec[1])
    groups = model.parameters() if pruner is None else pruner.param_groups(lr=0.01)
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y)
        if pruner is not None:
            loss = loss + pruner.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()

    return model, pruner, step


def variants_of(model_name: str) -> list[str]:
    return [v for v in VARIANTS if v not in NOT_RUN.get(model_name, {})]


def time_model(model_name: str, repeats: int, steps: int) -> dict[str, list[float]]:
    """Per-step seconds of every variant, one entry per round (interleaved rounds)."""
    names = variants_of(model_name)
    steppers = {}
    for v in names:
        _, _, step = build(model_name, v)
        for _ in range(2):  # warm-up: one-shot pruning, allocator, first masks
            step()
        steppers[v] = step
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(repeats):
        for v in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(steps):
                steppers[v]()
            times[v].append((time.perf_counter() - start) / steps)
        print(f"{model_name} round {r + 1}/{repeats} done", flush=True)
    return times


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): ``ru_maxrss`` would not do, because Linux
    carries it over from the parent across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: the memory column needs Linux")


def _child_peak(model_name: str, variant: str, pipe) -> None:
    """In a forked child: three steps of the variant, then its peak RSS (MB) into ``pipe``."""
    _, pruner, step = build(model_name, variant)
    for _ in range(3):
        step()
    out = {"peak_mb": peak_rss_mb()}
    if isinstance(pruner, hp.DPP):
        out["relaxations"] = sorted({layer.parametrization.relaxation
                                     for layer in pruner.layers.values()})
    pipe.send(out)


def measure_memory(model_name: str, variant: str) -> dict:
    """The variant's peak memory in a child forked from this process while it is still idle
    (torch and hwprune imported, no model built): a fork starts from the parent's pages
    without importing again, and ``VmHWM`` is the child's own."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_peak, args=(model_name, variant, send))
    child.start()
    out = receive.recv()
    child.join()
    return out


def report(results: dict, idle_mb: float, cmd: str) -> list[str]:
    load = results["load_average"]
    lines = [header("Training-step time and peak memory against dense (DPP's scaling)", cmd,
                    machine()), "",
             *([results["note"], ""] if results.get("note") else []),
             f"Load average (1 min) of the machine: {load['start']:.1f} at the start, "
             f"{load['end']:.1f} at the end.", "",
             f"Median of {results['repeats']} interleaved rounds of {results['steps']} "
             "step(s) per variant, 1 thread; peak memory of a process per variant "
             f"(VmHWM of a child forked from the idle parent, which had imported torch and "
             f"hwprune and peaked at {idle_mb:.0f} MB; 'own' is the peak above that). "
             "Goal: time <= 1.3x and memory <= 1.5x of dense.", ""]
    for model_name, rows in results["models"].items():
        dense = rows["dense"]
        lines += [f"## {model_name}", ""]
        body = []
        for v, r in rows.items():
            own = (r["peak_mb"] - idle_mb) / (dense["peak_mb"] - idle_mb)
            body.append([v, ", ".join(r.get("relaxations", [])) or "-",
                         f"{r['step_ms']:.1f}", f"{r['step_ms'] / dense['step_ms']:.2f}x",
                         f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / dense['peak_mb']:.2f}x",
                         f"{own:.2f}x"])
        for v, why in NOT_RUN.get(model_name, {}).items():
            body.append([v, "-", "not run", why, "", "", ""])
        lines += table(["variant", "relaxation", "step ms", "time vs dense", "peak MB",
                        "peak vs dense", "own memory vs dense"], "llrrrrr", body)
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, out="path prefix for .json and .md", threads=1, repeats=3)
    parser.add_argument("--steps", type=int, default=1, help="steps per variant and round")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--note", default="", help="a line on the conditions of the run "
                        "(e.g. what else ran), written under the header")
    args = parse(parser, argv)
    load_start = os.getloadavg()[0]
    idle_mb = peak_rss_mb()
    # memory first, while this process is idle: every child forks from the same state
    memory = {}
    for m in args.models:
        for v in variants_of(m):
            memory[(m, v)] = measure_memory(m, v)
            print(json.dumps({"model": m, "variant": v, **memory[(m, v)]}), flush=True)
    results = {"repeats": args.repeats, "steps": args.steps, "idle_peak_mb": idle_mb,
               "note": args.note, "load_average": {"start": load_start}, "models": {}}
    cmd = command(__file__, argv)
    for model_name in args.models:
        times = time_model(model_name, args.repeats, args.steps)
        rows = {}
        for v, ts in times.items():
            rows[v] = {"step_ms": statistics.median(ts) * 1e3,
                       "step_ms_all": [t * 1e3 for t in ts], **memory[(model_name, v)]}
            print(json.dumps({"model": model_name, "variant": v, **rows[v]}), flush=True)
        results["models"][model_name] = rows
        results["load_average"]["end"] = os.getloadavg()[0]
        write_json(Path(args.out + ".json"), {"command": cmd, "machine": machine(), **results})
        write_lines(Path(args.out + ".md"), report(results, idle_mb, cmd))


if __name__ == "__main__":
    main()
