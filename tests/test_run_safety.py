"""``hwprune run`` under misuse, through the installed command in a subprocess: --resume with
--force, non-finite numbers, two writers, a changed recipe on resume, stale temporary files,
recipes that name code (refused; --plugin is the way in), and augmentation a data set lacks.
Every refusal is one line on stderr, exit 2."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

SRC = Path(__file__).resolve().parents[1] / "src"


def cli(*args, cwd=None):
    """``python -m hwprune ARGS`` with this checkout's source; returns the finished process."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hwprune", *map(str, args)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_error(proc, *words):
    """Exit 2 and exactly one line on stderr, an hwprune error holding every word."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("hwprune: error:"), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def tiny(**changes):
    """A dense small CNN on digits: two epochs of two steps, no report, plots or timing."""
    recipe = {
        "name": "tiny",
        "model": {"name": "small_cnn", "args": {"width": 4}},
        "data": {"name": "digits", "test_subset": 60},
        "method": None,
        "train": {"dense_epochs": 2, "prune_epochs": 0, "steps_per_epoch": 2,
                  "batch_size": 16},
        "end": {"report": False, "plots": False, "latency": False},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            recipe.setdefault(section, {})[field] = value
        else:
            recipe[section] = value
    return recipe


def write(tmp_path, recipe, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def folder_state(out):
    """Every file under ``out`` with its bytes."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(Path(out).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of ``tiny()`` (made once; tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("finished")
    path = write(root, tiny())
    proc = cli("run", path, "--out", root / "out")
    assert proc.returncode == 0, proc.stderr
    return path, root / "out"


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- 1. --resume with --force ---------------------------------------------------------------------


def test_resume_with_force_is_refused_and_deletes_nothing(finished, tmp_path):
    path, src = finished
    out = copy_run(src, tmp_path / "out")
    before = folder_state(out)
    proc = cli("run", path, "--out", out, "--resume", "--force")
    one_line_error(proc, "--resume", "--force")
    assert folder_state(out) == before
    # an unfinished run: its checkpoint stays, and --resume alone still continues it
    (out / "summary.json").unlink()
    run_json = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_json, "status": "interrupted"}))
    before = folder_state(out)
    one_line_error(cli("run", path, "--out", out, "--force", "--resume"), "--resume")
    assert folder_state(out) == before


# -- 2. non-finite numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("item, field", [
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.lr=1e400", "optimizer.lr"),  # overflows to infinity
    ("optimizer.weight_decay=.nan", "optimizer.weight_decay"),
    ("model.args.dropout=-.inf", "model.args.dropout"),
    ("method.alpha_decay=.nan", "method.alpha_decay"),
])
def test_non_finite_numbers_are_refused_anywhere_in_a_recipe(tmp_path, item, field):
    sets = ["--set", "method.name=PSP"] if item.startswith("method.") else []
    proc = cli("run", write(tmp_path, tiny()), "--dry-run", *sets, "--set", item)
    one_line_error(proc, field, "a finite number")


