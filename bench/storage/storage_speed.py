"""hp.save / hp.load / hp.report speed against torch.save / torch.load and issue 18's goals.

Models (nothing downloaded): ResNet-56 from ``hwprune.models``, with random initialisation
(``torch.manual_seed(0)``) and with the pretrained akamaster weights (``--data-dir``), each
dense, pruned 90 % by element magnitude and 2:4 (``hp.Magnitude``, finalized); and a stack of
``nn.Linear`` layers (five 4096x4096 and one 4096x512, biases included: 86 M parameters,
ViT-B/16's size) in two initialisations: PyTorch's default (uniform), whose low mantissa
bytes are partly zero and compress, and the truncated normal of std 0.02 that ViTs start
from, whose mantissa bytes are full-entropy as trained weights' are (the pretrained
ResNet-56's three low byte planes do not compress at all). Each repeat runs torch.save,
torch.save followed by ``os.fsync`` (the flush to the disk hp.save does by default),
torch.save written as hp.save writes (temporary file, fsync, rename: the atomic write
alone), hp.save, hp.save with ``sync=False`` (without that flush), hp.save with
``code_values=False`` (the same choices, values stored as they are: what the value coder
costs), torch.load and hp.load of the same state dict back to back (interleaved, so load on a
shared machine hits both alike); the table gives the median of the repeats and the ratio of
the medians.
``hp.report(model, example)`` is timed warm (one call first: it imports the FLOP counter).
After the timed repeats, three calls each of torch.save and hp.save measure how far the
process's resident memory rises while they run (sampled every 2 ms by a thread): hp.save of a
large model writes each tensor's arrays as it is chosen instead of holding the whole file.

Goals (issue 18): hp.save and hp.load within 3x torch.save / torch.load; hp.report under
0.5 s on ResNet-56 and under 10 s on the 86 M model.

    python bench/storage/storage_speed.py [--repeats 5] [--data-dir DIR] [--no-large] [--note TEXT]

Writes bench/results/storage/storage_speed.md and .json.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import torch

import hwprune as hp
from common import (
    RESULTS,
    arguments,
    command,
    header,
    machine,
    parse,
    table,
    write_json,
    write_lines,
)
from hwprune.data import data_dir
from hwprune.models import load_pretrained, resnet56

OUT = RESULTS / "storage" / "storage_speed"
GOALS = {"save_ratio": 3.0, "load_ratio": 3.0}
REPORT_GOAL_S = {"ResNet-56": 0.5, "86 M": 10.0}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed_case(label: str, model: torch.nn.Module, example: torch.Tensor, repeats: int,
               report_goal: float) -> dict:
    state = model.state_dict()
    times: dict[str, list[float]] = {k: [] for k in ("torch_save", "torch_save_fsync",
                                                     "torch_save_atomic", "hp_save",
                                                     "hp_save_nosync", "hp_save_uncoded",
                                                     "torch_load", "hp_load")}
    with tempfile.TemporaryDirectory() as tmp:
        pt, hwp, raw = Path(tmp) / "m.pt", Path(tmp) / "m.hwp", Path(tmp) / "raw.hwp"
        for _ in range(repeats):
            times["torch_save"].append(_timed(lambda: torch.save(state, pt)))
            times["torch_save_fsync"].append(_timed(lambda: _torch_save_synced(state, pt)))
            # torch.save written the way hp.save writes: what the atomic write itself costs
            times["torch_save_atomic"].append(_timed(lambda: _torch_save_atomic(state, pt)))
            times["hp_save"].append(_timed(lambda: hp.save(state, hwp)))
            # what the flush to the disk costs: hp.save's default does it, torch.save does not
            times["hp_save_nosync"].append(_timed(lambda: hp.save(state, hwp, sync=False)))
            # the same choices with the values stored as they are: the value coder's share
            times["hp_save_uncoded"].append(_timed(lambda: hp.save(state, raw,
                                                                   code_values=False)))
            times["torch_load"].append(_timed(lambda: torch.load(pt, weights_only=True)))
            times["hp_load"].append(_timed(lambda: hp.load(hwp)))
        # memory apart from the times (the sampling thread takes a share of a core)
        peaks: dict[str, list[int]] = {"torch_save": [], "hp_save": []}
        for _ in range(3):
            peaks["torch_save"].append(_peak_above(lambda: torch.save(state, pt)))
            peaks["hp_save"].append(_peak_above(lambda: hp.save(state, hwp)))
        sizes = (pt.stat().st_size, hwp.stat().st_size, raw.stat().st_size)
        back = hp.load(hwp)
    exact = list(back) == list(state) and all(
        torch.equal(back[k].view(torch.uint8) if v.dtype.is_floating_point else back[k],
                    v.view(torch.uint8) if v.dtype.is_floating_point else v)
        for k, v in state.items())
    hp.report(model, example)  # warm
    report_s = [_timed(lambda: hp.report(model, example)) for _ in range(max(1, repeats // 2))]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": label, "params": sum(t.numel() for t in state.values()), "repeats": repeats,
            **{f"{k}_s": v for k, v in med.items()},
            "save_ratio": med["hp_save"] / med["torch_save"],
            "nosync_save_ratio": med["hp_save_nosync"] / med["torch_save"],
            "synced_save_ratio": med["hp_save"] / med["torch_save_fsync"],
            "atomic_save_ratio": med["hp_save"] / med["torch_save_atomic"],
            "uncoded_save_ratio": med["hp_save_uncoded"] / med["torch_save"],
            "hp_uncoded_file": sizes[2],
            "load_ratio": med["hp_load"] / med["torch_load"],
            "report_s": statistics.median(report_s), "report_goal_s": report_goal,
            "torch_file": sizes[0], "hp_file": sizes[1], "round_trip_exact": exact,
            **{f"{k}_peak_bytes": statistics.median(v) for k, v in peaks.items()},
            "all_times_s": times}


def _rss() -> int:
    """The process's resident memory now, bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_above(fn) -> int:
    """How far the resident memory rose above its level before ``fn()`` while it ran,
    sampled every 2 ms by a thread (memory freed but kept by the allocator counts too)."""
    base = _rss()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _rss()) - base


