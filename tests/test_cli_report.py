"""``hwprune report CKPT``: a file hwprune.save wrote (with and without --model), a run folder
and its checkpoint (method extras and plots), and one-line errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import hwprune as hp
from hwprune.app.cli import main
from hwprune.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    hp.Magnitude(model, "2:4", None).finalize()
    path = tmp_path / "model.hwp"
    hp.save(model, path)
    return model, path


def test_hwp_file_alone_gives_storage_and_plots(saved, tmp_path, capsys):
    model, path = saved
    out = tmp_path
    assert main(["report", str(path), "--plots", str(out / "plots"), "--markdown",
                 str(out / "r.md"), "--json", str(out / "r.json")]) == 0
    rep = json.loads((out / "r.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == ["conv1.0.weight", "conv2.0.weight", "conv3.0.weight", "fc1.weight",
                          "fc2.weight"]
    assert rows["conv2.0.weight"]["encoding"] == "kofn"
    assert rows["conv2.0.weight"]["kept_elements"] == 0.5
    assert rows["conv2.0.weight"]["macs_dense"] is None  # no model, no forward pass
    # the report's accounting is the file's: tensors + header = its size, byte for byte
    t = rep["total"]
    assert t["file_bytes"] == path.stat().st_size
    assert t["file_bytes"] == t["file_tensor_bytes"] + t["file_header_bytes"]
    assert "| conv2.0.weight | kofn |" in (out / "r.md").read_text()
    printed = capsys.readouterr().out
    assert "model.hwp: storage" in printed and "note:" not in printed  # size on disk matches
    for name in ("kept_fractions.png", "masks.png"):
        assert (out / "plots" / name).read_bytes().startswith(PNG)
    # a compressed file reads the same; the report says its size on disk differs
    zpath = tmp_path / "z.hwp"
    hp.save(model, zpath, compress="zlib")
    assert main(["report", str(zpath)]) == 0
    assert f"has {zpath.stat().st_size:,} B on disk" in capsys.readouterr().out


def test_hwp_file_with_its_zoo_model_gives_macs(saved, tmp_path):
    model, path = saved
    js = tmp_path / "r.json"
    assert main(["report", str(path), "--model", "small_cnn", "--input-shape", "1,8,8",
                 "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    expected = hp.report(model, torch.zeros(1, 1, 8, 8))
    assert rep["total"]["macs_remaining"] == expected.total["macs_remaining"] > 0
    assert rep["total"]["stored_bytes"] == expected.total["stored_bytes"]


def tiny_recipe(tmp_path, method):
    recipe = {
        "name": f"tiny-{method['name'].lower()}",
        "model": {"name": "small_cnn", "args": {"width": 4}},
        "data": {"name": "digits", "test_subset": 120},
        "method": method,
        "optimizer": {"lr": 0.05, "finetune_lr": 0.02},
        "train": {"dense_epochs": 1, "prune_epochs": 2, "finetune_epochs": 0,
                  "steps_per_epoch": 3, "batch_size": 32},
        "end": {"latency": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("method, plot", [
    ({"name": "DARB", "ratio": 4.0}, "block_sizes.png"),
    ({"name": "DPP", "structure": "2:4", "anneal_epochs": 2}, "mask_metrics.png"),
])
def test_run_folder_and_checkpoint_give_method_extras_and_plots(tmp_path, method, plot):
    run = tmp_path / "run"
    assert main(["run", tiny_recipe(tmp_path, method), "--out", str(run)]) == 0
    # the run folder has the same method plots as the report writes (one plotting path)
    for name in (plot, "masks.png", "training.png"):
        assert (run / "plots" / name).read_bytes().startswith(PNG), name
    js, plots = tmp_path / "r.json", tmp_path / "plots"
    assert main(["report", str(run), "--json", str(js), "--plots", str(plots)]) == 0
    rep = json.loads(js.read_text())
    pruned = [r for r in rep["rows"] if r["extras"]]
    assert pruned and all(r["macs_dense"] > 0 for r in rep["rows"])
    if method["name"] == "DARB":
        assert all(len(r["extras"]["block_sizes"]) == r["shape"][0] for r in pruned)
    else:
        assert all(r["encoding"] == "kofn" and r["kept_elements"] <= 0.5 for r in pruned)
    assert (plots / plot).read_bytes().startswith(PNG)
    # the checkpoint file itself reads the same
    js2 = tmp_path / "r2.json"
    assert main(["report", str(run / "checkpoint.pt"), "--json", str(js2)]) == 0
    assert json.loads(js2.read_text())["total"] == rep["total"]


def test_errors_are_one_line(tmp_path, saved, capsys):
    _, path = saved
    bad = tmp_path / "bad.hwp"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    cases = [
        ([str(tmp_path / "missing.hwp")], "does not exist"),
        (["/dev/null"], "/dev/null is not a regular file"),
        ([str(tmp_path)], "without checkpoint.pt"),
        ([str(bad)], "damaged"),
        ([str(path), "--model", "resnet20"], "do not fit --model resnet20"),
        ([str(path), "--model", "nope"], "not a zoo model"),
        ([str(path), "--model", "small_cnn", "--input-shape", "1,x"], "--input-shape"),
    ]
    for args, message in cases:
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hwprune: error:") and message in err and err.count("\n") == 1
    assert Path(path).exists()
