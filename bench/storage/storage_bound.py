"""hp.save against the information bound and general-purpose compressors, and its speed.

Sizes: the pretrained CIFAR-10 ResNet-20 (akamaster checkpoint), dense and pruned one-shot (no
training: the patterns are what each method's first projection gives), as the bytes of the whole
file: ``hp.save`` (default), ``hp.save`` without value coding, ``hp.save(compress="lzma")``, the
dense state dict as a safetensors file compressed with gzip -9 and xz -9 (Python's gzip and lzma
at those presets), and ``torch.save`` with every pruned weight as a torch CSR tensor of its
im2col matrix. *Bound* = every pruned weight's kept values at their full width + the
information-theoretic minimum of its pattern as stored (log2 C(N, z) irregular, runs·log2 C(n, k)
k-of-n, log2 C(tiles, kept) blocks, ...: the report's ``min_index_bits``), every other tensor
dense; the ratio is file bytes / bound (the file's header included).

Speed: best of ``--repeats`` wall-clock runs of ``hp.save``/``hp.load`` against ``torch.save``/
``torch.load`` of the same state dict (ResNet-56, dense and 90 % element-pruned; a stack of
``nn.Linear`` layers of ViT-B/16's widths, 100 M parameters), and ``hp.report`` (warm).

    python bench/storage/storage_bound.py [--data-dir DIR] [--repeats 5] [--no-large]

Writes bench/results/storage/storage_bound.md and .json.
"""

from __future__ import annotations

import copy
import gzip
import io
import lzma
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

import safetensors.torch
import torch
from storage_sizes import bits_equal

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
from hwprune.models import load_pretrained
from hwprune.storage import stored_bytes

OUT = RESULTS / "storage" / "storage_bound"

CASES = {
    "dense": None,
    "element 90%": lambda m: hp.Magnitude(m, "element", 0.9),
    "2:4": lambda m: hp.Magnitude(m, "2:4", None),
    "block 4x4 75%": lambda m: hp.Magnitude(m, "block:4x4", 0.75),
    "DPP 2:4 + 8-bit": lambda m: hp.DPP(m, "2:4", quantize_bits=8),
    "ADMM 1x4 unify 50% + zero 25%": lambda m: _admm(m),
    "DARB 8x": lambda m: hp.DARB(m, ratio=8.0),
}


def _admm(m):
    pruner = hp.ADMM(m, block=(1, 4), unify=0.5, zero=0.25)
    pruner.hard_project()
    return pruner


