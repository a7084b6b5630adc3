"""Coverage on torchvision models: every hwprune method, and hwprune against Torch-Pruning.

Random weights, ImageNet input (3 x 224 x 224). For each model:

* **methods**: each method at one representative structure is constructed with its default
  targets, trains ``--steps`` SGD steps (batch 2, mean squared error to random targets, the
  method's ``penalty()``, ``step()``, then ``epoch_end()``), is finalized, and the model is
  shrunk (``hp.shrink`` verifies the function on a batch of one). A row is ok/fail with the
  stage and the error's line; for ok rows the parameters and MACs per sample before and after
  shrink and the largest output difference of the shrunk model from the finalized one,
  relative to the output's scale.
* **against Torch-Pruning**: one-shot, no training. hwprune ``Magnitude("map", 0.3)`` +
  ``finalize()`` + ``hp.shrink`` against Torch-Pruning's ``MagnitudePruner`` at
  ``pruning_ratio=0.3`` (L1 importance, the logits layer ignored, defaults otherwise, as a new
  user calls it), each on a fresh copy of the same model. MACs per sample by hwprune's counter
  for both; seconds: hwprune's prune + finalize + shrink, Torch-Pruning's pruner construction +
  ``step()``. Torch-Pruning removes channels whose weights are not zero, so its output
  difference is not a check of anything and is not reported.

Needs the zoo venv (``make zoo``)::

    nohup nice -n 10 .venv-zoo/bin/python bench/zoo/zoo_coverage.py &

Writes bench/results/zoo/zoo_coverage.jsonl (one record per finished row, resumable), .json
and .md (rewritten after each row).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch
import torch.nn.functional as F
import torchvision

import hwprune as hp
from common import (
    RESULTS,
    ResultLog,
    arguments,
    command,
    header,
    machine,
    parse,
    table,
    write_json,
    write_lines,
)
from zoo.peer import attempt, macs, params, relative_diff, torch_pruning

OUT = RESULTS / "zoo"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "densenet121", "googlenet", "shufflenet_v2_x1_0", "regnet_x_400mf", "convnext_tiny",
          "vit_b_16", "squeezenet1_1"]
RATIO = 0.3


def _methods(x1: torch.Tensor) -> dict:
    """{row label: a function of the model that builds the pruner}."""
    return {
        "Magnitude channel 0.3": lambda m: hp.Magnitude(m, "channel", RATIO),
        "Magnitude map 0.3": lambda m: hp.Magnitude(m, "map", RATIO, example_inputs=x1),
        "PSP map fixed 0.3": lambda m: hp.PSP(m, "map", variant="fixed", sparsity=RATIO,
                                              example_inputs=x1),
        "DPP 2:4": lambda m: hp.DPP(m, "2:4", anneal_epochs=1),
        "ADMM block:1x4": lambda m: hp.ADMM(m, block=(1, 4), unify=0.25, zero=0.25, rho=0.05,
                                            admm_interval=1, retrain_at=2),
        "DARB 8x": lambda m: hp.DARB(m, ratio=8),
    }


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def train(model: torch.nn.Module, pruner: hp.Pruner, steps: int) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        out = model(torch.randn(2, 3, 224, 224, generator=gen))
        out = out[0] if isinstance(out, tuple) else out  # GoogLeNet's aux outputs in training
        loss = F.mse_loss(out, torch.randn(out.shape, generator=gen)) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    pruner.epoch_end()
    model.eval()


def method_row(name: str, label: str, build, steps: int, x1: torch.Tensor) -> dict:
    rec = {"model": name, "row": label, "ok": True}
    start = time.perf_counter()
    model = model_of(name)
    dense_macs, dense_params = macs(model, x1), params(model)
    pruner = attempt("construct", lambda: build(model), rec)
    if pruner is not None:
        attempt("train", lambda: train(model, pruner, steps), rec)
    if rec["ok"]:
        rec["skipped_layers"] = len(pruner.skipped)
        rec["sparsity"] = round(float(pruner.sparsity()), 4)
        final = attempt("finalize", pruner.finalize, rec)
        if final is not None:
            t = time.perf_counter()
            res = attempt("shrink", lambda: hp.shrink(final, x1, return_result=True), rec)
            if res is not None:
                rec.update(shrink_seconds=round(time.perf_counter() - t, 2),
                           params_dense=dense_params, params_shrunk=params(res.model),
                           macs_dense=dense_macs, macs_shrunk=macs(res.model, x1),
                           rel_diff=relative_diff(final, res.model, x1),
                           kept_groups=len(res.kept))
                rec["mac_reduction"] = round(dense_macs / rec["macs_shrunk"], 3)
    rec["seconds"] = round(time.perf_counter() - start, 1)
    return rec


def peer_rows(name: str, x1: torch.Tensor) -> list[dict]:
    """hwprune's one-shot map pruning + shrink, and Torch-Pruning's, on fresh copies."""
    dense = model_of(name)
    dense_macs, dense_params = macs(dense, x1), params(dense)
    hwp = {"model": name, "row": "hwprune map 0.3", "ok": True}
    start = time.perf_counter()
    final = attempt("prune", lambda: hp.Magnitude(model_of(name), "map", RATIO,
                                                  example_inputs=x1).finalize(), hwp)
    res = None if final is None else attempt(
        "shrink", lambda: hp.shrink(final, x1, return_result=True), hwp)
    if res is not None:
        hwp.update(seconds=round(time.perf_counter() - start, 2), model_out=res.model,
                   rel_diff=relative_diff(final, res.model, x1))
    tp = {"model": name, "row": "Torch-Pruning 0.3", "ok": True}
    got = attempt("prune", lambda: torch_pruning(model_of(name), x1, RATIO), tp)
    if got is not None:
        tp.update(seconds=round(got[1], 2), model_out=got[0])
        attempt("forward after pruning", lambda: relative_diff(got[0], got[0], x1), tp)
    for rec in (hwp, tp):
        out = rec.pop("model_out", None)
        if rec["ok"] and out is not None:
            rec.update(params_dense=dense_params, params_shrunk=params(out),
                       macs_dense=dense_macs, macs_shrunk=macs(out, x1))
            rec["mac_reduction"] = round(dense_macs / rec["macs_shrunk"], 3)
            rec["param_reduction"] = round(dense_params / rec["params_shrunk"], 3)
    return [hwp, tp]


def _status(r: dict) -> str:
    return "ok" if r["ok"] else f"fail ({r['stage']}): {r['error']}".replace("|", "/")


def _ratio(r: dict, key: str) -> str:
    return f"{r[key]:.2f}x" if r.get(key) is not None else "-"


def write_results(out: Path, records: list[dict], cmd: str, threads: int, steps: int) -> None:
    methods = [r for r in records if r.get("kind") == "method"]
    peers = [r for r in records if r.get("kind") == "peer"]
    ok = sum(r["ok"] for r in methods)
    lines = [header("torchvision zoo: every method, and hwprune against Torch-Pruning", cmd,
                    f"{machine()} (shared with other jobs), `torch.set_num_threads({threads})`",
                    inline=True), "",
             "Random weights, 3x224x224 input. MACs per sample (hwprune's counter, "
             "`hp.report`'s `model_macs`, for every model on both sides). `rel diff`: max "
             "|shrunk - finalized| / max |finalized| on a batch of one.", "",
             f"## Every method: construct, {steps} training steps, finalize, shrink", "",
             f"{ok} of {len(methods)} ok. `skipped`: default targets the method left dense "
             "because they cannot carry its structure (one warning names them); `kept`: "
             "groups shrink found zero but had to keep (`ShrinkResult.kept`).", ""]
    lines += table(["model", "method", "status", "sparsity", "skipped", "MAC reduction",
                    "params dense", "params shrunk", "rel diff", "kept", "shrink s"],
                   "lllrrrrrrrr",
                   [[r["model"], r["row"], _status(r), r.get("sparsity", "-"),
                     r.get("skipped_layers", "-"), _ratio(r, "mac_reduction"),
                     f"{r['params_dense']:,}" if "params_dense" in r else "-",
                     f"{r['params_shrunk']:,}" if "params_shrunk" in r else "-",
                     f"{r['rel_diff']:.1e}" if "rel_diff" in r else "-",
                     r.get("kept_groups", "-"), r.get("shrink_seconds", "-")] for r in methods])
    lines += ["", f"## hwprune `Magnitude(\"map\", {RATIO})` against Torch-Pruning at "
              f"`pruning_ratio={RATIO}`", "",
              "One-shot, no training. `seconds`: hwprune's prune + finalize + shrink (which "
              "traces and verifies), Torch-Pruning's pruner construction + `step()`.", ""]
    lines += table(["model", "pruner", "status", "MACs dense", "MACs after", "MAC reduction",
                    "params after", "param reduction", "rel diff", "seconds"], "lllrrrrrrr",
                   [[r["model"], r["row"], _status(r),
                     f"{r['macs_dense']:,}" if "macs_dense" in r else "-",
                     f"{r['macs_shrunk']:,}" if "macs_shrunk" in r else "-",
                     _ratio(r, "mac_reduction"),
                     f"{r['params_shrunk']:,}" if "params_shrunk" in r else "-",
                     _ratio(r, "param_reduction"),
                     f"{r['rel_diff']:.1e}" if "rel_diff" in r else "n/a",
                     r.get("seconds", "-")] for r in peers])
    finished = {r["model"] for r in peers if r["row"].startswith("Torch-Pruning")}
    missing = [m for m in MODELS if m not in finished]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)} (the run resumes where it stopped)."]
    write_lines(out.with_suffix(".md"), lines)
    write_json(out.with_suffix(".json"), records)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, None, threads=1)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--write-only", action="store_true",
                        help="rewrite the .md and .json from the .jsonl, run nothing")
    parser.add_argument("--out", type=Path, default=OUT / "zoo_coverage",
                        help="path prefix for .jsonl, .json and .md")
    args = parse(parser, argv)
    warnings.filterwarnings("ignore")  # skipped layers are counted in the table
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out.with_suffix(".jsonl"), key=lambda r: (r["model"], r["row"]))
    x1 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    given = sys.argv[1:] if argv is None else argv
    cmd = command(__file__, [a for a in given if a != "--write-only"])  # the run's command
    for name in [] if args.write_only else args.models:
        for label, build in _methods(x1).items():
            if not log.done(name, label):
                log.add({"kind": "method", **method_row(name, label, build, args.steps, x1)})
                write_results(out, log.records, cmd, args.threads, args.steps)
        if not log.done(name, "Torch-Pruning 0.3"):
            for rec in peer_rows(name, x1):
                log.add({"kind": "peer", **rec})
            write_results(out, log.records, cmd, args.threads, args.steps)
    write_results(out, log.records, cmd, args.threads, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
