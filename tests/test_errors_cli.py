"""Every error of the ``hwprune`` command is one line on stderr naming the path or field and the
cause, with exit status 2 and no traceback, and nothing already written is lost (issue 17, items
12 and 13).

The cases the operating system can produce for real here (a file where a folder must be, a
folder where a file must be, a path under /proc, damaged input files) run the installed command
in subprocesses, all started together; the ones it cannot produce for a root user on an ordinary
disk (no permission, a read-only file system, a full disk) run ``main`` in process with the
failing system call injected.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import hwprune as hp
import hwprune.files
from hwprune.app.checkpoint import CheckpointError, load_checkpoint
from hwprune.app.cli import main
from hwprune.app.recipe import dump, resolve

SRC = Path(hwprune.__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")

#: a tiny run: two prune epochs of two steps on digits (three checkpoints: two epochs + none)
RECIPE = {
    "name": "tiny",
    "model": {"name": "small_cnn", "args": {"width": 4}},
    "data": {"name": "digits", "test_subset": 60},
    "method": {"name": "Magnitude", "structure": "element", "sparsity": 0.5},
    "train": {"prune_epochs": 2, "steps_per_epoch": 2, "batch_size": 16, "phase_hook": None},
    "end": {"latency": False, "plots": False},
}
SUMMARY = {"name": "a", "method": "Magnitude", "structure": "element", "accuracy": 0.9,
           "dense_accuracy": 0.95, "sparsity": 0.5, "pruning_ratio": 2.0, "stored_bytes": 100,
           "compression_ratio": 1.5, "model_macs_remaining": 1000, "latency_ms": 0.1,
           "dense_latency_ms": 0.2, "machine": "test", "command": "hwprune run a"}


def _scenarios(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{case: (arguments, words the error line must hold)}, their files written under root."""
    (root / "a-file").write_text("not a folder\n")
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    hp.save(nn.Sequential(nn.Linear(4, 4)), root / "model.hwp")
    run = root / "run"  # a finished run as compare sees it
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    bad = root / "bad-run"
    bad.mkdir()
    (bad / "summary.json").write_text(json.dumps({**SUMMARY, "accuracy": "high"}))
    lost = root / "no-recipe"  # an interrupted run whose recipe.yaml is gone
    lost.mkdir()
    (lost / "run.json").write_text(json.dumps({"status": "interrupted"}))
    torch.save({"format": "x"}, lost / "checkpoint.pt")
    cut = root / "truncated"  # a run folder whose checkpoint was cut short
    cut.mkdir()
    (cut / "recipe.yaml").write_text(dump(resolve(RECIPE)))
    torch.save({"weights": torch.zeros(5000)}, cut / "checkpoint.pt")
    data = (cut / "checkpoint.pt").read_bytes()
    (cut / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return {
        # item 12: OS errors
        "out under a file": (["run", "recipe.yaml", "--out", "a-file/sub"],
                             ["a-file/sub", "a-file is a file, not a folder"]),
        "out under /proc": (["run", "recipe.yaml", "--out", "/proc/hwprune-test/out"],
                            ["/proc/hwprune-test"]),
        "out a file, force": (["run", "recipe.yaml", "--out", "a-file", "--force"],
                              ["--out a-file is a file, not a folder"]),
        "report plots a file": (["report", "model.hwp", "--plots", "a-file"],
                                ["--plots a-file is a file, not a folder"]),
        "report json under a file": (["report", "model.hwp", "--json", "a-file/r.json"],
                                     ["--json a-file/r.json", "a-file is a file"]),
        "report json under /proc": (["report", "model.hwp", "--json", "/proc/hwprune-test.json"],
                                    ["/proc/hwprune-test.json"]),
        "compare markdown a folder": (["compare", "run", "--markdown", "run"],
                                      ["--markdown run is a folder"]),
        "compare plot under a file": (["compare", "run", "--plot", "a-file/p.png"],
                                      ["--plot a-file/p.png", "a-file is a file"]),
        # item 13: bad input
        "binary recipe": (["run", "binary.yaml", "--dry-run"],
                          ["binary.yaml", "not a text file"]),
        "huge seed": (["run", "recipe.yaml", "--set", f"seed={2**70}", "--dry-run"],
                      ["seed", str(2**70), "<= 4294967295"]),
        "huge count": (["run", "recipe.yaml", "--set", f"train.batch_size={2**70}",
                        "--dry-run"], ["train.batch_size", str(2**70)]),
        "string accuracy": (["compare", "run", "bad-run"],
                            ["bad-run/summary.json", "accuracy", "'high'", "a number"]),
        "resume without recipe.yaml": (["run", "recipe.yaml", "--out", "no-recipe", "--resume"],
                                       ["no-recipe/recipe.yaml"]),
        "out a file": (["run", "recipe.yaml", "--out", "a-file"],
                       ["--out a-file is a file, not a folder"]),
        "truncated checkpoint": (["report", "truncated"],
                                 ["truncated/checkpoint.pt", "the file is truncated"]),
        "export under a file": (["export", "model.hwp", "--model", "small_cnn", "--out",
                                 "a-file/m.pt2"], ["export --out a-file/m.pt2",
                                                   "a-file is a file"]),
        "shrink truncated checkpoint": (["shrink", "truncated", "--out", "s.hwp"],
                                        ["truncated/checkpoint.pt", "the file is truncated"]),
        "export another model's tensors": (["export", "model.hwp", "--model", "small_cnn",
                                            "--out", "m.pt2"],
                                           ["do not fit --model small_cnn"]),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case: (the case's words, the finished process)}: every case at once."""
    root = tmp_path_factory.mktemp("cli-errors")
    cases = _scenarios(root)
    assert list(cases) == CASES
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    done, running = {}, {}

    def collect(case):
        proc = running.pop(case)
        _, err = proc.communicate(timeout=300)
        done[case] = (cases[case][1], proc.returncode, err, root)

    for case, (args, _) in cases.items():  # a few at a time: each imports torch
        if len(running) == 4:
            collect(next(iter(running)))
        running[case] = subprocess.Popen([sys.executable, "-m", "hwprune", *args], cwd=root,
                                         env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    for case in list(running):
        collect(case)
    return done


def assert_one_line(returncode, stderr, words):
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("hwprune: error: "), stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


CASES = ["out under a file", "out under /proc", "out a file, force", "report plots a file",
         "report json under a file", "report json under /proc", "compare markdown a folder",
         "compare plot under a file", "binary recipe", "huge seed", "huge count",
         "string accuracy", "resume without recipe.yaml", "out a file", "truncated checkpoint",
         "export under a file", "shrink truncated checkpoint", "export another model's tensors"]


@pytest.mark.parametrize("case", CASES)
def test_the_command_fails_in_one_line(outcomes, case):
    words, returncode, stderr, root = outcomes[case]
    assert_one_line(returncode, stderr, words)
    assert (root / "a-file").read_text() == "not a folder\n"  # nothing it names is replaced


# -- in process: the system calls a root user on an ordinary disk never sees fail -------------


def refuse_writes(monkeypatch, under: Path, code: int):
    """Every write below ``under`` (open for writing, os.open with a write flag, mkdir)
    fails with ``code``, as on a read-only file system or a folder without permission."""
    import builtins
    import io

    under = under.resolve()
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def inside(path):
        try:
            p = Path(os.fspath(path)).resolve()
        except TypeError:  # a file descriptor
            return False
        return p == under or under in p.parents

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def fake_open(file, mode="r", *args, **kw):
        if any(c in mode for c in "wax+") and inside(file):
            fail(file)
        return real_open(file, mode, *args, **kw)

    def fake_os_open(path, flags, *args, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            fail(path)
        return real_os_open(path, flags, *args, **kw)

    def fake_mkdir(path, *args, **kw):
        if inside(path):
            fail(path)
        return real_mkdir(path, *args, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def run_main(capsys, args):
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return str(path)


@pytest.mark.parametrize("where", ["out", "parent"])
@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_an_unwritable_out_folder_is_one_line(tmp_path, recipe, capsys, monkeypatch, where,
                                              code):
    parent = tmp_path / "parent"
    out = parent / "out"
    out.mkdir(parents=True)
    refuse_writes(monkeypatch, out if where == "out" else parent, code)
    if where == "parent":
        out.rmdir()
    code_, err = run_main(capsys, ["run", recipe, "--out", str(out)])
    assert_one_line(code_, err, [str(out), os.strerror(code)])


def test_report_json_on_a_read_only_file_system_is_one_line(tmp_path, capsys, monkeypatch):
    hp.save(nn.Sequential(nn.Linear(4, 4)), tmp_path / "model.hwp")
    target = tmp_path / "ro" / "report.json"
    target.parent.mkdir()
    refuse_writes(monkeypatch, target.parent, errno.EROFS)
    code, err = run_main(capsys, ["report", str(tmp_path / "model.hwp"), "--json", str(target)])
    assert_one_line(code, err, [str(target), "Read-only file system"])


def test_compare_plot_on_a_read_only_file_system_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(SUMMARY))
    target = tmp_path / "ro" / "plot.png"
    target.parent.mkdir()
    refuse_writes(monkeypatch, target.parent, errno.EROFS)
    code, err = run_main(capsys, ["compare", str(tmp_path / "run"), "--plot", str(target)])
    assert_one_line(code, err, [str(target), "Read-only file system"])


@pytest.mark.parametrize("full_at", [1, 2], ids=["first checkpoint", "later checkpoint"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(
        tmp_path, recipe, capsys, monkeypatch, full_at):
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # write_atomic's fsync: the first write that reaches the disk
        calls.append(fd)
        if len(calls) == full_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(hwprune.files.os, "fsync", fsync)
    code, err = run_main(capsys, ["run", recipe, "--out", str(out)])
    line = assert_one_line(code, err, [str(out / "checkpoint.pt"), "No space left on device"])
    assert not list(out.glob(".*.tmp"))  # the half-written temporary file is gone
    if full_at == 1:
        assert "no checkpoint yet" in line and not (out / "checkpoint.pt").exists()
        return
    assert "the previous checkpoint is kept" in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the first epoch's, intact
    monkeypatch.undo()
    assert main(["run", recipe, "--out", str(out), "--resume"]) == 0  # nothing was lost
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("cut", [0, 10, 100, 1000, -22, -1])
def test_a_truncated_checkpoint_says_it_is_truncated(tmp_path, cut):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "x", "weights": torch.zeros(2000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=rf"{path}: (the file is truncated|not a torch)"):
        load_checkpoint(path)


# -- item 17: text printed through rich is printed whole ----------------------------------------


def test_messages_with_brackets_are_printed_whole(tmp_path):
    """Without matplotlib the run says how to get it, ``[plots]`` included (rich would read it
    as markup and drop it), and a run named with brackets keeps them in the CLI's lines and
    in compare's table."""
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {**RECIPE, "name": "tiny[1]", "end": {"latency": False, "plots": True}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(fake.parent), str(SRC)])}

    def hwprune_(*args):
        return subprocess.run([sys.executable, "-m", "hwprune", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    run = hwprune_("run", "recipe.yaml", "--out", "out")
    assert run.returncode == 0, run.stderr
    assert "plots skipped: plots need matplotlib: pip install 'hwprune[plots]'" in run.stdout
    assert "tiny[1]: accuracy" in run.stdout
    compare = hwprune_("compare", "out")
    assert compare.returncode == 0, compare.stderr
    assert "tiny[1]" in compare.stdout


def _prints_text_as_markup(call) -> bool:
    """A ``<console>.print("text")`` / ``print(f"...")`` call without ``markup=False``."""
    import ast

    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "print" and call.args):
        return False
    text = call.args[0]
    is_text = isinstance(text, ast.JoinedStr) or (isinstance(text, ast.Constant)
                                                  and isinstance(text.value, str))
    markup_off = any(k.arg == "markup" and isinstance(k.value, ast.Constant)
                     and k.value.value is False for k in call.keywords)
    return is_text and not markup_off


def test_every_message_the_app_prints_through_rich_is_plain_text():
    """Messages carry paths, names and errors, none of which is rich markup."""
    import ast

    app = SRC / "hwprune" / "app"
    found = [f"{path.name}:{node.lineno}" for path in sorted(app.glob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and _prints_text_as_markup(node)]
    assert found == []
