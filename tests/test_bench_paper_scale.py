"""The GPU paper-scale script, run at a tiny scale on the CPU (synthetic data, 2 steps per
epoch): every run finishes and is recorded, and DPP's feature-map masks remove exactly the
fraction magnitude filter pruning removes from the same layers."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "paper_scale.py"


@pytest.fixture(scope="module")
def paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_records_every_variant(paper_scale, tmp_path):
    rc = paper_scale.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--synthetic",
                           "--tiny-images", "16", "--batch-size", "8", "--decays", "1e-3"])
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "paper_scale.jsonl").read_text().splitlines()]
    by = {r["variant"]: r for r in records}
    assert set(by) == {"psp-decay-0.001", "magnitude-column", "dpp-filter-25",
                       "magnitude-filter-25"}
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["mac_reduction"])
    # a quarter of the maps of stages 3-4 kept by both: the same weights are gone
    assert by["dpp-filter-25"]["sparsity"] == pytest.approx(by["magnitude-filter-25"]["sparsity"])
    assert by["dpp-filter-25"]["sparsity"] > 0.5
    md = (tmp_path / "paper_scale.md").read_text()
    assert "smoke run" in md and "| dpp | dpp-filter-25 |" in md


def test_resume_skips_finished_runs(paper_scale, tmp_path):
    args = ["--out", str(tmp_path), "--device", "cpu", "--tiny", "--synthetic",
            "--tiny-images", "16", "--batch-size", "8", "--jobs", "psp", "--decays", "1e-3"]
    assert paper_scale.main(args) == 0
    first = (tmp_path / "paper_scale.jsonl").read_text()
    assert paper_scale.main(args) == 0  # nothing left to run: the log is unchanged
    assert (tmp_path / "paper_scale.jsonl").read_text() == first