def strict_json(text):
    """json.loads that refuses NaN and Infinity (which are not JSON)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # the schema allows lr 1e30: the first dense epoch (lr 0.05) is good, fine-tuning diverges
    recipe = tiny(**{"train.dense_epochs": 1, "train.finetune_epochs": 1,
                     "optimizer.finetune_lr": 1e30})
    out = tmp_path / "out"
    proc = cli("run", write(tmp_path, recipe), "--out", out)
    line = one_line_error(proc, "training loss became", "epoch 2, step", "finetune",
                          "checkpoint.pt")
    assert "lower optimizer.lr" in line
    from hwprune.app.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)  # the end of the good epoch
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    status = strict_json((out / "run.json").read_text())
    assert status["status"] == "failed" and "epoch 2" in status["error"]
    assert not (out / "summary.json").exists() and not (out / "model.hwp").exists()
    assert [r["epoch"] for r in map(strict_json, (out / "metrics.jsonl").read_text()
                                    .splitlines())] == [1]


def test_results_are_strict_json_with_null_for_non_finite_values(tmp_path, monkeypatch):
    from rich.console import Console

    from hwprune.app.loop import TrainingLoop
    from hwprune.app.recipe import resolve
    from hwprune.app.runner import Run

    # an evaluation whose loss overflows (a finite accuracy, an infinite mean loss)
    monkeypatch.setattr(TrainingLoop, "evaluate", lambda self, model=None: (math.inf, 0.5))
    run = Run(resolve(tiny(), name="tiny"), console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    summary = run.execute(tmp_path / "out")
    assert math.isinf(summary["test_loss"])  # the returned summary keeps the real value
    saved = strict_json((tmp_path / "out" / "summary.json").read_text())
    assert saved["test_loss"] is None and saved["accuracy"] == 0.5
    rows = [strict_json(line) for line in
            (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_loss"] for r in rows] == [None, None]


# -- 3. one writer per run folder -----------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    from hwprune.app.runlock import LOCK_NAME, RunLock

    path, out = write(tmp_path, tiny()), tmp_path / "out"
    out.mkdir()
    lock = RunLock(out)  # this process is the first writer
    lock.acquire()
    try:
        proc = cli("run", path, "--out", out)
        one_line_error(proc, "in use by another hwprune run", f"pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()
    proc = cli("run", path, "--out", out)  # the folder is free again
    assert proc.returncode == 0, proc.stderr
    assert not (out / LOCK_NAME).exists()  # released at the end of the run


def test_a_stale_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
    from hwprune.app.runlock import LOCK_NAME

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no live process now
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": "here"}))
    proc = cli("run", write(tmp_path, tiny()), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"stale lock of pid {gone.pid}" in " ".join(proc.stdout.split())
    assert strict_json((out / "run.json").read_text())["status"] == "finished"
    assert not (out / LOCK_NAME).exists()


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    proc = cli("run", write(tmp_path, tiny()), "--out", tmp_path / "new", "--resume")
    one_line_error(proc, "no checkpoint")
    assert not (tmp_path / "new").exists()


# -- 4. --resume with another recipe --------------------------------------------------------------


def test_resume_of_a_finished_run_with_another_recipe_is_refused_naming_the_field(finished,
                                                                                  tmp_path):
    path, src = finished
    out = copy_run(src, tmp_path / "out")
    before = folder_state(out)
    proc = cli("run", path, "--out", out, "--resume", "--set", "optimizer.lr=0.2")
    one_line_error(proc, "recipe field optimizer.lr", "0.2", "0.05")
    assert folder_state(out) == before
    proc = cli("run", path, "--out", out, "--resume")  # the same recipe: nothing to do
    assert proc.returncode == 0 and "nothing to resume" in proc.stdout, proc.stderr
    assert folder_state(out) == before


# -- 5. temporary files of a write that was killed ------------------------------------------------

KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from hwprune.app.checkpoint import save_checkpoint
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed before the rename
save_checkpoint(Path(sys.argv[1]) / "checkpoint.pt", {"epoch": 0})
"""


