"""The complete examples of docs/integrations-lightning.md and docs/integrations-transformers.md
run as written."""

import re
from pathlib import Path

import torch

import hwprune as hp

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_example(page: str) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"{page} has no python block"
    scope: dict = {}
    exec(compile(blocks[0], str(DOCS / page), "exec"), scope)
    return scope


def assert_two_of_four(weight: torch.Tensor) -> None:
    runs = (weight != 0).movedim(1, -1).reshape(-1, 4)
    assert (runs.sum(1) == 2).all()


def test_the_lightning_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = run_example("integrations-lightning.md")
    assert float(scope["trainer"].callback_metrics["hwprune/sparsity"]) == 0.5
    model = scope["callback"].finished.model
    assert_two_of_four(model.conv2[0].weight)
    assert "conv2" in scope["callback"].finished.report.to_markdown()
    saved = hp.load("digits-dpp.hwp")
    assert torch.equal(saved["conv2.0.weight"], model.conv2[0].weight)


def test_the_transformers_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = run_example("integrations-transformers.md")
    assert scope["facts"][-1]["hwprune/sparsity"] == 0.5
    model = scope["callback"].finished.model
    assert_two_of_four(model.bert.encoder.layer[0].intermediate.dense.weight)
    assert (tmp_path / "bert-dpp" / "checkpoint-8" / "hwprune-pruner.pt").is_file()
    assert (tmp_path / "bert-dpp.hwp").is_file()
