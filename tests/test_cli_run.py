"""``hwprune run`` / ``hwprune compare`` end to end: tiny recipes (a few steps on digits) for
every method through the CLI, the output folder's contents and the metrics' sanity, a run
interrupted mid-epoch (SIGINT, in process and in a subprocess) and resumed to the bitwise same
result, the rules for existing output folders, and one-line errors for bad recipes."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import hwprune as hp
from hwprune.app.cli import main
from hwprune.app.recipe import load_recipe
from hwprune.app.runner import Interrupted, Run
from hwprune.methods import all_methods, get_method
from hwprune.schedules import Schedule


def _recipe_value(value):
    """A registry configuration value as a recipe writes it (YAML lists and mappings)."""
    if isinstance(value, Schedule):
        return {"type": type(value).__name__.lower(), **vars(value)}
    return list(value) if isinstance(value, tuple) else value


# every registered method, with its first tiny configuration (it prunes within a few steps)
METHODS = {spec.name: {"name": spec.name, **{k: _recipe_value(v) for k, v in
                                             spec.config(spec.structures[0]).items()}}
           for spec in all_methods()}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method="PSP", **train):
    """A tiny recipe: small CNN on digits, 1 dense + 2 prune + 1 finetune epochs of 3 steps.
    No phase hook: the registry's configurations are complete in themselves (ADMM retrains
    from its retrain_at step)."""
    return {
        "name": f"tiny-{method.lower()}",
        "model": {"name": "small_cnn", "args": {"width": 4}},
        "data": {"name": "digits", "test_subset": 120},
        "method": dict(METHODS[method]),
        "optimizer": {"lr": 0.05, "finetune_lr": 0.02},
        "train": {"dense_epochs": 1, "prune_epochs": 2, "finetune_epochs": 1,
                  "steps_per_epoch": 3, "batch_size": 32, "phase_hook": None, **train},
        "end": {"latency": False},
    }


def write(tmp_path, recipe, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def metrics(out):
    """metrics.jsonl without the wall-clock field (the rest must repeat exactly)."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def same_model(a, b):
    ta, tb = hp.load(Path(a) / "model.hwp"), hp.load(Path(b) / "model.hwp")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# -- every method through the CLI ---------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_tiny_recipe_runs_through_the_cli_for_every_method(tmp_path, method, capsys):
    out = tmp_path / "out"
    assert main(["run", write(tmp_path, tiny(method)), "--out", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt",
                 "report.md", "report.json", "summary.json", "model.hwp"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # the resolved recipe is complete and runs again as it is
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["method"]["name"] == method and resolved["optimizer"]["name"] == "sgd"
    assert resolved["model"]["args"] == {"width": 4, "num_classes": 10}

    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["phase"] for r in rows] == ["dense", "prune", "prune", "finetune"]
    assert [r["steps"] for r in rows] == [3, 6, 9, 12]
    for r in rows:
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
    assert rows[0]["sparsity"] == 0.0  # no pruner in the dense phase
    assert rows[-1]["sparsity"] > 0.0
    with (out / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["test_accuracy"]) for r in table] == [r["test_accuracy"] for r in rows]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 12
    assert summary["sparsity"] == pytest.approx(rows[-1]["sparsity"])
    assert summary["pruning_ratio"] > 1.0 and summary["kept_params"] < summary["params"]
    assert summary["file_bytes"] == (out / "model.hwp").stat().st_size
    assert summary["machine"] and summary["command"].startswith("hwprune run")
    report = json.loads((out / "report.json").read_text())
    assert report["total"]["kept_params"] == summary["kept_params"]
    # the saved model is the finalized one: its pruned weights are exact zeros
    saved = hp.load(out / "model.hwp")
    kept = sum(int(saved[r["name"]].count_nonzero()) for r in report["rows"])
    assert kept == summary["kept_params"]


