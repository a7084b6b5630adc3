"""Paper-scale runs for a lent GPU, as one script that fits a fixed time budget.

Two jobs, each against magnitude pruning at the same budget, written as a user's own training
loop over the public API (``pruner.param_groups()``, ``penalty()``, ``step()``,
``epoch_end()``, ``finalize()``), with the whole data set resident on the device:

* **psp**: PSP column pruning of the pretrained CIFAR-10 ResNet-56, one run per alpha decay
  (alpha learning rate = the weights', relative threshold), then fine-tuning with the pruned
  columns held at zero; the baseline prunes the same column fraction by L1 norm at once and
  fine-tunes for the same number of epochs.
* **dpp**: ResNet-18 trained from scratch with DPP feature-map masks keeping a quarter of the
  maps of stages 3 and 4 (the authors' setting: SGD 0.1, noise 0.05, entropy weight 5e-3,
  temperature 5 -> 0.5 over the whole run); the baseline is magnitude filter pruning of the
  same layers on a cubic schedule over the same epochs.

The epochs of each run follow from ``--minutes``: a few timed steps of each model first, then
as many epochs as fit the job's share. Results go to ``OUT/paper_scale.jsonl`` (one record per
finished run, written at once) and ``OUT/paper_scale.md``.

    python bench/gpu/paper_scale.py --out "$OUT" --minutes 9           # on the GPU
    python bench/gpu/paper_scale.py --out /tmp/ps --device cpu --tiny --synthetic  # smoke
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import hwprune as hp
from common import ResultLog, arguments, command, header, machine, parse, write_table
from hwprune import data as hdata

PRETRAINED = "weights/cifar10-resnet56-akamaster.th"
PSP_TARGETS = "layer*"  # the stem conv and the classifier stay dense
DPP_TARGETS = ["layer3.*", "layer4.*"]  # the reference gates stages 3-4 only
SHARES = {"psp": 0.55, "dpp": 0.45}  # of the time budget


def load_data(args, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 (or, with --synthetic, random tensors of its shape) on ``device``."""
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        n_train, n_test = (args.tiny_images, args.tiny_images) if args.tiny else (50_000, 10_000)
        xs = [torch.randn(n, 3, 32, 32, generator=g) for n in (n_train, n_test)]
        ys = [torch.randint(0, 10, (n,), generator=g) for n in (n_train, n_test)]
        train_x, test_x, train_y, test_y = xs[0], xs[1], ys[0], ys[1]
    else:
        root = hdata.data_dir(args.data_dir)
        train_x, train_y = hdata.load_cifar10(root, train=True).tensors
        test_x, test_y = hdata.load_cifar10(root, train=False).tensors
        if args.tiny:
            train_x, train_y = train_x[:args.tiny_images], train_y[:args.tiny_images]
            test_x, test_y = test_x[:args.tiny_images], test_y[:args.tiny_images]
    return tuple(t.to(device) for t in (train_x, train_y, test_x, test_y))


class Budget:
    """Epochs that fit a share of the time, from a few timed steps of the model."""

    def __init__(self, args, train_x: Tensor):
        self.args, self.n = args, len(train_x)

    def steps_per_epoch(self) -> int:
        return self.args.steps if self.args.tiny else self.n // self.args.batch_size

    def epochs(self, step_seconds: float, seconds: float, runs: int) -> int:
        if self.args.tiny:
            return 2
        per_epoch = step_seconds * self.steps_per_epoch() * 1.15  # eval and mask updates
        return max(2, int(seconds / runs / per_epoch))


