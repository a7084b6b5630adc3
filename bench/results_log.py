"""The results file every benchmark keeps: one JSON record per finished point, appended at
once, so an interrupted benchmark resumes where it stopped."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch


class ResultLog:
    """Records in ``path`` (JSON lines); ``key`` names a point, to skip the finished ones."""

    def __init__(self, path: Path, key: Callable[[dict], tuple]):
        self.path, self.key = path, key
        self.records = ([json.loads(x) for x in path.read_text().splitlines()]
                        if path.exists() else [])

    def done(self, *key) -> bool:
        return any(self.key(r) == key for r in self.records)

    def add(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def cpu_name() -> str:
    """The CPU model (platform.processor() is often empty on Linux; /proc/cpuinfo is not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line naming the machine a result was measured on, for every results file: the
    machines these benchmarks run on differ between sessions, so it is read, never typed."""
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