def test_dense_run_without_a_method_and_plots(tmp_path):
    recipe = tiny()
    recipe["method"] = None
    recipe["end"]["latency"] = True
    out = tmp_path / "dense"
    assert main(["run", write(tmp_path, recipe), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dense" and summary["sparsity"] == 0.0
    assert summary["pruning_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert summary["latency_ms"] > 0 and summary["dense_latency_ms"] > 0
    assert (out / "plots" / "training.png").stat().st_size > 0
    assert (out / "plots" / "kept_fractions.png").stat().st_size > 0


# -- resume -------------------------------------------------------------------------------------


def _sigint_at(step):
    def hook(global_step):
        if global_step == step:
            os.kill(os.getpid(), signal.SIGINT)
    return hook


def _run(cfg, out, **kw):
    from rich.console import Console

    return Run(cfg, console=Console(file=open(os.devnull, "w")), **kw)  # noqa: SIM115


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted runs of ``tiny(method, finetune_epochs=2)``, made once per method."""
    done = {}

    def get(method):
        if method not in done:
            root = tmp_path_factory.mktemp(f"straight-{method}")
            cfg = load_recipe(write(root, tiny(method, finetune_epochs=2)))
            _run(cfg, root / "out").execute(root / "out")
            done[method] = (cfg, root / "out")
        return done[method]
    return get


@pytest.mark.parametrize("method, stop", [(m, 8) for m in METHODS] + [("PSP", 3), ("PSP", 5)])
def test_sigint_mid_epoch_then_resume_gives_the_same_result(tmp_path, straight_runs, method,
                                                            stop):
    # stop 8: mid-way through the 3rd epoch (prune); 3: the last step of the dense phase;
    # 5: mid-epoch right after the pruner was created
    cfg, straight = straight_runs(method)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted, match="--resume"):
        _run(cfg, out, on_step=_sigint_at(stop)).execute(out)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not (out / "summary.json").exists()
    assert len(metrics(out)) == (stop - 1) // 3  # the epochs completed before the signal
    _run(cfg, out).execute(out, resume=True)
    assert metrics(out) == metrics(straight)
    assert same_model(out, straight)


def test_resume_in_the_finetune_phase_replays_the_phase_switch(tmp_path):
    # ADMM's hook (hard_project) changes what trains; the resumed run must replay it
    recipe = tiny("ADMM", finetune_epochs=2, phase_hook="hard_project")
    recipe["method"] = {"name": "ADMM", "block": [1, 4], "unify": 0.5, "zero": 0.25,
                        "admm_interval": 2}
    cfg = load_recipe(write(tmp_path, recipe))
    _run(cfg, tmp_path / "a").execute(tmp_path / "a")
    with pytest.raises(Interrupted):  # step 14: inside the second fine-tuning epoch
        _run(cfg, tmp_path / "b", on_step=_sigint_at(14)).execute(tmp_path / "b")
    assert [r["phase"] for r in metrics(tmp_path / "b")][-1] == "finetune"
    _run(cfg, tmp_path / "b").execute(tmp_path / "b", resume=True)
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
    assert same_model(tmp_path / "b", tmp_path / "a")
    # the hook ran: the pattern was fixed when fine-tuning began (zero blocks are zeros)
    assert metrics(tmp_path / "a")[-1]["sparsity"] > 0.0


@pytest.mark.parametrize("method", ["DPP", "PSP"])
def test_resume_after_fix_pattern_replays_it_and_the_pattern_stays_fixed(tmp_path, method):
    # fine-tuning starts with fix_pattern (the default hook): DPP stops sampling, PSP stops
    # re-testing; a run stopped inside fine-tuning resumes to the same model
    recipe = tiny(method, finetune_epochs=2, phase_hook="fix_pattern")
    cfg = load_recipe(write(tmp_path, recipe))
    _run(cfg, tmp_path / "a").execute(tmp_path / "a")
    with pytest.raises(Interrupted):  # step 14: inside the second fine-tuning epoch
        _run(cfg, tmp_path / "b", on_step=_sigint_at(14)).execute(tmp_path / "b")
    _run(cfg, tmp_path / "b").execute(tmp_path / "b", resume=True)
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
    assert same_model(tmp_path / "b", tmp_path / "a")


def test_a_killed_subprocess_resumes_to_the_same_result(tmp_path):
    # a real Ctrl-C to a real `hwprune run`, at whatever moment it lands
    recipe = tiny("DPP", dense_epochs=1, prune_epochs=4,
                  finetune_epochs=1, steps_per_epoch=10)
    path = write(tmp_path, recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hwprune.app.cli", "run", path, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    log = out / "metrics.jsonl"
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    done = len(metrics(out))
    assert 1 <= done < 6
    assert main(["run", path, "--out", str(out), "--resume"]) == 0
    cfg = load_recipe(path)
    _run(cfg, tmp_path / "straight").execute(tmp_path / "straight")
    assert metrics(out) == metrics(tmp_path / "straight")
    assert same_model(out, tmp_path / "straight")


@pytest.mark.parametrize("method", [m for m in METHODS if "map" in get_method(m).structures])
def test_a_feature_map_recipe_gets_example_inputs_and_shrinks_whole_maps(tmp_path, method):
    # "map" traces the model: the runner hands the method one test input (a recipe cannot)
    recipe = tiny(method)
    recipe["method"] = {"name": method,
                        **{k: _recipe_value(v) for k, v in
                           get_method(method).config("map").items()}}
    recipe["end"] = {"latency": False, "shrink": True}
    out = tmp_path / "out"
    assert main(["run", write(tmp_path, recipe), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structure"] == "map" and summary["sparsity"] > 0.0
    # whole maps are gone: the shrunk model computes fewer MACs than the dense one
    assert summary["model_macs"] < summary["dense_model_macs"]
    # and the ratios are against the dense model, not the shrunk one's own weights
    assert summary["params"] < summary["dense_params"]
    assert summary["pruning_ratio"] == pytest.approx(
        summary["dense_params"] / summary["kept_params"])
    assert summary["pruning_ratio"] > summary["params"] / summary["kept_params"]


# -- output folders -----------------------------------------------------------------------------


def test_the_deployable_is_shrunk_and_folded_when_the_recipe_says_so(tmp_path):
    recipe = tiny("Magnitude", dense_epochs=1, prune_epochs=1, finetune_epochs=0)
    recipe["end"] = {"latency": True, "shrink": True, "fold_batchnorm": True}
    recipe["method"] = {"name": "Magnitude", "structure": "channel", "sparsity": 0.5}
    out = tmp_path / "out"
    assert main(["run", write(tmp_path, recipe), "--out", str(out)]) == 0
    stored = hp.load(out / "model.hwp")
    assert not [k for k in stored if "running_mean" in k]  # every BatchNorm went into a conv
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latency_ms"] > 0 and summary["kept_params"] < summary["params"]


def test_finished_runs_are_kept_unless_forced(tmp_path, capsys):
    path = write(tmp_path, tiny("Magnitude", dense_epochs=0, prune_epochs=1, finetune_epochs=0))
    out = tmp_path / "out"
    assert main(["run", path, "--out", str(out)]) == 0
    before = (out / "model.hwp").read_bytes()
    stamp = (out / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished run" in err[0] and "--force" in err[0]
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    # --resume of a finished run has nothing to do
    assert main(["run", path, "--out", str(out), "--resume"]) == 0
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    (out / "notes.txt").write_text("mine")  # not a result file: --force leaves it alone
    assert main(["run", path, "--out", str(out), "--force", "--set", "seed=1"]) == 0
    assert (out / "model.hwp").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["seed"] == 1


def test_unfinished_runs_need_resume_or_force_and_the_same_recipe(tmp_path, capsys):
    cfg = load_recipe(write(tmp_path, tiny("PSP")))
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        _run(cfg, out, on_step=_sigint_at(2)).execute(out)
    path = write(tmp_path, tiny("PSP"))
    capsys.readouterr()
    assert main(["run", path, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", path, "--out", str(out), "--resume", "--set", "optimizer.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optimizer.lr" in err and "0.1" in err and "0.05" in err
    assert main(["run", path, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# -- bad recipes --------------------------------------------------------------------------------


def _bad(recipe_changes):
    recipe = tiny("PSP")
    for key, value in recipe_changes.items():
        section, _, field = key.partition(".")
        if field:
            recipe[section][field] = value
        else:
            recipe[section] = value
    return recipe


@pytest.mark.parametrize("changes, words", [
    ({"train.epochs": 3}, ["train.epochs", "unknown key", "prune_epochs"]),
    ({"optimizer.lr": "fast"}, ["optimizer.lr", "'fast'", "a number > 0"]),
    ({"optimizer.lr": -1}, ["optimizer.lr", "-1", "a number > 0"]),
    ({"train.batch_size": 2.5}, ["train.batch_size", "2.5", "integer >= 1"]),
    ({"optimizer.name": "lion"}, ["optimizer.name", "'lion'", "sgd, adam, adamw"]),
    ({"bogus": 1}, ["bogus", "unknown key", "optimizer"]),
    ({"method.alpha_dekay": 0.1}, ["method.alpha_dekay", "unknown parameter of PSP",
                                   "alpha_decay"]),
    ({"method.threshold": -0.5}, ["method", "threshold", "-0.5", "(0, inf)"]),
    ({"method.name": "Lottery"}, ["method.name", "'Lottery'", "PSP"]),
    ({"method.structure": "2:4"}, ["method", "2:4", "DPP"]),
    ({"model.name": "resnet9000"}, ["model.name", "resnet9000", "resnet20"]),
    ({"model.name": "builtins:print"}, ["model.name", "never name code", "--plugin"]),
    ({"train.phase_hook": "__init__"}, ["train.phase_hook", "a public pruner method"]),
    ({"train.phase_hook": "finalize"}, ["train.phase_hook", "'finalize'", "PSP (fix_pattern)"]),
    ({"data.name": "cifar10", "data.dir": "/no/such/folder"}, ["data.dir", "/no/such/folder"]),
    ({"data.name": "imagenet"}, ["data.name", "'imagenet'", "cifar10"]),
    ({"model.pretrained": "/no/such.pt"}, ["model.pretrained", "/no/such.pt", "no such file"]),
])
def test_bad_recipes_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, changes, words):
    out = tmp_path / "out"
    assert main(["run", write(tmp_path, _bad(changes)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hwprune: error:"), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not out.exists()


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "wide.pt"
    torch.save(hp.models.SmallCNN(width=8).state_dict(), ckpt)
    out = tmp_path / "out"
    recipe = _bad({"model.pretrained": str(ckpt)})
    assert main(["run", write(tmp_path, recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pretrained" in err[0] and "does not fit" in err[0]
    assert "shape mismatch" in err[0] and "conv1.0.weight" in err[0]
    assert not out.exists()
    # a checkpoint that fits is loaded: the run starts from its weights
    good = tmp_path / "good.pt"
    torch.manual_seed(5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in
                               hp.models.SmallCNN(width=4).state_dict().items()}}, good)
    cfg = load_recipe(write(tmp_path, _bad({"model.pretrained": str(good)})))
    run = _run(cfg, out)
    assert torch.equal(run.model.state_dict()["conv1.0.weight"],
                       torch.load(good)["state_dict"]["module.conv1.0.weight"])


def test_set_overrides_and_their_errors(tmp_path, capsys):
    path = write(tmp_path, tiny("PSP"))
    assert main(["run", path, "--dry-run", "--set", "optimizer.lr=1e-3",
                 "--set", "method.alpha_decay=0.25"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optimizer"]["lr"] == 1e-3 and resolved["method"]["alpha_decay"] == 0.25
    assert main(["run", path, "--set", "optimizer.lr"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["run", path, "--set", "optimizer.lrr=0.1"]) == 2
    assert "optimizer.lrr" in capsys.readouterr().err
    assert main(["run", "no-such-recipe"]) == 2
    assert "psp-digits" in capsys.readouterr().err  # the shipped ones are listed


# -- compare ------------------------------------------------------------------------------------


def test_compare_makes_one_table_and_one_plot(tmp_path, capsys):
    dirs = []
    for method in ("Magnitude", "PSP"):
        out = tmp_path / method
        recipe = tiny(method, dense_epochs=1, prune_epochs=1, finetune_epochs=0)
        recipe["end"]["plots"] = False
        assert main(["run", write(tmp_path, recipe, f"{method}.yaml"), "--out", str(out)]) == 0
        dirs.append(str(out))
    capsys.readouterr()
    md, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert main(["compare", *dirs, "--markdown", str(md), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "tiny-magnitude" in table and "tiny-psp" in table and "pruning ratio" in table
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| run | method |") and len([x for x in lines if
                                                          x.startswith("| tiny-")]) == 2
    summary = json.loads((tmp_path / "PSP" / "summary.json").read_text())
    assert f"{summary['accuracy']:.2%}" in md.read_text()
    assert png.stat().st_size > 0
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no finished run" in capsys.readouterr().err