def timed_step_seconds(model: nn.Module, train_x: Tensor, batch_size: int) -> float:
    """Seconds of one plain training step (after warm-up), synchronised on a GPU."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = train_x[:batch_size], torch.zeros(batch_size, dtype=torch.long, device=train_x.device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    sync(train_x.device)
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    sync(train_x.device)
    return (time.perf_counter() - t0) / 5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(train_x: Tensor, train_y: Tensor, epoch: int, steps: int, batch_size: int,
            seed: int):
    """Seeded shuffled batches of one epoch, augmented on the device."""
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed + epoch))
    for step in range(steps):
        idx = perm[step * batch_size:(step + 1) * batch_size].to(train_x.device)
        g = torch.Generator().manual_seed((seed + epoch) * 100_003 + step)
        yield hdata.augment_cifar(train_x[idx], generator=g), train_y[idx]


@torch.no_grad()
def accuracy(model: nn.Module, test_x: Tensor, test_y: Tensor) -> float:
    model.eval()
    correct = sum(int((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum())
                  for i in range(0, len(test_x), 1000))
    model.train()
    return correct / len(test_x)


def train(model: nn.Module, data, epochs: int, steps: int, args, pruner=None,
          lr: float = 0.05, keep: dict[nn.Parameter, Tensor] | None = None) -> None:
    """SGD with a cosine schedule; the pruner's penalty and steps when there is one; the
    zeros in ``keep`` (a 0/1 mask per weight) held after every step."""
    train_x, train_y = data[0], data[1]
    settings = {"lr": lr, "momentum": 0.9, "weight_decay": args.weight_decay}
    groups = (pruner.param_groups(**settings) if pruner is not None else
              [{"params": [p for p in model.parameters() if p.requires_grad], **settings}])
    opt = torch.optim.SGD(groups, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    model.train()
    for epoch in range(epochs):
        for x, y in batches(train_x, train_y, epoch, steps, args.batch_size, args.seed):
            loss = F.cross_entropy(model(x), y)
            if pruner is not None:
                loss = loss + pruner.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if pruner is not None:
                pruner.step()
            if keep:
                with torch.no_grad():
                    for p, m in keep.items():
                        p.mul_(m)
        if pruner is not None:
            pruner.epoch_end()


def zeros_kept(model: nn.Module) -> dict[nn.Parameter, Tensor]:
    """A 0/1 mask of every conv and linear weight's non-zeros (fine-tuning keeps them)."""
    return {m.weight: (m.weight != 0).to(m.weight.dtype) for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}


def record(job: str, variant: str, model: nn.Module, data, epochs: dict, seconds: float,
           example: Tensor, **extra) -> dict:
    acc = accuracy(model, data[2], data[3])
    total = hp.report(model.cpu(), example.cpu()).total
    return {"job": job, "variant": variant, "accuracy": acc,
            "sparsity": 1 - total["kept_params"] / total["params"],
            "mac_reduction": total["mac_reduction"], "epochs": epochs,
            "seconds": round(seconds, 1), **extra}


def psp_job(args, data, budget: Budget, log: ResultLog, device: torch.device) -> None:
    steps = budget.steps_per_epoch()
    factory = lambda: pretrained_resnet56(args, device)  # noqa: E731
    step_s = timed_step_seconds(factory(), data[0], args.batch_size)
    runs = len(args.decays) + 1
    epochs = budget.epochs(step_s, args.minutes * 60 * SHARES["psp"], runs)
    prune_epochs, tune_epochs = max(1, epochs * 3 // 4), max(1, epochs - epochs * 3 // 4)
    split = {"prune": prune_epochs, "finetune": tune_epochs}
    sparsities = []
    for decay in args.decays:
        if log.done("psp", f"psp-decay-{decay:g}"):
            continue
        t0 = time.perf_counter()
        model = factory()
        pruner = hp.PSP(model, "column", alpha_decay=decay, threshold_mode="relative",
                        threshold=args.psp_threshold, targets=PSP_TARGETS)
        train(model, data, prune_epochs, steps, args, pruner=pruner, lr=args.psp_lr)
        model = pruner.finalize()
        train(model, data, tune_epochs, steps, args, lr=args.psp_lr / 5, keep=zeros_kept(model))
        rec = record("psp", f"psp-decay-{decay:g}", model, data, split,
                     time.perf_counter() - t0, data[2][:1], alpha_decay=decay)
        sparsities.append(rec["sparsity"])
        log.add(rec)
    done = [r["sparsity"] for r in log.records if r["job"] == "psp" and "alpha_decay" in r]
    if not log.done("psp", "magnitude-column") and done:
        t0 = time.perf_counter()
        model = factory()
        # the baseline matches the sparsest PSP run's column fraction, one-shot, same epochs
        target = min(max(done), 0.95)
        model = hp.Magnitude(model, "column", target, targets=PSP_TARGETS).finalize()
        train(model, data, epochs, steps, args, lr=args.psp_lr / 5, keep=zeros_kept(model))
        log.add(record("psp", "magnitude-column", model, data, {"finetune": epochs},
                       time.perf_counter() - t0, data[2][:1], target_sparsity=target))


def pretrained_resnet56(args, device: torch.device) -> nn.Module:
    model = hp.models.get_model("resnet56", shortcut="A")
    if not args.synthetic:
        state = torch.load(hdata.data_dir(args.data_dir) / PRETRAINED, map_location="cpu",
                           weights_only=True)
        state = state.get("state_dict", state)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()},
                              strict=False)
    return model.to(device)