def _torch_save_synced(state: dict, path: Path) -> None:
    """``torch.save`` and the flush to the disk that ``hp.save`` does by default."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` written as ``hp.save`` writes a file: into a temporary file beside
    ``path``, flushed to the disk, then renamed over ``path`` (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def linear_stack(normal: bool = False) -> torch.nn.Module:
    """Five 4096x4096 layers and a 4096x512 head: 86 M parameters with biases; ``normal``:
    weights from a normal of std 0.02 truncated at 2 std (a ViT's start), biases zero."""
    layers = [torch.nn.Linear(4096, 4096) for _ in range(5)] + [torch.nn.Linear(4096, 512)]
    if normal:
        for layer in layers:
            torch.nn.init.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
            torch.nn.init.zeros_(layer.bias)
    return torch.nn.Sequential(*layers).eval()


def _resnet56(weights: Path | None, structure: str | None = None,
              amount: float | None = None) -> torch.nn.Module:
    model = resnet56() if weights is None else load_pretrained(weights)
    if structure is not None:
        hp.Magnitude(model, structure, amount).finalize()
    return model.eval()


def write_summary(rows: list[dict], cmd: str, note: str = "") -> None:
    def ok(value: float, goal: float) -> str:
        return "yes" if value <= goal else "**no**"

    body = [[r["case"], f"{r['params']:,}", f"{r['torch_save_s'] * 1e3:,.1f}",
             f"{r['hp_save_s'] * 1e3:,.1f}", f"{r['save_ratio']:.2f}x",
             ok(r["save_ratio"], GOALS["save_ratio"]),
             f"{r['nosync_save_ratio']:.2f}x" if "nosync_save_ratio" in r else "-",
             f"{r['synced_save_ratio']:.2f}x" if "synced_save_ratio" in r else "-",
             f"{r['atomic_save_ratio']:.2f}x" if "atomic_save_ratio" in r else "-",
             f"{r['uncoded_save_ratio']:.2f}x ({r['hp_uncoded_file']:,} B)",
             f"{r['torch_load_s'] * 1e3:,.1f}",
             f"{r['hp_load_s'] * 1e3:,.1f}", f"{r['load_ratio']:.2f}x",
             ok(r["load_ratio"], GOALS["load_ratio"]), f"{r['report_s']:.2f}",
             f"< {r['report_goal_s']:g}", ok(r["report_s"], r["report_goal_s"]),
             f"{r['torch_file']:,}", f"{r['hp_file']:,}",
             _mb(r, "torch_save_peak_bytes"), _mb(r, "hp_save_peak_bytes"),
             "yes" if r["round_trip_exact"] else "**no**"] for r in rows]
    lines = [header("hp.save / hp.load / hp.report speed against torch.save / torch.load", cmd,
                    f"{machine()} (as hwprune.app.machine.machine() reads it)."), "",
             *([f"This run: {note}", ""] if note else []),
             "Median of the repeats (each repeat: torch.save, torch.save followed by "
             "os.fsync, torch.save written as hp.save writes (a temporary file beside the "
             "path, fsync, rename over the path), hp.save, hp.save with sync=False, hp.save "
             "with code_values=False, "
             "torch.load, hp.load back to back), wall clock, ms. hp.save flushes the file to "
             "the disk before it returns (fsync) by default, torch.save does not: 'sync=False' "
             "is hp.save's ratio without that flush, 'vs torch.save + fsync' its ratio against "
             "torch.save with the same flush, 'vs torch.save written atomically' against "
             "torch.save written with hp.save's whole protocol (what is left is the "
             "encoding); "
             "hp.report: median of warm calls, s. Goals (issue 18): "
             "save and load within 3x torch's, report under 0.5 s (ResNet-56) and 10 s (86 M). "
             "The machine is shared, so absolute times vary between runs. Peak MB: how far "
             "the process's resident memory rose above its level before the call while "
             "torch.save or hp.save ran (sampled every 2 ms by a thread; median of 3 calls "
             "after the timed ones; memory the allocator freed but kept counts too).", ""]
    columns = ["model", "params", "torch.save", "hp.save", "save ratio", "<= 3x",
               "sync=False: save ratio", "vs torch.save + fsync",
               "vs torch.save written atomically",
               "values uncoded: save ratio (file)", "torch.load", "hp.load", "load ratio",
               "<= 3x", "hp.report s", "goal", "met",
               "torch file B", "hp file B", "torch.save peak MB", "hp.save peak MB", "exact"]
    write_lines(OUT.with_suffix(".md"), [*lines, *table(columns, "lrrrrlrrrrrrrlrllrrrrl",
                                                        body)])
    write_json(OUT.with_suffix(".json"), {"command": cmd, "machine": machine(), "note": note,
                                          "speed": rows})


def _mb(row: dict, key: str) -> str:
    return f"{row[key] / 2**20:,.0f}" if key in row else "-"


def main(argv=None) -> int:
    parser = arguments(__doc__, None, data_dir=True, repeats=5)
    parser.add_argument("--no-large", action="store_true", help="skip the 86 M-parameter model")
    parser.add_argument("--note", default="", help="what else the machine ran meanwhile "
                        "(written under the header: the times depend on it)")
    args = parse(parser, argv)
    # the note is written out below the header: the command shows where it went
    cmd = command(__file__, argv).replace(args.note, '"..."') if args.note else command(
        __file__, argv)
    example = torch.zeros(1, 3, 32, 32)
    pretrained = data_dir(args.data_dir) / "weights" / "cifar10-resnet56-akamaster.th"
    rows = []
    for init, weights in (("random init", None), ("pretrained", pretrained)):
        for case, structure, amount in (("dense", None, None), ("element 90%", "element", 0.9),
                                        ("2:4", "2:4", None)):
            torch.manual_seed(0)
            rows.append(speed_case(f"ResNet-56 {init}, {case}",
                                   _resnet56(weights, structure, amount), example,
                                   args.repeats, REPORT_GOAL_S["ResNet-56"]))
            print({k: v for k, v in rows[-1].items() if k != "all_times_s"}, flush=True)
            write_summary(rows, cmd, args.note)
    if not args.no_large:
        for label, normal in (("uniform init", False), ("normal init, std 0.02", True)):
            torch.manual_seed(0)
            rows.append(speed_case(f"86 M nn.Linear stack (ViT-B/16 size), {label}",
                                   linear_stack(normal), torch.zeros(1, 4096),
                                   args.repeats, REPORT_GOAL_S["86 M"]))
            print({k: v for k, v in rows[-1].items() if k != "all_times_s"}, flush=True)
            write_summary(rows, cmd, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