def _csr_bytes(state: dict, pruned: set) -> int:
    """torch.save of the state dict with each pruned weight as CSR of its im2col matrix."""
    out = {k: (v.reshape(v.shape[0], -1).to_sparse_csr() if k in pruned else v)
           for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.tell()


def _bound_bytes(state: dict, hints: dict, pruned: set) -> float:
    total = 0.0
    for name, t in state.items():
        if name in pruned:
            info = stored_bytes(t, hints.get(name))
            total += info["kept"] * t.element_size() + info["min_index_bits"] / 8
        else:
            total += t.numel() * t.element_size()
    return total


def size_case(label: str, model0) -> dict:
    model = copy.deepcopy(model0)
    make = CASES[label]
    pruner = None if make is None else make(model)
    if pruner is not None:
        pruner.finalize()
    model.eval()
    state = model.state_dict()
    rep = hp.report(model, torch.zeros(1, 3, 32, 32), pruner=pruner, name=label)
    hints = rep.hints()
    pruned = {r.name for r in rep.rows if r.structure != "-"}
    dense_st = safetensors.torch.save(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.hwp"
        size = hp.save(state, path, hints=hints)
        back = hp.load(path)
        plain = hp.save(state, path, hints=hints, code_values=False)
        lz = hp.save(state, path, hints=hints, compress="lzma")
    assert size == rep.total["file_bytes"], (size, rep.total["file_bytes"])
    assert list(back) == list(state) and all(bits_equal(back[k], v) for k, v in state.items())
    bound = _bound_bytes(state, hints, pruned)
    xz = len(lzma.compress(dense_st, preset=9))
    return {
        "case": label, "encodings": sorted({r.encoding for r in rep.rows if r.name in pruned}),
        "hp_save": size, "hp_save_no_value_coding": plain, "hp_save_lzma": lz,
        "safetensors": len(dense_st), "safetensors_gzip9": len(gzip.compress(dense_st, 9)),
        "safetensors_xz9": xz, "torch_csr": _csr_bytes(state, pruned), "bound": bound,
        "hp_save_over_bound": size / bound, "hp_save_over_xz9": size / xz,
    }


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed_case(label: str, model, example, repeats: int, report: bool = True) -> dict:
    state = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        pt, hwp = Path(tmp) / "m.pt", Path(tmp) / "m.hwp"
        t_save = _best(lambda: torch.save(state, pt), repeats)
        t_load = _best(lambda: torch.load(pt, weights_only=True), repeats)
        h_save = _best(lambda: hp.save(state, hwp), repeats)
        h_load = _best(lambda: hp.load(hwp), repeats)
        sizes = (pt.stat().st_size, hwp.stat().st_size)
    out = {"case": label, "params": sum(t.numel() for t in state.values()),
           "torch_save_s": t_save, "hp_save_s": h_save, "save_ratio": h_save / t_save,
           "torch_load_s": t_load, "hp_load_s": h_load, "load_ratio": h_load / t_load,
           "torch_file": sizes[0], "hp_file": sizes[1], "report_s": None}
    if report:
        hp.report(model, example)  # warm: the first call imports the FLOP counter
        out["report_s"] = _best(lambda: hp.report(model, example), max(1, repeats // 2))
    return out


def vit_sized() -> torch.nn.Module:
    """nn.Linear layers of ViT-B/16's widths: 12 blocks of (768x2304 qkv, 768x768
    proj, 768x3072, 3072x768) + a 768x1000 head, biases included: 100 M, above ViT-B/16's 86 M)."""
    layers = []
    for _ in range(12):
        layers += [torch.nn.Linear(768, 2304), torch.nn.Linear(2304, 768),
                   torch.nn.Linear(768, 3072), torch.nn.Linear(3072, 768)]
    layers.append(torch.nn.Linear(768, 1000))
    return torch.nn.Sequential(*layers).eval()


def write_summary(sizes: list[dict], speeds: list[dict], cmd: str) -> None:
    lines = [header("hp.save against the information bound, gzip -9 and xz -9, and its speed",
                    cmd, f"{machine()} (as hwprune.app.machine.machine() reads it)."), "",
             "Bytes of the whole file, pretrained CIFAR-10 ResNet-20 pruned one-shot. *bound* = "
             "pruned weights' kept values at full width + the pattern's information-theoretic "
             "minimum, other tensors dense (module docstring). xz -9 and gzip -9 compress the "
             "dense safetensors file of the same state dict.", ""]
    rows = [[r["case"], ", ".join(r["encodings"]) or "-", f"{r['hp_save']:,}",
             f"{r['hp_save_no_value_coding']:,}", f"{r['hp_save_lzma']:,}",
             f"{r['safetensors_gzip9']:,}", f"{r['safetensors_xz9']:,}",
             f"{r['torch_csr']:,}", f"{r['bound']:,.0f}", f"{r['hp_save_over_bound']:.3f}",
             f"{r['hp_save_over_xz9']:.3f}"] for r in sizes]
    table_columns = ["case", "encodings", "hp.save", "hp.save, values uncoded", "hp.save lzma",
             "safetensors + gzip -9", "safetensors + xz -9", "torch CSR", "bound",
             "hp.save / bound", "hp.save / xz -9"]
    speed_rows = [[r["case"], f"{r['params']:,}", f"{r['torch_save_s'] * 1e3:,.1f}",
                   f"{r['hp_save_s'] * 1e3:,.1f}", f"{r['save_ratio']:.2f}x",
                   f"{r['torch_load_s'] * 1e3:,.1f}", f"{r['hp_load_s'] * 1e3:,.1f}",
                   f"{r['load_ratio']:.2f}x", f"{r['torch_file']:,}", f"{r['hp_file']:,}",
                   "-" if r["report_s"] is None else f"{r['report_s']:.2f}"] for r in speeds]
    speed_lines = ["", "Speed: best of the repeats, wall clock, ms (hp.report: s, warm). The "
                   "machine is shared, so absolute times vary; each ratio is measured back to "
                   "back.", ""]
    speed_table = table(["model", "params", "torch.save", "hp.save", "save ratio", "torch.load",
                         "hp.load", "load ratio", "torch file B", "hp file B", "hp.report s"],
                        "lrrrrrrrrrr", speed_rows)
    write_lines(OUT.with_suffix(".md"), [*lines, *table(table_columns, "llrrrrrrrrr", rows),
                                         *speed_lines, *speed_table])
    write_json(OUT.with_suffix(".json"),
               {"command": cmd, "machine": machine(), "sizes": sizes, "speed": speeds})


def main(argv=None) -> int:
    parser = arguments(__doc__, None, data_dir=True, repeats=5)
    parser.add_argument("--no-large", action="store_true", help="skip the 100 M-parameter model")
    args = parse(parser, argv)
    cmd = command(__file__, argv)
    root = data_dir(args.data_dir)
    torch.manual_seed(0)
    r20 = load_pretrained(root / "weights" / "cifar10-resnet20-akamaster.th")
    sizes = []
    for label in CASES:
        sizes.append(size_case(label, r20))
        print(sizes[-1], flush=True)
    r56 = load_pretrained(root / "weights" / "cifar10-resnet56-akamaster.th")
    pruned56 = copy.deepcopy(r56)
    hp.Magnitude(pruned56, "element", 0.9).finalize()
    example = torch.zeros(1, 3, 32, 32)
    speeds = [speed_case("ResNet-56 dense", r56, example, args.repeats),
              speed_case("ResNet-56 element 90%", pruned56, example, args.repeats)]
    print(speeds, flush=True)
    write_summary(sizes, speeds, cmd)
    if not args.no_large:
        speeds.append(speed_case("100 M nn.Linear stack (above ViT-B/16 size)", vit_sized(),
                                 torch.zeros(1, 768), max(1, args.repeats // 2)))
        print(speeds[-1], flush=True)
    write_summary(sizes, speeds, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
