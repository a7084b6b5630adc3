"""The command line: the demo runs end to end; bad arguments are one clear line."""

import json

import pytest

from hwprune.cli import DEMO_STRUCTURES, main


def test_demo_runs_and_writes_its_table(tmp_path, capsys):
    assert main(["demo", "--epochs", "3", "--finetune-epochs", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert [r["structure"] for r in rows] == ["dense"] + [s for s, _ in DEMO_STRUCTURES]
    dense = rows[0]
    assert dense["accuracy"] > 0.8  # 3 epochs on digits already learn most of it
    for r in rows[1:]:
        assert r["params"] < dense["params"] and r["macs"] < dense["macs"]
        assert r["accuracy"] > 0.5
    out = capsys.readouterr().out
    assert "2:4" in out and "MACs" in out


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--epochs", "many"],
                                  ["bogus"]])
def test_bad_arguments_are_one_clear_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("hwprune") and ("positive integer" in err[-1] or "invalid" in err[-1])
