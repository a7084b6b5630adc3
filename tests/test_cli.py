"""The command line: the demo runs end to end; bad arguments are one clear line."""

import json

import pytest

from hwprune.app.cli import main
from hwprune.app.demo import DEMO_RECIPES


def test_demo_runs_every_method_and_writes_one_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summaries = {d: json.loads((tmp_path / d / "summary.json").read_text())
                 for d in ("dense", *DEMO_RECIPES)}
    dense = summaries.pop("dense")
    assert dense["method"] == "dense" and dense["sparsity"] == 0.0
    methods = {s["method"] for s in summaries.values()}
    assert methods == {"Magnitude", "PSP", "DPP", "ADMM", "DARB"}
    for name, s in summaries.items():
        # every method starts from the dense run's weights and saves a real, smaller file
        assert s["dense_accuracy"] == dense["accuracy"], name
        assert (tmp_path / name / "model.hwp").stat().st_size == s["file_bytes"], name
        assert s["latency_ms"] > 0 and s["dense_latency_ms"] > 0, name
    table = (tmp_path / "demo.md").read_text()
    assert all(f"| {name} |" in table for name in DEMO_RECIPES)
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--seed", "many"], ["bogus"]])
def test_bad_arguments_are_one_clear_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("hwprune") and "invalid" in err[-1]
