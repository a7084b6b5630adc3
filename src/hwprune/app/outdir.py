"""A run's output folder: which files a run writes, its status, the rules for a folder that
already holds a run, and the metrics files.

Only rank 0 of a distributed run calls these (see ``distributed.main_only``).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import remove_stale_temporaries
from .checkpoint import load_checkpoint

__all__ = ["METRIC_FIELDS", "RESULT_FILES", "check_flags", "check_same_recipe", "json_text",
           "prepare_out", "run_status", "write_json", "write_metrics"]

#: what a run writes into its output folder (``--force`` removes exactly these)
RESULT_FILES = ("recipe.yaml", "run.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt",
                "report.md", "report.json", "summary.json", "model.hwp", "plots")
#: the columns of metrics.csv: one record per epoch
METRIC_FIELDS = ("epoch", "phase", "lr", "train_loss", "train_accuracy", "test_loss",
                 "test_accuracy", "sparsity", "steps", "seconds")


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON: an infinite or NaN number (which JSON cannot hold; Python would
    write a bare ``NaN``) becomes ``null``."""
    return json.dumps(_finite_or_null(obj), indent=indent, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json_text(obj, indent=2) + "\n")


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and metrics.csv from the history (rewritten whole: after a resume they
    hold exactly the epochs of the checkpoint, never an epoch twice)."""
    lines = "".join(json_text(h) + "\n" for h in history)
    (out / "metrics.jsonl").write_text(lines)
    with (out / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(history)


def run_status(out: Path) -> str | None:
    """The status in ``out/run.json`` (None: no run there)."""
    try:
        return json.loads((out / "run.json").read_text()).get("status", "unknown")
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError, OSError):
        return "unknown"


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if d is not None:
                return d
        return None
    return None if a == b else (path, a, b)


def check_flags(out: Path, resume: bool, force: bool) -> None:
    """Refuse ``resume`` with ``force``: one continues the run in ``out``, the other deletes it."""
    if resume and force:
        raise ConfigError(f"--resume and --force together: --resume continues the run in {out}, "
                          "--force deletes it and starts over; give one of them")


def check_same_recipe(out: Path, cfg: dict[str, Any]) -> None:
    """Refuse to resume the run in ``out`` with a recipe other than its ``recipe.yaml``,
    naming the first field that differs."""
    from .recipe import parse_yaml

    saved = parse_yaml((out / "recipe.yaml").read_text(), f"{out / 'recipe.yaml'}")
    diff = _first_difference(saved, cfg)
    if diff is not None:
        raise ConfigError(f"--resume: recipe field {diff[0]} is {diff[2]!r} here but "
                          f"{diff[1]!r} in the run in {out}; allowed: the same recipe, "
                          "or --force without --resume to start over")


def prepare_out(out: Path, cfg: dict[str, Any], resume: bool, force: bool) -> dict | None:
    """Check the output folder against the request; returns the checkpoint to resume from.

    A finished run is never overwritten without ``force``; an unfinished one needs ``resume``
    (continue, with the same recipe) or ``force`` (start over). ``force`` removes only the files
    a run writes (``RESULT_FILES``); it is never given with ``resume`` (``check_flags``).
    Temporary files an atomic write left when its process was killed are removed first.
    """
    status = run_status(out)
    for name in RESULT_FILES:  # the caller holds the folder's lock: no write is in progress
        remove_stale_temporaries(out / name)
    if force:
        for name in RESULT_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        status = None
    elif status == "finished":
        raise ConfigError(f"--out {out} holds a finished run; pass --force to overwrite it, "
                          "or choose another --out")
    if resume:
        if status is None or not (out / "checkpoint.pt").is_file():
            raise ConfigError(f"--resume: {out} holds no checkpoint to continue; run without "
                              "--resume to start")
        check_same_recipe(out, cfg)
        return load_checkpoint(out / "checkpoint.pt")
    if status is not None:
        raise ConfigError(f"--out {out} holds an unfinished run; pass --resume to continue it "
                          "or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    return None
