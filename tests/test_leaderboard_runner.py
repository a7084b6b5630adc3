"""The leaderboard runner keeps the committed rows: in a checkout without the (uncommitted) run
folders, rewriting the table from the finished rows gives the committed table back."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "leaderboard"


@pytest.fixture(scope="module")
def leaderboard():
    spec = importlib.util.spec_from_file_location(
        "leaderboard_runner", ROOT / "bench" / "leaderboard" / "leaderboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("| ")]


def test_a_fresh_checkout_rewrites_the_committed_table_row_for_row(leaderboard, tmp_path):
    out = tmp_path / "leaderboard"
    shutil.copy(RESULTS / "leaderboard.json", out.with_suffix(".json"))
    runs = tmp_path / "runs"
    committed = json.loads(out.with_suffix(".json").read_text())
    made = leaderboard.restore_finished(out, runs)
    assert len(made) == len(committed) == len(leaderboard.finished(runs))
    leaderboard.main(["--out", str(out), "--runs", str(runs), "--table-only"])
    assert _table_rows(out.with_suffix(".md")) == _table_rows(RESULTS / "leaderboard.md")


def test_existing_run_folders_are_left_as_they_are(leaderboard, tmp_path):
    out = tmp_path / "leaderboard"
    shutil.copy(RESULTS / "leaderboard.json", out.with_suffix(".json"))
    runs = tmp_path / "runs"
    name = Path(json.loads(out.with_suffix(".json").read_text())[0]["dir"]).name
    (runs / name).mkdir(parents=True)
    (runs / name / "claimed-by").write_text("1")  # a row being run again: not finished
    made = leaderboard.restore_finished(out, runs)
    assert runs / name not in made and not (runs / name / "summary.json").exists()
    assert (runs / name / "claimed-by").read_text() == "1"
    assert leaderboard.restore_finished(out, runs) == []  # nothing left to restore