def dpp_job(args, data, budget: Budget, log: ResultLog, device: torch.device) -> None:
    steps = budget.steps_per_epoch()
    step_s = timed_step_seconds(hp.models.get_model("resnet18").to(device), data[0],
                                args.batch_size)
    epochs = budget.epochs(step_s, args.minutes * 60 * SHARES["dpp"], 2)
    if not log.done("dpp", "dpp-filter-25"):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = hp.models.get_model("resnet18").to(device)
        pruner = hp.DPP(model, "filter", k=0.25, targets=DPP_TARGETS, noise_scale=0.05,
                        entropy_weight=5e-3, temperature=(5.0, 0.5), anneal_epochs=epochs,
                        seed=args.seed)
        train(model, data, epochs, steps, args, pruner=pruner, lr=0.1)
        log.add(record("dpp", "dpp-filter-25", pruner.finalize(), data, {"prune": epochs},
                       time.perf_counter() - t0, data[2][:1]))
    if not log.done("dpp", "magnitude-filter-25"):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = hp.models.get_model("resnet18").to(device)
        ramp = hp.schedules.Cubic(0, max(1, epochs - 1), unit="epoch")
        pruner = hp.Magnitude(model, "filter", 0.75, schedule=ramp, targets=DPP_TARGETS)
        train(model, data, epochs, steps, args, pruner=pruner, lr=0.1)
        log.add(record("dpp", "magnitude-filter-25", pruner.finalize(), data,
                       {"prune": epochs}, time.perf_counter() - t0, data[2][:1]))


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "folder for paper_scale.jsonl and .md", data_dir=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--minutes", type=float, default=9.0, help="the whole budget")
    parser.add_argument("--jobs", nargs="+", default=["psp", "dpp"], choices=["psp", "dpp"])
    parser.add_argument("--decays", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--psp-threshold", type=float, default=0.05)
    parser.add_argument("--psp-lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: few images, 2 epochs")
    parser.add_argument("--tiny-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="steps per epoch with --tiny")
    parser.add_argument("--synthetic", action="store_true",
                        help="random CIFAR-shaped data and no pretrained weights (smoke only)")
    args = parse(parser, argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no GPU is visible; use --device cpu for a smoke run")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out / "paper_scale.jsonl", key=lambda r: (r["job"], r["variant"]))
    data = load_data(args, device)
    budget = Budget(args, data[0])
    jobs = {"psp": psp_job, "dpp": dpp_job}
    for job in args.jobs:
        jobs[job](args, data, budget, log, device)
    rows = [(r["job"], r["variant"], f"{r['accuracy']:.2%}", f"{r['sparsity']:.1%}",
             f"{r['mac_reduction']:.2f}x",
             " + ".join(f"{n} {phase}" for phase, n in r["epochs"].items()), r["seconds"])
            for r in log.records]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    smoke = " (a smoke run: synthetic or tiny data, not a result)" if args.tiny or args.synthetic \
        else ""
    write_table(out / "paper_scale.md",
                [header("Paper-scale PSP and DPP runs against magnitude pruning",
                        command(__file__, argv), machine()),
                 "", f"Device: {where}{smoke}", ""],
                ["job", "variant", "accuracy", "sparsity of conv/linear weights",
                 "MAC reduction", "epochs", "seconds"], "llrrrlr", rows)
    return 0 if all(math.isfinite(r["accuracy"]) for r in log.records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
