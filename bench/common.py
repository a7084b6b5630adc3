"""What every benchmark shares: where results go, the usual arguments, the "Command" and
"Machine" lines a results file starts with, a Markdown table, and the results log (one JSON
record per finished point, appended at once, so an interrupted benchmark resumes where it
stopped).

The scripts live in topic folders (``bench/methods``, ``bench/deploy``, ...) and are run from
the repository root as ``python bench/<topic>/<name>.py``; each puts ``bench/`` on ``sys.path``
first, so that ``import common`` finds this module::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from hwprune.app.machine import cpu_name, machine

__all__ = ["ROOT", "RESULTS", "ResultLog", "arguments", "command", "cpu_name", "group_sparsity",
           "header", "machine", "parse", "table", "write_json", "write_lines", "write_table"]

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = Path(__file__).resolve().parent / "results"  # results/<topic>/...


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


def arguments(doc: str, out: str | None = "path prefix for .jsonl and .md", *,
              data_dir: bool = False, threads: int | None = None,
              seeds: list[int] | None = None, repeats: int | None = None
              ) -> argparse.ArgumentParser:
    """The parser with the options most benchmarks take (each only when asked for):
    ``--out`` (required; ``out`` is its help), ``--data-dir``, ``--threads``, ``--seeds``,
    ``--repeats`` (the given values are the defaults). Add the script's own, then ``parse``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if out is not None:
        parser.add_argument("--out", required=True, help=out)
    if data_dir:
        parser.add_argument("--data-dir", default=None, help="default: $HWPRUNE_DATA_DIR")
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads,
                            help="torch threads (1: far faster than 2 on a shared 2-core CPU)")
    if seeds is not None:
        parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments; with ``--threads``, torch's thread count set; with ``--out``, its
    folder made."""
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    if getattr(args, "out", None) is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    return args


def command(script: str, argv: list[str] | None = None) -> str:
    """``python bench/<topic>/<name>.py ARGS``, the command as typed at the repository root
    (``argv``: the arguments given to ``main``; default: the command line's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", Path(script).resolve().relative_to(ROOT).as_posix(), *args])


def header(title: str, command: str, machine: str, inline: bool = False) -> str:
    """A results file's first lines: the title, then the command and the machine, as separate
    paragraphs or (``inline``) as one."""
    return f"# {title}\n\nCommand: `{command}`" + (". " if inline else "\n\n") + \
        f"Machine: {machine}"


def table(columns: list[str], align: str, rows: Iterable[Iterable[Any]]) -> list[str]:
    """The lines of a Markdown table; ``align`` has a letter per column: ``l`` or ``r``."""
    if len(align) != len(columns):
        raise ValueError(f"table: {len(columns)} columns but align {align!r}")
    return ["| " + " | ".join(columns) + " |",
            "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def write_table(path: Path, lines: list[str], columns: list[str], align: str,
                rows: Iterable[Iterable[Any]]) -> None:
    """A Markdown file: ``lines`` (the header and notes), then the table."""
    write_lines(path, [*lines, *table(columns, align, rows)])


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def group_sparsity(pruner: Any) -> float:
    """Fraction of a pruner's targeted groups (columns, channels, ...) that are entirely zero."""
    removed = total = 0
    for name, mask in pruner.masks().items():
        kept = pruner.layers[name].structure.to_groups(mask.float()).amax(1) > 0
        removed += int((~kept).sum())
        total += kept.numel()
    return removed / total
