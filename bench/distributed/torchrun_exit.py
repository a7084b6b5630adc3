"""How often a two-rank torchrun process aborts at exit, with and without a clean shutdown.

A gloo process group (or a DDP reducer) still alive when the interpreter exits can abort the
process after all its work is done (SIGABRT, "terminate called without an active exception"),
so torchrun reports a failed run. Each variant is started ``--runs`` times:

- ``all-reduce, no shutdown``: a few all-reduces, then exit;
- ``DDP, no shutdown``: 20 DDP training steps of a tiny CNN, then exit;
- ``DDP, shutdown``: the same, then the wrapper dropped and
  ``hwprune.distributed.shutdown()`` (a barrier, then the group destroyed), as
  ``hwprune run`` does through ``Run.close()``.

    python bench/distributed/torchrun_exit.py [--runs 20]

Writes bench/results/distributed/torchrun_exit.md and .json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

VARIANTS = {"allreduce": "all-reduce, no shutdown", "ddp": "DDP, no shutdown",
            "ddp-shutdown": "DDP, shutdown"}


def worker(variant: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from hwprune import distributed

    torch.set_num_threads(1)
    distributed.init_from_env("gloo")
    t = torch.ones(3)
    if variant == "allreduce":
        for _ in range(50):
            dist.all_reduce(t)
        return
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        ddp(torch.randn(8, 1, 8, 8)).sum().backward()
        opt.step()
    dist.all_reduce(t)
    if variant == "ddp-shutdown":
        del ddp, opt
        gc.collect()
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    # the shared helpers only here: a worker imports nothing but what its exit is measured with
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers
    from common import RESULTS, command, header, machine, table, write_json, write_lines

    out = RESULTS / "distributed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for variant, label in VARIANTS.items():
        aborted = 0
        for _ in range(args.runs):
            proc = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_port", str(_free_port()), __file__, "--worker", variant],
                capture_output=True, text=True, env=env, timeout=300)
            aborted += proc.returncode != 0
        rows.append({"variant": label, "runs": args.runs, "failed": aborted})
        print(json.dumps(rows[-1]), flush=True)
    lines = [header("torchrun processes that fail at exit",
                    command(__file__, ["--runs", str(args.runs)]),
                    f"{machine()}. Two ranks, gloo, one thread each; a run fails when torchrun "
                    "exits non-zero (a rank aborted after its work).", inline=True), ""]
    lines += table(["variant", "runs", "failed"], "lrr",
                   [[r["variant"], r["runs"], r["failed"]] for r in rows])
    write_lines(out / "torchrun_exit.md", lines)
    write_json(out / "torchrun_exit.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
