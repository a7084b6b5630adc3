"""The README's quick start runs as written (with a real digits loader)."""

import re
from pathlib import Path

import torch

from hwprune.data import load_digits
from hwprune.training import make_loader

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    train, _ = load_digits()
    loader = make_loader(torch.utils.data.Subset(train, range(256)), 64, shuffle=True)
    scope = {"loader": loader}
    exec(compile(blocks[0], str(README), "exec"), scope)
    pruned = scope["pruned"]
    w = pruned.conv2[0].weight  # a conv the default targets prune: 2:4 along input channels
    runs = (w != 0).movedim(1, -1).reshape(-1, 4)
    assert (runs.sum(1) == 2).all()