def unfinished_with_a_killed_checkpoint_write(src, out):
    """A copy of a run, marked interrupted, whose last checkpoint write was SIGKILLed."""
    copy_run(src, out)
    (out / "summary.json").unlink()
    (out / "run.json").write_text(json.dumps({"status": "interrupted", "name": "tiny"}))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out)], env=env, timeout=120)
    assert proc.returncode == -9
    stale = list(out.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0
    return out


@pytest.mark.parametrize("flag", ["--resume", "--force"])
def test_resume_and_force_remove_the_temporary_file_of_a_killed_write(finished, tmp_path,
                                                                      flag):
    path, src = finished
    out = unfinished_with_a_killed_checkpoint_write(src, tmp_path / "out")
    proc = cli("run", path, "--out", out, flag)
    assert proc.returncode == 0, proc.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert strict_json((out / "run.json").read_text())["status"] == "finished"


# -- 6. recipes are data; --plugin is the way in for code -----------------------------------------


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_recipe_naming_code_is_refused_and_runs_nothing(tmp_path, dry_run):
    marker = tmp_path / "pwned"
    recipe = tiny(**{"model.name": "os:system", "model.args": {"command": f"touch {marker}"}})
    out = tmp_path / "out"
    proc = cli("run", write(tmp_path, recipe), "--out", out, *(["--dry-run"] if dry_run else []))
    one_line_error(proc, "model.name", "'os:system'", "register_model", "--plugin")
    assert not marker.exists()  # the command never ran
    assert not out.exists()


PLUGIN = """
from hwprune.app.datasets import register_dataset
from hwprune.models import SmallCNN, register_model
import torch
from torch.utils.data import TensorDataset


def noise(root, data, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.arange(48) % 3
    return TensorDataset(x, y), TensorDataset(x[:12], y[:12]), {}


register_model("plugin_cnn", lambda width=4, num_classes=10: SmallCNN(width, num_classes))
register_dataset("noise", noise)
"""


def test_a_plugin_file_registers_what_a_recipe_then_names(tmp_path):
    plugin = tmp_path / "my_models.py"
    plugin.write_text(PLUGIN)
    recipe = write(tmp_path, tiny(**{"model.name": "plugin_cnn", "data": {"name": "noise"}}))
    out = tmp_path / "out"
    one_line_error(cli("run", recipe, "--out", out), "data.name", "noise", "--plugin")
    proc = cli("run", recipe, "--out", out, "--plugin", plugin)
    assert proc.returncode == 0, proc.stderr
    summary = strict_json((out / "summary.json").read_text())
    assert summary["model"] == "plugin_cnn" and summary["data"] == "noise"
    assert strict_json((out / "run.json").read_text())["status"] == "finished"


def test_a_failing_or_missing_plugin_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\nraise RuntimeError('no GPU here')\n")
    recipe = write(tmp_path, tiny())
    one_line_error(cli("run", recipe, "--plugin", bad, "--dry-run"),
                   f"--plugin {bad}, line 2", "RuntimeError", "no GPU here")
    one_line_error(cli("run", recipe, "--plugin", tmp_path / "none.py", "--dry-run"),
                   "no such file")


# -- 16. augmentation belongs to the data set -----------------------------------------------------


def test_augment_on_a_data_set_without_augmentation_is_refused(tmp_path):
    # CIFAR's crop and flip on 8 x 8 digits trained at chance
    proc = cli("run", write(tmp_path, tiny(**{"data.augment": True})), "--dry-run")
    one_line_error(proc, "data.augment", "'digits' has no augmentation", "cifar10")


def test_the_data_sets_own_augmentation_is_what_training_batches_get(monkeypatch):
    from torch.utils.data import TensorDataset

    from hwprune.app.build import build
    from hwprune.app.datasets import DATASETS, DatasetSpec
    from hwprune.app.phases import Plan
    from hwprune.app.recipe import resolve

    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 4

    def load(root, data, seed):
        return TensorDataset(x, y), TensorDataset(x[:8], y[:8]), {}

    def negate(batch, generator):
        assert isinstance(generator, torch.Generator)  # seeded per step: exact resume
        return -batch

    monkeypatch.setitem(DATASETS, "toy", DatasetSpec(load, needs_folder=False, augment=negate))
    for augment in (True, False):
        cfg = resolve({"model": {"name": "small_cnn", "args": {"width": 4}},
                       "data": {"name": "toy", "augment": augment},
                       "train": {"batch_size": 8}}, name="toy")
        parts = build(cfg)
        assert parts.augment is (negate if augment else None)
        plain = Plan(cfg, x, y)
        plan = Plan(cfg, x, y, parts.augment)
        for (_, got, _), (_, raw, _) in zip(plan.batches(0, 0), plain.batches(0, 0),
                                            strict=True):
            assert torch.equal(got, -raw if augment else raw)
