"""DPP against one-shot magnitude N:M plus fine-tuning on CIFAR-10 ResNet-20 (pretrained).

Every conv layer but the first gets a 2:4 or 1:4 pattern (runs over input channels, the layout
of sparse tensor cores). Both methods start from the pretrained checkpoint and train for the
same steps with the same optimizer, data order and augmentation:

* ``magnitude``: one-shot N:M by |w| (``hp.Magnitude``), then fine-tuning with the mask fixed;
* ``dpp``: DPP learns the N:M masks while fine-tuning (logits initialised from the weight
  magnitudes, so it starts from the magnitude mask), temperature annealed over the run;
* ``dpp-q8``: the same with 8-bit joint quantization (per-tensor symmetric fake quantization).

The run is cut into ``--epochs`` pseudo-epochs (equal slices of the training subset) so DPP's
per-epoch temperature schedule anneals within the budget. Confidence and diversity of DPP's
mask distributions are logged every ``--log-every`` steps and plotted. Stored bytes are the size
of the file ``hp.save`` writes for the finalized model.

    python bench/methods/dpp_resnet20.py --out bench/results/methods/dpp/dpp_resnet20
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
from torch.utils.data import Subset

import hwprune as hp
from common import ResultLog, arguments, command, header, parse, write_table
from hwprune.data import augment_cifar, data_dir, load_cifar10
from hwprune.models import load_pretrained
from hwprune.report.plots import mask_metric_curves
from hwprune.training import evaluate, make_loader, train_epoch

PATTERNS = ("2:4", "1:4")
METHODS = ("magnitude", "dpp", "dpp-q8")


def make_pruner(model, method: str, pattern: str, epochs: int, logit_lr: float):
    if method == "magnitude":
        return hp.Magnitude(model, pattern, None)
    return hp.DPP(model, pattern, anneal_epochs=epochs, logit_lr=logit_lr,
                  quantize_bits=8 if method == "dpp-q8" else None)


def mean_metrics(layers: dict) -> dict:
    keys = ("confidence", "diversity")
    return {k: sum(v[k] for v in layers.values()) / len(layers) for k in keys}


def run(model0, method: str, pattern: str, train, test, args, curves_out: Path) -> dict:
    torch.manual_seed(args.seed)
    model = copy.deepcopy(model0)
    pruner = make_pruner(model, method, pattern, args.epochs, args.logit_lr)
    test_loader = make_loader(test, 1000, shuffle=False)
    one_shot = evaluate(model, test_loader) if method == "magnitude" else None
    opt = torch.optim.SGD(pruner.param_groups(lr=args.lr, momentum=0.9, weight_decay=5e-4))
    slice_len = len(train) // args.epochs
    slices = [Subset(train, range(i * slice_len, (i + 1) * slice_len))
              for i in range(args.epochs)]
    steps = sum(len(make_loader(s, args.batch_size, shuffle=False)) for s in slices)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve: list[dict] = []
    step = 0

    def on_step():
        nonlocal step
        sched.step()
        step += 1
        if isinstance(pruner, hp.DPP) and (step % args.log_every == 0 or step == 1):
            layers = {n: {k: e[k] for k in ("confidence", "diversity")}
                      for n, e in pruner.layer_extras().items()}
            curve.append({"step": step, "temperature": pruner.tau, "layers": layers})

    start = time.perf_counter()
    for i, part in enumerate(slices):
        train_epoch(model, make_loader(part, args.batch_size, shuffle=True, seed=args.seed + i),
                    opt, pruner, augment=augment_cifar, on_step=on_step)
    seconds = time.perf_counter() - start
    extras = pruner.layer_extras()
    sparsity = pruner.sparsity()
    pruner.finalize()
    accuracy = evaluate(model, test_loader)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.hwp"
        hp.save(model, path)
        stored = path.stat().st_size
    record = {"pattern": pattern, "method": method, "seed": args.seed, "steps": steps,
              "sparsity": sparsity, "accuracy": accuracy, "one_shot_accuracy": one_shot,
              "stored_bytes": stored, "seconds": round(seconds, 1)}
    if curve:
        record.update(mean_metrics(extras))
        curves_out.with_name(f"{curves_out.name}_curves_{method}_{pattern.replace(':', 'of')}"
                             ".json").write_text(json.dumps(curve))
        mask_metric_curves(curve, curves_out.with_name(
            f"{curves_out.name}_curves_{method}_{pattern.replace(':', 'of')}.png"), x="step")
    return record


def write_summary(out: Path, records: list[dict], head: str, dense: dict) -> None:
    rows = []
    for r in records:
        conf = ((f"{r['confidence']:.3f}", f"{r['diversity']:.3f}") if "confidence" in r
                else ("-", "-"))
        one = f"{100 * r['one_shot_accuracy']:.2f}" if r["one_shot_accuracy"] else "-"
        rows.append([r["pattern"], r["method"], f"{100 * r['sparsity']:.1f}", one,
                     f"{100 * r['accuracy']:.2f}", f"{r['stored_bytes']:,}",
                     f"{dense['stored_bytes'] / r['stored_bytes']:.2f}x", *conf,
                     f"{r['seconds']:.0f}"])
    write_table(out.with_suffix(".md"), [
        head, "", f"Dense pretrained: {100 * dense['accuracy']:.2f} %, "
        f"{dense['stored_bytes']:,} bytes stored.", ""],
        ["pattern", "method", "sparsity %", "one-shot %", "accuracy %", "stored bytes",
         "vs dense", "DPP confidence", "DPP diversity", "train s"], "llrrrrrrrr", rows)


def main(argv=None) -> int:
    parser = arguments(__doc__, "path prefix for .jsonl, .md and plots", data_dir=True)
    parser.add_argument("--train-subset", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=10, help="pseudo-epochs (slices)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--logit-lr", type=float, default=20.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parse(parser, argv)
    out = Path(args.out)
    root = data_dir(args.data_dir)
    train = Subset(load_cifar10(root, train=True), range(args.train_subset))
    test = load_cifar10(root, train=False)
    model0 = load_pretrained(root / "weights" / "cifar10-resnet20-akamaster.th")
    log = ResultLog(out.with_suffix(".jsonl"), lambda r: (r["pattern"], r["method"], r["seed"]))
    with tempfile.TemporaryDirectory() as tmp:
        hp.save(model0, Path(tmp) / "dense.hwp")
        dense = {"accuracy": evaluate(model0, make_loader(test, 1000, shuffle=False)),
                 "stored_bytes": (Path(tmp) / "dense.hwp").stat().st_size}
    head = header("DPP against one-shot magnitude N:M on CIFAR-10 ResNet-20",
                  command(__file__, argv),
                  f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                  f"{torch.__version__} (shared with other jobs, so seconds are not comparable "
                  f"across rows). Budget, equal for all: {args.train_subset} training images in "
                  f"{args.epochs} slices, batch {args.batch_size}, SGD lr {args.lr} momentum 0.9 "
                  f"cosine per step, weight decay 5e-4; DPP logit lr {args.logit_lr}. Targets: "
                  "every conv but the first. Stored bytes: the `hp.save` file of the finalized "
                  "model (the whole model, BatchNorm and the dense first conv and classifier "
                  "included).")
    for pattern in args.patterns:
        for method in args.methods:
            if not log.done(pattern, method, args.seed):
                log.add(run(model0, method, pattern, train, test, args, out))
                write_summary(out, log.records, head, dense)
    write_summary(out, log.records, head, dense)
    return 0


if __name__ == "__main__":
    sys.exit(main())
