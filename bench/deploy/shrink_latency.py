"""Latency of dense against shrunk models on this CPU: the measured speed-up next to the MAC
reduction (the ideal).

Channel pruning is one-shot ``hp.Magnitude(structure="channel")`` on the inner conv of every
residual block (``layer*.conv2``: its zero input channels let ``shrink`` remove the matching
filters of ``conv1`` too) of the pretrained akamaster CIFAR ResNet-20/56, and on ``conv2``/``conv3``
of the digits SmallCNN (random init: latency does not depend on the values). No fine-tuning:
only time is measured here. The dense, shrunk, and shrunk + BatchNorm-folded forward passes
alternate within one loop (so load from other processes hits them alike), in PyTorch eager and
in onnxruntime (the dense and the folded model exported with ``hp.export_model(...,
format="onnx")``, per batch size); the median over the repeats is reported. Needs onnxruntime
(the zoo venv, ``make zoo``, or ``pip install "hwprune[onnx,onnxruntime]"``) and the
pretrained ResNets in the data folder::

    HWPRUNE_DATA_DIR=... python bench/deploy/shrink_latency.py [--threads 1] [--repeats 30]

Writes bench/results/deploy/shrink_latency.jsonl (resumable) and .md.
"""

from __future__ import annotations

import copy
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from torch.utils.flop_counter import FlopCounterMode

import hwprune as hp
from common import RESULTS, ResultLog, arguments, command, header, machine, parse, write_table
from deploy.latency import eager, medians_in_turns, onnxruntime_call
from hwprune.data import data_dir
from hwprune.models import SmallCNN, load_pretrained

OUT = RESULTS / "deploy"
MACHINE = machine() + " (shared with other jobs)"


def macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def load(name: str) -> tuple[torch.nn.Module, tuple, object]:
    """The dense model, its input shape and the pruning targets."""
    if name == "digits-cnn":
        torch.manual_seed(0)
        return SmallCNN().eval(), (1, 8, 8), ["conv2.0", "conv3.0"]
    path = data_dir() / "weights" / f"cifar10-{name}-akamaster.th"
    return load_pretrained(path), (3, 32, 32), "layer*.conv2"


def build(name: str, sparsity: float) -> tuple[torch.nn.Module, torch.nn.Module, tuple]:
    dense, shape, targets = load(name)
    pruned = copy.deepcopy(dense)
    if sparsity > 0:
        pruned = hp.Magnitude(pruned, "channel", sparsity, targets=targets).finalize()
    return dense, hp.shrink(pruned.eval(), torch.randn(2, *shape)), shape


def run(name: str, sparsity: float, batch: int, repeats: int, folder: str) -> dict:
    dense, small, shape = build(name, sparsity)
    folded = hp.fold_batchnorm(small, torch.randn(2, *shape))
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        diff = float((dense(x) - small(x)).abs().max()) if sparsity == 0 else None
    md, ms = macs(dense, x[:1]), macs(small, x[:1])
    calls = [eager(m, x) for m in (dense, small, folded)]
    calls += [onnxruntime_call(m, x, folder) for m in (dense, folded)]
    td, ts, tf, od, of = medians_in_turns(calls, repeats)
    ideal, measured = md / ms, td / ts
    return {"model": name, "sparsity": sparsity, "batch": batch, "repeats": repeats,
            "params_dense": sum(p.numel() for p in dense.parameters()),
            "params_shrunk": sum(p.numel() for p in small.parameters()),
            "macs_dense": md, "macs_shrunk": ms, "mac_reduction": round(ideal, 3),
            "ms_dense": round(td * 1e3, 3), "ms_shrunk": round(ts * 1e3, 3),
            "speedup": round(measured, 3), "speedup_over_ideal": round(measured / ideal, 3),
            "ms_folded": round(tf * 1e3, 3), "speedup_folded": round(td / tf, 3),
            "speedup_folded_over_ideal": round(td / tf / ideal, 3),
            "ort_ms_dense": round(od * 1e3, 3), "ort_ms_folded": round(of * 1e3, 3),
            "ort_speedup_folded": round(od / of, 3),
            "ort_folded_over_eager_folded": round(of / tf, 3),
            "max_abs_diff_unpruned": diff, "threads": torch.get_num_threads()}


def write_markdown(records: list[dict], cmd: str) -> None:
    lines = [header("Dense against shrunk: CPU latency", cmd,
                    f"{MACHINE}, `torch.set_num_threads({records[0]['threads']})`. One-shot "
                    "channel magnitude pruning (no fine-tuning; only time is measured), "
                    "`hp.shrink`, and the shrunk model with its BatchNorms folded "
                    "(`hp.fold_batchnorm`); the three forward passes run in turns in one loop; "
                    "median of the repeats. MACs measured with `FlopCounterMode` (batch 1). "
                    "`/ ideal` = measured speed-up divided by the MAC reduction. `ORT`: the "
                    "dense and the shrunk + folded model exported to ONNX (`hp.export_model`) "
                    "in onnxruntime (as many threads), timed in the same loop; `ORT / eager`: "
                    "the folded model's onnxruntime time over its eager time.", inline=True),
             ""]
    rows = [[r["model"], f"{r['sparsity']:.2f}", r["batch"], f"{r['params_dense']:,}",
             f"{r['params_shrunk']:,}", f"{r['mac_reduction']:.2f}x", f"{r['ms_dense']:.2f}",
             f"{r['ms_shrunk']:.2f}", f"{r['speedup']:.2f}x", f"{r['speedup_over_ideal']:.2f}",
             f"{r['ms_folded']:.2f}", f"{r['speedup_folded']:.2f}x",
             f"{r['speedup_folded_over_ideal']:.2f}", f"{r['ort_ms_dense']:.2f}",
             f"{r['ort_ms_folded']:.2f}", f"{r['ort_speedup_folded']:.2f}x",
             f"{r['ort_folded_over_eager_folded']:.2f}"] for r in records]
    write_table(OUT / "shrink_latency.md", lines,
        ["model", "channel sparsity", "batch", "params dense", "params shrunk", "MAC reduction",
         "ms dense", "ms shrunk", "speed-up", "/ ideal", "ms shrunk + folded", "speed-up",
         "/ ideal", "ORT ms dense", "ORT ms folded", "ORT speed-up", "ORT / eager"],
        "lrrrrrrrrrrrrrrrr", rows)


def main() -> None:
    ap = arguments(__doc__, None, threads=1, repeats=30)
    ap.add_argument("--models", nargs="+", default=["digits-cnn", "resnet20", "resnet56"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    args = parse(ap, None)
    log = ResultLog(OUT / "shrink_latency.jsonl",
                    key=lambda r: (r["model"], r["sparsity"], r["batch"]))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for sparsity in args.sparsities:
                for batch in args.batches:
                    if not log.done(name, sparsity, batch):
                        # big batches of the deep model: fewer repeats keep the run short
                        reps = args.repeats if batch == 1 else max(5, args.repeats // 3)
                        log.add(run(name, sparsity, batch, reps, folder))
    write_markdown(log.records, command(__file__))
    print(platform.processor() or platform.machine())


if __name__ == "__main__":
    main()
