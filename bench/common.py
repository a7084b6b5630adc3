"""The results file every benchmark keeps: one JSON record per finished point, appended at
once, so an interrupted benchmark resumes where it stopped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from hwprune.app.machine import cpu_name, machine

__all__ = ["ResultLog", "cpu_name", "machine"]  # one machine description for every result


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
