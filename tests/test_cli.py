"""The command line: the demo runs end to end; bad arguments are one clear line."""

import json

import pytest

from hwprune.app.cli import build_parser, main
from hwprune.app.demo import demo_recipes
from hwprune.methods import all_methods


def test_demo_runs_every_method_and_writes_one_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summaries = {d: json.loads((tmp_path / d / "summary.json").read_text())
                 for d in ("dense", *demo_recipes())}
    dense = summaries.pop("dense")
    assert dense["method"] == "dense" and dense["sparsity"] == 0.0
    methods = {s["method"] for s in summaries.values()}
    assert methods == {spec.name for spec in all_methods()}  # one run per registered method
    for name, s in summaries.items():
        # every method starts from the dense run's weights and saves a real, smaller file
        assert s["dense_accuracy"] == dense["accuracy"], name
        assert (tmp_path / name / "model.hwp").stat().st_size == s["file_bytes"], name
        assert s["latency_ms"] > 0 and s["dense_latency_ms"] > 0, name
    table = (tmp_path / "demo.md").read_text()
    assert all(f"| {name} |" in table for name in demo_recipes())
    assert "speed-up" in capsys.readouterr().out


def test_the_method_list_and_the_help_come_from_the_registry(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [spec.name for spec in all_methods()]
    for spec, line in zip(all_methods(), lines, strict=True):
        assert spec.recipe in line and f"docs/{spec.doc}" in line
        assert ", ".join(spec.structures) in line
    help_text = " ".join(build_parser().format_help().split())
    assert all(spec.name in help_text for spec in all_methods())


@pytest.mark.parametrize("argv", [["demo", "--seed", "many"], ["bogus"]])
def test_bad_arguments_are_one_clear_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("hwprune") and "invalid" in err[-1]
