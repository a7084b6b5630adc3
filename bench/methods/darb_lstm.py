"""DARB against BMWM, block pruning and irregular pruning on a character-level LSTM (Tiny
Shakespeare), at pruning ratios 4x, 8x, 16x, 25x, from one trained dense model with equal
retraining.

* Dense: a 2-layer ``CharLSTM`` (embedding 64, hidden 128) trained ``--dense-steps`` Adam steps on
  random windows of the first 90 % of the text (kept in ``--ckpt``, reused on a rerun).
* Targets: the four LSTM weight matrices (``targets=nn.LSTM``); embedding and head stay dense.
* Methods, each one-shot from the dense weights then retrained ``--retrain-steps`` Adam steps
  with the masks fixed (same batches for every method):
  ``darb`` (``hp.DARB``, ratio r, allowed 1..64), ``bmwm`` (one block size b for all rows:
  ``hp.Magnitude`` with ``"1:b"``, b the power of two nearest r, so its ratio is b),
  ``block`` (``hp.Magnitude`` ``"block:4x4"`` tiles, sparsity 1 - 1/r) and ``irregular``
  (``hp.Magnitude`` element, per layer, sparsity 1 - 1/r).
* Measured: bits per character on the held-out last 10 % (before and after retraining), the
  actual pruning ratio of the LSTM matrices, and the decoding cost
  (``hwprune.methods.darb.decoding_cost``: CSR for irregular, tile bits for block, block
  positions for BMWM/DARB).

    nohup python bench/methods/darb_lstm.py --out bench/results/methods/darb/darb_lstm \
        > /tmp/darb_lstm.log 2>&1 &
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
import torch.nn.functional as F
from torch import nn

import hwprune as hp
from common import ResultLog, arguments, command, cpu_name, header, parse, table, write_lines
from hwprune.data import load_tinyshakespeare
from hwprune.methods.darb import decoding_cost
from hwprune.models import CharLSTM, bits_per_character, sample_batch

METHODS = ("darb", "bmwm", "block", "irregular")
BLOCK = (4, 4)


def make_pruner(method: str, model: nn.Module, ratio: float, targets=nn.LSTM) -> hp.Pruner:
    """One of METHODS at pruning ratio ``ratio`` on ``targets`` (shared with darb_resnet20)."""
    if method == "darb":
        return hp.DARB(model, ratio, targets=targets)
    if method == "bmwm":
        return hp.Magnitude(model, f"1:{bmwm_size(ratio)}", targets=targets)
    structure = "element" if method == "irregular" else f"block:{BLOCK[0]}x{BLOCK[1]}"
    return hp.Magnitude(model, structure, 1.0 - 1.0 / ratio, targets=targets)


def bmwm_size(ratio: float) -> int:
    return 2 ** round(math.log2(ratio))


def cost_of(method: str, pruner: hp.Pruner, ratio: float) -> dict:
    """Decoding cost over all pruned matrices: bits summed, widths weighted by kept weights."""
    costs = []
    for name, mask in pruner.masks().items():
        if method == "darb":
            costs.append(decoding_cost(mask, "darb", block_sizes=pruner.block_sizes[name],
                                       allowed=pruner.allowed_sizes[name]))
        elif method == "bmwm":
            costs.append(decoding_cost(mask, "bmwm", block_sizes=bmwm_size(ratio)))
        elif method == "block":
            costs.append(decoding_cost(mask, "block", block=BLOCK))
        else:
            costs.append(decoding_cost(mask, "csr"))
    kept = sum(c["kept"] for c in costs)
    return {
        "index_bits_per_kept": sum(c["index_bits"] for c in costs) / kept,
        "selection_width": sum(c["selection_width"] * c["kept"] for c in costs) / kept,
        "selection_inputs_per_kept": sum(c["selection_inputs_per_kept"] * c["kept"]
                                         for c in costs) / kept,
    }


def train(model, steps, lr, data, args, seed, pruner=None) -> None:
    opt = torch.optim.Adam(pruner.param_groups(lr=lr) if pruner else model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for i in range(steps):
        x, y = sample_batch(data, args.batch, args.seq_len, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if pruner is not None:
            loss = loss + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if pruner is not None:
            pruner.step()
        if (i + 1) % 100 == 0:
            print(f"  step {i + 1}/{steps} loss {loss.item() / math.log(2):.3f} bits", flush=True)


def bench_setup(doc: str, ratios: list[float], argv, add_args) -> tuple:
    """The arguments both DARB benchmarks share, parsed (``add_args(parser)`` adds the rest),
    the thread count set, and the results log: ``(args, out, log)``."""
    parser = arguments(doc, data_dir=True, threads=1)
    parser.add_argument("--ratios", type=float, nargs="+", default=ratios)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_args(parser)
    args = parse(parser, argv)
    out = Path(args.out)
    return args, out, ResultLog(out.with_suffix(".jsonl"),
                                lambda r: (r["method"], r["target_ratio"]))


def pending(args, log: ResultLog) -> list[tuple[float, str]]:
    """The (ratio, method) points not in the log yet, in ratio then method order."""
    return [(r, m) for r in args.ratios for m in args.methods if not log.done(m, r)]


def point_record(method: str, ratio: float, pruner: hp.Pruner, start: float,
                 quality: Callable[[], dict]) -> dict:
    """A retrained point's record: the ratio reached and the decoding cost, then the pruner
    finalized and ``quality()`` measured on the finalized model."""
    cost = cost_of(method, pruner, ratio)
    actual = 1.0 / (1.0 - pruner.sparsity())
    pruner.finalize()
    return {"method": method, "target_ratio": ratio, "ratio": actual, **quality(), **cost,
            "seconds": round(time.perf_counter() - start, 1)}


def summary_table(records: list[dict], quality: list[tuple[str, str]]) -> list[str]:
    """The results table, one row per point in ratio then method order; ``quality`` is
    ``[(column header, format of the record)]`` for the model-quality columns."""
    rows = [[f"{r['target_ratio']:g}", r["method"], f"{r['ratio']:.2f}",
             *(f.format(**r) for _, f in quality), f"{r['index_bits_per_kept']:.2f}",
             f"{r['selection_width']:.2f}", f"{r['selection_inputs_per_kept']:.3f}"]
            for r in sorted((r for r in records if r["method"] != "dense"),
                            key=lambda r: (r["target_ratio"], METHODS.index(r["method"])))]
    return table(["target ratio", "method", "actual ratio", *(h for h, _ in quality),
                  "index bits / kept", "selection width", "selection inputs / kept"],
                 "rlr" + "r" * len(quality) + "rrr", rows)


def shared_cpu(threads: int) -> str:
    """The machine line both DARB benchmarks write."""
    return (f"{cpu_name()}, 2-core CPU ({platform.machine()}, shared with other jobs), "
            f"{threads} thread(s), torch {torch.__version__}")


def write_summary(out: Path, records: list[dict], head: str) -> None:
    dense = next((r for r in records if r["method"] == "dense"), None)
    lines = [head, ""]
    if dense:
        how = (f"{dense['seconds']} s of training" if dense.get("trained", True)
               else "loaded from the --ckpt checkpoint")
        lines += [f"Dense model: validation {dense['bpc']:.4f} bits per character ({how}).", ""]
    lines += summary_table(records, [("bpc one-shot", "{bpc_oneshot:.4f}"),
                                     ("bpc retrained", "{bpc:.4f}")])
    write_lines(out.with_suffix(".md"), lines)


def _lstm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default="/tmp/hwprune_darb_lstm_dense.pt")
    parser.add_argument("--dense-steps", type=int, default=2500)
    parser.add_argument("--retrain-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    args, out, log = bench_setup(__doc__, [4, 8, 16, 25], argv, _lstm_args)
    head = header(
        "DARB on a character-level LSTM (Tiny Shakespeare)", command(__file__, argv),
        f"{shared_cpu(args.threads)}. Model: 2-layer LSTM, embedding {args.embedding}, hidden "
        f"{args.hidden}; batches of {args.batch} x {args.seq_len} characters. Dense: "
        f"{args.dense_steps} Adam steps (lr 3e-3, cosine); each pruned point: one-shot from the "
        f"dense weights, then {args.retrain_steps} Adam steps (lr 1e-3, cosine) with the masks "
        f"fixed, the same batches for every method. Pruned: the 4 LSTM matrices. bpc: bits per "
        f"character on the last 10 % of the text (111,540 characters). Block pruning uses "
        f"{BLOCK[0]}x{BLOCK[1]} tiles; BMWM uses one block size b = the power of two nearest "
        f"the target, so its actual ratio is b.")
    train_ids, val_ids, vocab = load_tinyshakespeare(args.data_dir)
    torch.manual_seed(args.seed)
    model = CharLSTM(len(vocab), args.embedding, args.hidden)
    ckpt = Path(args.ckpt)
    start = time.perf_counter()
    trained = not ckpt.exists()
    if not trained:
        model.load_state_dict(torch.load(ckpt, weights_only=True))
    else:
        train(model, args.dense_steps, 3e-3, train_ids, args, args.seed)
        torch.save(model.state_dict(), ckpt)
    if not log.done("dense", 1.0):
        log.add({"method": "dense", "target_ratio": 1.0, "ratio": 1.0,
                 "bpc": bits_per_character(model, val_ids), "trained": trained,
                 "seconds": round(time.perf_counter() - start, 1)})
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    write_summary(out, log.records, head)
    for ratio, method in pending(args, log):
        start = time.perf_counter()
        model.load_state_dict(dense_state)
        pruner = make_pruner(method, model, ratio)
        oneshot = bits_per_character(model, val_ids)
        train(model, args.retrain_steps, 1e-3, train_ids, args, args.seed + 1, pruner)
        log.add(point_record(method, ratio, pruner, start, lambda: {  # called at once
            "bpc_oneshot": oneshot,  # noqa: B023
            "bpc": bits_per_character(model, val_ids)}))
        write_summary(out, log.records, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
