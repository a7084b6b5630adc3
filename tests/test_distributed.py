"""Every method under DistributedDataParallel: 2 CPU processes with gloo.

One spawn runs all the distributed work (process start-up dominates on a small CPU) and
saves each rank's results; the tests below compare them across ranks, against one process
training on the whole batch, and against what a distributed ``Run`` wrote.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import hwprune as hp
from hwprune import distributed
from hwprune.schedules import Cubic, Linear

from conftest import TinyNet

METHODS = {
    "magnitude": lambda m: hp.Magnitude(m, "channel", 0.5, schedule=Cubic(0, 8, every=2)),
    "psp": lambda m: hp.PSP(m, "channel", alpha_decay=0.05, alpha_lr=0.5, threshold=0.5,
                            threshold_mode="absolute"),
    "dpp": lambda m: hp.DPP(m, "2:4", anneal_epochs=3, entropy_weight=1e-3),
    "admm": lambda m: hp.ADMM(m, block=(1, 4), unify=0.25, zero=0.25, rho=0.05,
                              admm_interval=3, retrain_at=8),
    "darb": lambda m: hp.DARB(m, 4.0, schedule=Linear(0, 8, every=2)),
}
STEPS, EPOCH = 12, 4  # epoch_end() every EPOCH steps
WORLD = 2
RECIPE = {  # a distributed Run: dense -> prune (DPP: shared noise) -> finetune
    "name": "ddp-tiny", "seed": 0, "model": {"name": "small_cnn"},
    "data": {"name": "digits", "train_subset": 256, "test_subset": 128},
    "method": {"name": "DPP", "structure": "2:4", "anneal_epochs": 2},
    "optimizer": {"lr": 0.05},
    "train": {"dense_epochs": 1, "prune_epochs": 2, "finetune_epochs": 1, "batch_size": 32,
              "steps_per_epoch": 4},
    "end": {"plots": False, "latency": False},
}
STOP_AT = 6  # rank 1 alone asks to stop at this global step (the 2nd epoch, 4 steps each)


def _model(seed):
    """TinyNet without BatchNorm: per-rank batch statistics would make DDP differ from one
    process on the whole batch, which is what the test compares with."""
    torch.manual_seed(seed)
    model = TinyNet()
    model.bn1, model.bn2 = nn.Identity(), nn.Identity()
    return model


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 10, generator=g)


def _train(model, pruner, x, y):
    """Full-batch MSE (mean over the rank's rows), the pruner's lifecycle, epochs of EPOCH."""
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05, momentum=0.9))
    for step in range(1, STEPS + 1):
        loss = F.mse_loss(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if step % EPOCH == 0:
            pruner.epoch_end()


def _record(pruner, model):
    state = pruner.state_dict()
    rec = {"masks": pruner.masks(), "layers": state["layers"], "extra": state["extra"],
           "extras": pruner.layer_extras(), "method_params": _method_param_ids_in_model(pruner)}
    rec["final"] = {k: v.clone() for k, v in pruner.finalize().state_dict().items()}
    return rec


def _method_param_ids_in_model(pruner):
    """Whether every learnable parameter of the method (alphas, logits, ADMM magnitudes) is
    in model.parameters(): DDP all-reduces only those gradients."""
    own = [p for g in pruner.param_groups(lr=0.1)[1:] for p in g["params"]]
    in_model = {id(p) for p in pruner.model.parameters()}
    return len(own), all(id(p) in in_model for p in own)


def _run(cfg, out, on_step=None):
    from rich.console import Console

    from hwprune.app.runner import Run

    return Run(cfg, console=Console(file=open(os.devnull, "w")), on_step=on_step).execute(out)


def _worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    root = Path(root)
    x, y = _data()
    for name, make in METHODS.items():
        model = _model(seed=rank)  # a different model on each rank: rank 0's must win
        pruner = make(model)
        ddp = nn.parallel.DistributedDataParallel(model)  # wrapped after the pruner
        _train(ddp, pruner, x[rank::WORLD], y[rank::WORLD])
        del ddp
        torch.save(_record(pruner, model), root / f"{name}-{rank}.pt")

    # a Run: uninterrupted, then stopped by rank 1 alone and resumed; rank 1 is given its
    # own (never used) folder to show that it writes nothing
    from hwprune.app.recipe import resolve
    from hwprune.app.runner import Interrupted, Run

    cfg = resolve(RECIPE)
    mine = (lambda p: root / p) if rank == 0 else (lambda p: root / f"{p}-rank1")
    summary = _run(cfg, mine("straight"))
    run = Run(cfg, on_step=lambda s: s == STOP_AT and rank == 1 and run.request_stop())
    run.console.quiet = True
    try:
        run.execute(mine("resumed"))
        stopped = None
    except Interrupted as e:
        stopped = str(e)
    if rank == 0:
        shutil.copytree(root / "resumed", root / "interrupted")  # for the torchrun test
    dist.barrier()
    resumed = Run(cfg, console=run.console)
    resumed_summary = resumed.execute(mine("resumed"), resume=True)
    torch.save({"summary": summary, "stopped": stopped, "resumed_summary": resumed_summary,
                "final": resumed.model.state_dict(), "masks": resumed.pruner.masks()},
               root / f"run-{rank}.pt")
    run.close()  # drops its DDP wrapper; the group is this worker's to end
    resumed.close()
    distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def _load(root, name):
    return [torch.load(root / f"{name}-{r}.pt", weights_only=False) for r in range(WORLD)]


def _metrics(out):
    """Per-epoch metrics without the wall time."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


# -- every method: the ranks agree, and DDP is one process on the whole batch -----------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_rank_holds_the_same_pruner_and_finalized_weights(ranks, method):
    r0, r1 = _load(ranks, method)
    assert any(not m.all() for m in r0["masks"].values()), "the run must prune something"
    _assert_same(r0["masks"], r1["masks"], "masks")
    _assert_same(r0["layers"], r1["layers"], "layers")  # alphas, logits, Z, U, patterns
    _assert_same(r0["extra"], r1["extra"], "extra")  # DPP's generator, DARB's sizes, rho
    _assert_same(r0["extras"], r1["extras"], "extras")  # what the report shows
    _assert_same(r0["final"], r1["final"], "final")
    for name, mask in r0["masks"].items():  # the finalized weights carry exactly the masks
        assert torch.equal(r0["final"][name] != 0, mask), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ddp_on_two_shards_equals_one_process_on_the_whole_batch(ranks, method):
    """Rank 0's model (seed 0) trained on the whole batch in this process: the same masks,
    and weights to float tolerance. Were the alphas', logits' or magnitudes' gradients not
    all-reduced, rank 0 would have followed its own half of the batch."""
    r0, _ = _load(ranks, method)
    with distributed.local():
        model = _model(seed=0)
        pruner = METHODS[method](model)
        x, y = _data()
        _train(model, pruner, x, y)
        ref = _record(pruner, model)
    _assert_same(ref["masks"], r0["masks"], "masks")
    for k, v in ref["final"].items():
        torch.testing.assert_close(r0["final"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_parameters_are_model_parameters_so_ddp_reduces_them(ranks, method):
    count, inside = _load(ranks, method)[0]["method_params"]
    assert inside
    assert count > 0 or method in ("magnitude", "darb")  # masks only: nothing to learn


# -- hwprune run, distributed ------------------------------------------------------------------


def test_only_rank_0_writes_and_every_rank_has_the_reported_model(ranks):
    r0, r1 = _load(ranks, "run")
    assert not (ranks / "straight-rank1").exists() and not (ranks / "resumed-rank1").exists()
    assert r0["summary"] == r1["summary"]
    assert r0["summary"]["world_size"] == WORLD
    _assert_same(r0["masks"], r1["masks"], "masks")
    _assert_same(r0["final"], r1["final"], "final")
    saved = hp.load(ranks / "resumed" / "model.hwp")
    for k, v in r1["final"].items():  # what rank 0 stored is what rank 1 holds
        assert torch.equal(saved[k], v), k
    rows = {row["name"]: row for row in
            json.loads((ranks / "resumed" / "report.json").read_text())["rows"]}
    for name, mask in r1["masks"].items():  # and what the report counts
        assert rows[name]["kept_params"] == int(mask.sum()), name


def test_a_stop_asked_by_one_rank_stops_all_and_the_run_resumes_exactly(ranks):
    r0, r1 = _load(ranks, "run")
    # rank 1's request is agreed in the all-reduce of the next step: both stop after it
    assert "at epoch 2, step 3;" in r0["stopped"] and "at epoch 2, step 3;" in r1["stopped"]
    lines = (ranks / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the first epoch was complete when the stop came
    straight = hp.load(ranks / "straight" / "model.hwp")
    resumed = hp.load(ranks / "resumed" / "model.hwp")
    _assert_same(straight, resumed, "model.hwp")
    assert _metrics(ranks / "straight") == _metrics(ranks / "resumed")
    assert r0["resumed_summary"]["accuracy"] == r0["summary"]["accuracy"]


def test_torchrun_resumes_the_interrupted_run_from_the_command_line(ranks, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ranks / "interrupted", out)
    from hwprune.app.recipe import dump, resolve

    recipe = tmp_path / "ddp-tiny.yaml"
    recipe.write_text(dump(resolve(RECIPE)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
         "--master_port", str(_free_port()), "-m", "hwprune", "run", str(recipe),
         "--out", str(out), "--resume"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ddp-tiny: accuracy") == 1  # rank 0 speaks for the run
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    _assert_same(hp.load(ranks / "straight" / "model.hwp"), hp.load(out / "model.hwp"),
                 "model.hwp")


# -- wrapping rules (a world of one process: DDP works, hwprune's collectives are no-ops) ------


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shrink_wants_the_bare_model_and_its_result_is_wrapped_anew(world_of_one, x8):
    assert not distributed.is_distributed()
    model = _model(0)
    pruner = hp.Magnitude(model, "filter", 0.5)
    ddp = nn.parallel.DistributedDataParallel(model)  # after the pruner
    ddp(x8).square().mean().backward()
    pruned = pruner.finalize()
    with pytest.raises(hp.ShrinkError, match=r"ddp\.module"):
        hp.shrink(ddp, x8)
    small = hp.shrink(pruned, x8)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in
                                                               pruned.parameters())
    ddp = nn.parallel.DistributedDataParallel(small.train())  # new parameters: a new wrapper
    ddp(x8).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters())


def test_a_run_ends_only_the_process_group_it_started(world_of_one):
    from rich.console import Console

    from hwprune.app.recipe import resolve
    from hwprune.app.runner import Run

    run = Run(resolve(RECIPE), console=Console(file=open(os.devnull, "w")))
    run.close()
    assert dist.is_initialized()  # the caller's group: the caller ends it


def test_shutdown_waits_for_the_ranks_then_ends_the_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    distributed.shutdown()
    assert not dist.is_initialized()
    distributed.shutdown()  # nothing to end: a no-op, not an error
