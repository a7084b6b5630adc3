"""What each method's pruned CIFAR-10 ResNet-20 costs on disk, index overhead included.

For the dense pretrained ResNet-20 (akamaster checkpoint) and its pruned versions, one per
method and structure: the bytes of the file ``hp.save`` writes (checked equal to the report's
``file_bytes`` and loaded back bitwise), and over the report's rows (every conv and linear
weight; the first conv and the classifier stay dense under the default targets) the compression
ratio with the index counted, without it, and with the information-theoretic minimum index;
index bits per kept weight and the selection width (docs/storage.md defines every column).

This is a storage table, not an accuracy table: the patterns come from one-shot pruning
(Magnitude, DARB) or from ``--steps`` training steps on a CIFAR-10 training subset (PSP, DPP,
ADMM), enough for each method to produce its pattern (PSP's learned alphas rank the channels,
DPP's logits pick the 2:4 masks and its 8-bit quantization is baked in, ADMM's projection gives
zero / unified / free blocks), not to recover accuracy. No accuracy is measured.

    python bench/storage/storage_methods.py [--data-dir DIR] [--steps 20] [--batch-size 64]

Writes bench/results/storage/storage_methods.jsonl (one record per case, resumable), .md and
.json.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from storage_sizes import bits_equal
from torch.utils.data import Subset

import hwprune as hp
from common import (
    RESULTS,
    ResultLog,
    arguments,
    command,
    header,
    machine,
    parse,
    write_json,
    write_table,
)
from hwprune.data import augment_cifar, data_dir, load_cifar10
from hwprune.models import load_pretrained
from hwprune.training import make_loader, train_epoch

OUT = RESULTS / "storage" / "storage_methods"

#: label -> (how the pattern is made, constructor of the pruner; None: dense)
CASES = {
    "dense": ("-", None),
    "magnitude element 90%": ("one-shot", lambda m: hp.Magnitude(m, "element", 0.9)),
    "magnitude channel 50%": ("one-shot", lambda m: hp.Magnitude(m, "channel", 0.5)),
    "magnitude 2:4": ("one-shot", lambda m: hp.Magnitude(m, "2:4", None)),
    "magnitude block:4x4 50%": ("one-shot", lambda m: hp.Magnitude(m, "block:4x4", 0.5)),
    "PSP channel 50% (fixed)": ("steps", lambda m: hp.PSP(m, "channel", variant="fixed",
                                                          sparsity=0.5)),
    "DPP 2:4": ("steps", lambda m: hp.DPP(m, "2:4", anneal_epochs=1)),
    "DPP 2:4 + 8-bit": ("steps", lambda m: hp.DPP(m, "2:4", anneal_epochs=1, quantize_bits=8)),
    "ADMM 1x4 unify 50% + zero 25%": ("steps", lambda m: hp.ADMM(m, block=(1, 4), unify=0.5,
                                                                 zero=0.25)),
    "DARB 8x": ("one-shot", lambda m: hp.DARB(m, ratio=8.0)),
}


class _Done(Exception):
    """The step budget is spent (raised from ``train_epoch``'s per-step callback)."""


def train_steps(model, pruner, loader, steps: int, lr: float) -> None:
    """``steps`` SGD steps through the pruner's lifecycle; ADMM's projection halfway."""
    opt = torch.optim.SGD(pruner.param_groups(lr=lr, momentum=0.9, weight_decay=5e-4))
    done = 0

    def on_step():
        nonlocal done
        done += 1
        if isinstance(pruner, hp.ADMM) and done == steps // 2:
            pruner.hard_project()  # the rest of the steps retrain with the pattern fixed
        if done == steps:
            raise _Done

    try:
        while True:
            train_epoch(model, loader, opt, pruner, augment=augment_cifar, on_step=on_step)
    except _Done:
        pass
    if isinstance(pruner, hp.ADMM) and pruner.phase == "admm":
        pruner.hard_project()


def run_case(label: str, model0, loader, args) -> dict:
    how, make = CASES[label]
    torch.manual_seed(args.seed)
    model = copy.deepcopy(model0)
    start = time.perf_counter()
    pruner = None if make is None else make(model)
    if how == "steps":
        train_steps(model, pruner, loader, args.steps, args.lr)
    if pruner is not None:
        pruner.finalize()
    model.eval()
    rep = hp.report(model, torch.zeros(1, 3, 32, 32), pruner=pruner, name=label)
    t = rep.total
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.hwp"
        size = hp.save(model, path, hints=rep.hints())
        back = hp.load(path)
        zlib_size = len(zlib.compress(path.read_bytes(), 9))
    state = model.state_dict()
    assert size == t["file_bytes"], (size, t["file_bytes"])  # the report's accounting is exact
    assert list(back) == list(state) and all(bits_equal(back[k], v) for k, v in state.items())
    pruned = [r for r in rep.rows if r.structure != "-"] or rep.rows
    return {
        "case": label, "pattern_from": how if how != "steps" else f"{args.steps} steps",
        "structure": pruned[0].structure,
        "kept_fraction": sum(r.kept_params for r in pruned) / sum(r.params for r in pruned),
        "encodings": dict(Counter(r.encoding for r in rep.rows)),
        **{k: t[k] for k in ("params", "kept_params", "dense_bytes", "stored_bytes",
                             "payload_bytes", "index_bytes", "min_index_bits",
                             "compression_ratio", "compression_ratio_no_index",
                             "compression_ratio_min", "index_bits_per_kept",
                             "stored_bits_per_kept", "selection_width",
                             "selection_inputs_per_kept", "file_bytes",
                             "file_tensor_bytes", "file_header_bytes", "file_dense_bytes")},
        "file_zlib_bytes": zlib_size,
        "seconds": round(time.perf_counter() - start, 1),
    }


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write_summary(records: list[dict], cmd: str) -> None:
    lines = [
        header("Stored bytes of each method's pruned CIFAR-10 ResNet-20 (hwprune.save)", cmd,
               f"{machine()} (as hwprune.app.machine.machine() reads it)."), "",
        "A storage table, not an accuracy table: patterns from one-shot pruning or a few "
        "training steps (column *pattern*); accuracy was not measured. Columns over the "
        "report's rows (all 20 conv/linear weights; the first conv and the classifier stay "
        "dense): *stored* = values + index as `hp.save` stores them; ratio = dense / stored "
        "(index counted), *w/o index* = dense / values, *at min* = dense / (values + the "
        "information-theoretic minimum index: log2 C(n, k) per k-of-n run, log2 C(N, nnz) "
        "for irregular masks, log2 C(tiles, kept) for blocks, the state multinomial + sign "
        "bits for unified); *file* = bytes of the whole `hp.save` file (BatchNorm, biases, "
        "header included), equal to the report's `file_bytes` and loaded back bitwise. "
        "docs/storage.md defines every field.", "",
    ]
    rows = []
    dense_file = next((r["file_bytes"] for r in records if r["case"] == "dense"), None)
    order = list(CASES)
    records = sorted(records, key=lambda r: order.index(r["case"]) if r["case"] in order
                     else len(order))
    for r in records:
        encs = ", ".join(f"{k} {v}" for k, v in sorted(r["encodings"].items()))
        vs = fmt(dense_file / r["file_bytes"] if dense_file else None, ".2f")
        rows.append([
            r["case"], r["pattern_from"], f"{100 * r['kept_fraction']:.1f}%", encs,
            f"{r['dense_bytes']:,}", f"{r['stored_bytes']:,}", f"{r['index_bytes']:,}",
            f"{r['min_index_bits'] / 8:,.0f}", f"{r['compression_ratio']:.2f}x",
            f"{r['compression_ratio_no_index']:.2f}x", f"{r['compression_ratio_min']:.2f}x",
            fmt(r["index_bits_per_kept"], ".2f"), fmt(r["selection_width"], ".2f"),
            fmt(r["selection_inputs_per_kept"], ".2f"), f"{r['file_bytes']:,}",
            f"{r['file_header_bytes']:,}", f"{vs}x", f"{r['file_zlib_bytes']:,}"])
    write_table(OUT.with_suffix(".md"), lines,
        ["case", "pattern", "kept", "encodings", "dense B", "stored B", "index B", "min index B",
         "ratio", "w/o index", "at min", "index bits/kept", "sel. width", "sel. inputs/kept",
         "file B", "header B", "file vs dense file", "zlib file B"], "llrlrrrrrrrrrrrrrr",
        rows)
    write_json(OUT.with_suffix(".json"),
               {"command": cmd, "machine": machine(), "records": records})


def main(argv=None) -> int:
    parser = arguments(__doc__, None, data_dir=True)
    parser.add_argument("--steps", type=int, default=20, help="training steps for PSP/DPP/ADMM")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-subset", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parse(parser, argv)
    cmd = command(__file__, argv)
    root = data_dir(args.data_dir)
    model0 = load_pretrained(root / "weights" / "cifar10-resnet20-akamaster.th")
    train = Subset(load_cifar10(root, train=True), range(args.train_subset))
    loader = make_loader(train, args.batch_size, shuffle=True, seed=args.seed)
    log = ResultLog(OUT.with_suffix(".jsonl"), lambda r: (r["case"],))
    for label in args.cases:
        if not log.done(label):
            log.add(run_case(label, model0, loader, args))
            write_summary(log.records, cmd)
    write_summary(log.records, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
