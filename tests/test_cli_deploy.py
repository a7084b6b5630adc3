"""``hwprune shrink CKPT`` and ``hwprune export CKPT``: a run folder's deployable model is the
one the run saved (bit for bit), a saved file with its zoo model exports and runs, and bad
input is one line with no file left behind."""

from pathlib import Path

import pytest
import torch
import yaml

import hwprune as hp
from hwprune.app.cli import main
from hwprune.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished run of a tiny recipe whose end re-estimates BatchNorm and shrinks the model
    (filters pruned by magnitude, so that whole channels go)."""
    tmp = tmp_path_factory.mktemp("deploy")
    recipe = {
        "name": "tiny-filter",
        "model": {"name": "small_cnn", "args": {"width": 8}},
        "data": {"name": "digits", "test_subset": 120},
        "method": {"name": "Magnitude", "structure": "filter", "sparsity": 0.5},
        "optimizer": {"lr": 0.05},
        "train": {"dense_epochs": 1, "prune_epochs": 1, "finetune_epochs": 1,
                  "steps_per_epoch": 3, "batch_size": 32},
        "end": {"latency": False, "shrink": True, "plots": False, "recalibrate_bn": 2},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp / "run"
    # one thread, as the tests that rebuild it run: BatchNorm's re-estimated statistics are
    # sums whose rounding depends on the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(path), "--out", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_shrink_of_a_run_writes_the_tensors_the_run_saved(run_folder, tmp_path, capsys):
    out = tmp_path / "s.hwp"
    assert main(["shrink", str(run_folder), "--out", str(out)]) == 0
    assert out.read_bytes() == (run_folder / "model.hwp").read_bytes()
    printed = capsys.readouterr().out
    assert "Magnitude filter, finalized" in printed and "shrunk: params 20,706 ->" in printed
    # the checkpoint file names the same run
    out2 = tmp_path / "s2.hwp"
    assert main(["shrink", str(run_folder / "checkpoint.pt"), "--out", str(out2)]) == 0
    assert out2.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("suffix", ["pt2", "pt"])
def test_export_of_a_run_carries_the_saved_weights_and_runs(run_folder, tmp_path, suffix):
    out = tmp_path / f"m.{suffix}"
    assert main(["export", str(run_folder), "--out", str(out)]) == 0
    saved = hp.load(run_folder / "model.hwp")
    if suffix == "pt2":
        program = torch.export.load(str(out))
        weights, run = program.state_dict, program.module()
    else:
        program = torch.jit.load(str(out))
        weights, run = program.state_dict(), program
    assert set(weights) == set(saved)
    for name, t in saved.items():  # the program holds exactly the tensors the run saved
        assert torch.equal(weights[name], t), name
    assert weights["conv2.0.weight"].shape[0] < 16  # shrunk: half the filters are gone
    x = torch.rand(3, 1, 8, 8)  # any batch size (the run's example has one)
    with torch.no_grad():
        assert run(x).shape == (3, 10)
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    if suffix == "pt2":  # --static-batch: the example's batch size alone
        static = tmp_path / "static.pt2"
        assert main(["export", str(run_folder), "--out", str(static), "--static-batch"]) == 0
        with pytest.raises(Exception, match="batch|size|shape|Expected"):
            torch.export.load(str(static)).module()(x)


def test_export_of_a_saved_file_with_its_zoo_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = SmallCNN()
    hp.Magnitude(model, "filter", 0.5).finalize()
    path = tmp_path / "model.hwp"
    hp.save(model, path)
    out = tmp_path / "m.pt"
    assert main(["export", str(path), "--model", "small_cnn", "--input-shape", "1,8,8",
                 "--out", str(out), "--fold-batchnorm"]) == 0
    assert "BatchNorm folded" in capsys.readouterr().out
    program = torch.jit.load(str(out))
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        ref, got = model.eval()(x), program(x)
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    kept = sum(t.numel() for t in program.state_dict().values())
    assert kept < sum(t.numel() for t in model.state_dict().values())
    # --no-shrink: the finalized model as it is, every weight still there
    full = tmp_path / "full.pt"
    assert main(["export", str(path), "--model", "small_cnn", "--input-shape", "1,8,8",
                 "--out", str(full), "--no-shrink"]) == 0
    assert torch.jit.load(str(full)).state_dict()["conv2.0.weight"].shape == (
        model.state_dict()["conv2.0.weight"].shape)


def test_shrink_says_where_it_removed_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "dense.hwp"
    hp.save(SmallCNN(), path)  # no zero channel anywhere
    out = tmp_path / "s.hwp"
    assert main(["shrink", str(path), "--model", "small_cnn", "--input-shape", "1,8,8",
                 "--out", str(out)]) == 0
    assert "shrink removed nothing" in capsys.readouterr().out
    assert out.read_bytes() == path.read_bytes()  # the same tensors, the same file


def test_errors_are_one_line_and_leave_no_file(run_folder, tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "model.hwp"
    hp.save(SmallCNN(), path)
    cases = [
        (["export", str(path), "--out", str(tmp_path / "m.pt2")], "holds tensors alone"),
        (["shrink", str(tmp_path / "missing"), "--out", str(tmp_path / "s.hwp")],
         "does not exist"),
        (["export", str(run_folder), "--out", str(tmp_path / "m.bin")],
         "cannot tell the format of 'm.bin'"),
        (["export", str(run_folder), "--out", str(tmp_path)], "is a folder"),
        (["shrink", str(run_folder), "--out", str(tmp_path / "s.hwp"), "--model",
          "small_cnn"], "--model applies to .hwp files"),
        (["export", str(path), "--model", "small_cnn", "--input-shape", "0,8",
          "--out", str(tmp_path / "m.pt")], "--input-shape"),
        (["export", str(run_folder), "--out", str(tmp_path / "m.pt2"), "--format", "tflite"],
         "invalid choice"),
        (["shrink", str(run_folder)], "--out"),
    ]
    for args, message in cases:
        assert _status(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["model.hwp"]


def _status(args: list[str]) -> int:
    """The exit status of ``hwprune ARGS`` (argparse's own errors exit)."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code
