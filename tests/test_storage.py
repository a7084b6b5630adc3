"""hwprune.storage: bitwise round trips of every encoding and of the container, the chooser's
picks on real pruned tensors, exact byte accounting, and a container that refuses damaged or
unsafe files."""

import hashlib
import json
import math
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
import safetensors.numpy
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hwprune as hp
from hwprune.storage import (
    StorageError,
    choose,
    decode,
    encode,
    encodings_for,
    file_layout,
    load,
    packing,
    plan,
    save,
    stored_bytes,
    summarize,
)
from hwprune.storage import container as container_mod
from hwprune.storage.bits import pack_uint, subset_rank, subset_unrank, unpack_uint
from hwprune.storage.encodings import ENCODINGS, TensorView, saved_encodings
from hwprune.storage.encodings.tiling import tiles
from hwprune.structures import Block, KofN

from conftest import TinyNet

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(raw(a), raw(b))


def sparse_tensor(shape, dtype, sparsity, seed, specials=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    t[torch.rand(shape, generator=g, dtype=torch.float64) < sparsity] = 0.0
    t = t.to(dtype)
    if specials and t.numel() >= 3:
        flat = t.view(-1)
        flat[0] = -0.0
        flat[1] = 1e-40 if dtype == torch.float64 else torch.finfo(dtype).tiny / 4  # subnormal
        flat[2] = torch.finfo(dtype).max
    return t


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)


# -- every encoding round-trips bitwise; the chooser never loses -----------------------------
@SETTINGS
@given(shape=shapes, dtype=st.sampled_from(FLOATS), sparsity=st.floats(0, 1),
       seed=st.integers(0, 10_000), specials=st.booleans())
def test_every_applicable_encoding_round_trips_and_choose_is_smallest(
        shape, dtype, sparsity, seed, specials):
    t = sparse_tensor(shape, dtype, sparsity, seed, specials)
    encs = encodings_for(t)
    assert encs[0].encoding == "dense"
    for enc in encs:
        assert_bits_equal(enc.decode(), t)
        assert enc.total_bytes == enc.nbytes + enc.index_bytes
    plain = choose(t, code_values=False)
    assert_bits_equal(plain.decode(), t)
    assert plain.total_bytes == min(e.total_bytes for e in encs)
    best = choose(t)  # its values as coded byte planes where that is smaller
    assert_bits_equal(best.decode(), t)
    assert best.total_bytes <= plain.total_bytes


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_inf_and_negative_zero_survive_and_only_go_dense(dtype):
    t = torch.zeros(4, 8, dtype=dtype)
    bits = raw(t)
    nan_payload = {torch.float16: 0x7E01, torch.bfloat16: 0x7FC3, torch.float32: 0x7FC0_0123,
                   torch.float64: 0x7FF8_0000_0000_0042}[dtype]
    bits[0, 0] = nan_payload  # a NaN with a payload
    t[1, 1] = float("inf")
    t[2, 2] = -0.0
    assert torch.isnan(t[0, 0])
    assert [e.encoding for e in encodings_for(t)] == ["dense"]
    assert_bits_equal(choose(t).decode(), t)
    # -0.0 alone (no NaN/inf) survives every sparse encoding; it is not a kept weight
    z = torch.zeros(4, 8, dtype=dtype)
    z[2, 2] = -0.0
    for enc in encodings_for(z):
        assert_bits_equal(enc.decode(), z)
    assert stored_bytes(z)["kept"] == 0 and stored_bytes(z)["bits_per_kept_weight"] is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8,
                                   torch.complex64, torch.complex128])
def test_other_dtypes_round_trip(dtype):
    t = (torch.arange(24).reshape(4, 6) % 3).to(dtype)
    for enc in encodings_for(t):
        assert enc.decode().dtype == dtype and torch.equal(enc.decode(), t)
    empty = torch.zeros(0, 3, dtype=dtype)
    assert choose(empty).encoding == "dense" and choose(empty).total_bytes == 0



@pytest.mark.parametrize("numel", [5, 600, 3000])  # the small-vector, chooser and bitmask paths
def test_conjugate_and_negative_views_save_the_values_they_read(tmp_path, numel):
    g = torch.Generator().manual_seed(numel)
    real = torch.randn(numel, generator=g)
    real[::3] = 0.0
    views = {"conj": torch.complex(real, torch.randn(numel, generator=g)).conj(),
             "neg": torch._neg_view(real)}  # their memory differs from their values
    save(views, tmp_path / "views.hwp")
    back = load(tmp_path / "views.hwp")
    for name, view in views.items():
        assert not back[name].is_conj() and not back[name].is_neg()
        assert_bits_equal(back[name], view.resolve_conj().resolve_neg())
        assert_bits_equal(choose(view).decode(), view.resolve_conj().resolve_neg())

# -- k-of-n ------------------------------------------------------------------------------------
kofn_cases = st.tuples(st.sampled_from([2, 4, 8, 16]), st.integers(1, 15)).filter(
    lambda nk: nk[1] < nk[0]).map(lambda nk: (nk[1], nk[0]))


@SETTINGS
@given(kn=kofn_cases, out=st.integers(1, 4), runs=st.integers(1, 3),
       kernel=st.sampled_from([(), (1,), (3, 3), (2, 1)]), dtype=st.sampled_from(FLOATS),
       seed=st.integers(0, 10_000), positions=st.sampled_from(["rank", "index"]))
def test_kofn_round_trips_with_exact_position_bits(kn, out, runs, kernel, dtype, seed, positions):
    k, n = kn
    shape = (out, n * runs, *kernel)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    s = KofN(k, n)
    keep = s.keep_top(s.to_groups(torch.rand(shape, generator=g)).reshape(-1))
    groups = s.to_groups(w).reshape(-1).clone()
    groups[~keep] = 0
    groups[keep & (torch.rand(keep.shape, generator=g) < 0.1)] = 0.0  # kept weights that are 0
    groups[keep & (torch.rand(keep.shape, generator=g) < 0.1)] = -0.0
    w = s.from_groups(groups[:, None], shape)

    enc = encode(w, "kofn", k=k, n=n, positions=positions)
    assert_bits_equal(enc.decode(), w)
    nruns = w.numel() // n
    width = (math.comb(n, k) - 1).bit_length() if positions == "rank" else k * (n - 1).bit_length()
    assert width == (math.ceil(math.log2(math.comb(n, k))) if positions == "rank"
                     else k * math.ceil(math.log2(n)))
    assert enc.index_bytes == math.ceil(nruns * width / 8)
    assert enc.nbytes == nruns * k * w.element_size()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9])
def test_subset_rank_is_a_bijection_onto_the_minimum_range(n):
    from itertools import combinations

    for k in range(1, n):
        subsets = np.array(list(combinations(range(n), k)))
        ranks = subset_rank(subsets, n)
        assert sorted(ranks.tolist()) == list(range(math.comb(n, k)))
        assert np.array_equal(subset_unrank(ranks, n, k), subsets)


@given(width=st.integers(0, 64), values=st.lists(st.integers(0, 2**64 - 1), max_size=40))
def test_bit_packing_is_exact_and_tight(width, values):
    v = np.array([x % (1 << width) if width else 0 for x in values], np.uint64)
    packed = pack_uint(v, width)
    assert packed.size == math.ceil(v.size * width / 8)
    assert np.array_equal(unpack_uint(packed, width, v.size), v)
    # the layout itself: each value's bits, most significant first, back to back
    written = "".join(format(int(x), f"0{width}b") for x in v) if width else ""
    assert np.unpackbits(packed)[: len(written)].tolist() == [int(c) for c in written]
    assert not np.unpackbits(packed)[len(written):].any()  # zero padding


@given(width=st.integers(1, 64), values=st.lists(st.integers(0, 2**64 - 1), max_size=40),
       dtype=st.sampled_from([np.uint64, np.int64, np.uint32, np.uint16, np.uint8]))
def test_bit_packing_keeps_the_low_bits_of_any_integer_dtype(width, values, dtype):
    # a value wider than its field is cut to its low ``width`` bits, whatever the array's dtype
    v = np.array([x % (1 << (8 * np.dtype(dtype).itemsize)) for x in values],
                 np.uint64).astype(dtype)
    low = np.array([int(x) % (1 << 64) % (1 << width) for x in v.astype(np.uint64)], np.uint64)
    assert np.array_equal(pack_uint(v, width), pack_uint(low, width))


def test_kofn_refuses_what_does_not_fit():
    w = torch.ones(4, 8)
    with pytest.raises(StorageError, match="nonzeros"):
        encode(w, "kofn", k=2, n=4)
    with pytest.raises(StorageError, match="dividing"):
        encode(torch.zeros(4, 6), "kofn", k=1, n=4)
    w = torch.zeros(4, 8)
    w[:, ::4] = 1.0  # 1 of 4 along dim 1 ...
    assert encode(w, "kofn", n=4).meta["k"] == 1
    with pytest.raises(StorageError):  # ... but not along dim 0
        encode(w.t().contiguous(), "kofn", k=1, n=4)


# -- block, unified, quantized ---------------------------------------------------------------
@SETTINGS
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), bh=st.integers(1, 5),
       bw=st.integers(1, 5), density=st.floats(0, 1), seed=st.integers(0, 10_000),
       dtype=st.sampled_from(FLOATS))
def test_block_round_trips_including_ragged_edges(rows, cols, bh, bw, density, seed, dtype):
    bh, bw = min(bh, rows), min(bw, cols)
    g = torch.Generator().manual_seed(seed)
    b = Block(bh, bw)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    keep = torch.rand(b.num_groups(w.shape), generator=g) < density
    w = torch.where(b.expand(keep, w.shape), w, 0.0)
    enc = encode(w, "block", bh=bh, bw=bw)
    assert_bits_equal(enc.decode(), w)
    kept_real = int((b.group_sizes(w.shape) * (b.scores(w) > 0)).sum())
    assert enc.nbytes == kept_real * w.element_size()
    assert enc.index_bytes == math.ceil(b.num_groups(w.shape) / 8)


def test_tile_order_is_the_block_structures_group_order():
    w = torch.arange(1, 7 * 10 + 1, dtype=torch.int32).reshape(7, 10)
    for bh, bw in [(2, 3), (4, 4), (1, 5), (7, 1)]:
        ours = tiles(w.numpy().reshape(-1), 7, 10, bh, bw)
        assert np.array_equal(ours, Block(bh, bw).to_groups(w).numpy())


def unified_tensor(rows, cols, b, seed, dtype=torch.float32):
    """Rows of 1 x b blocks, each zero, unified (one magnitude, random signs) or free."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-cols // b)
    state = torch.randint(0, 3, (rows, blocks), generator=g)
    mag = torch.rand(rows, blocks, generator=g) + 0.1
    w = torch.randn(rows, blocks * b, generator=g)
    signs = torch.randint(0, 2, (rows, blocks * b), generator=g) * 2.0 - 1
    uni = (mag.repeat_interleave(b, 1) * signs)
    st_ = state.repeat_interleave(b, 1)
    w = torch.where(st_ == 0, torch.zeros_like(w), torch.where(st_ == 1, uni, w))
    return w[:, :cols].contiguous().to(dtype)


@SETTINGS
@given(rows=st.integers(1, 8), cols=st.integers(1, 20), b=st.sampled_from([2, 3, 4, 8]),
       seed=st.integers(0, 10_000), dtype=st.sampled_from(FLOATS))
def test_unified_round_trips(rows, cols, b, seed, dtype):
    b = min(b, cols)
    w = unified_tensor(rows, cols, b, seed, dtype)
    w.view(-1)[0] = -0.0  # a unified block of magnitude 0 with a sign, or a free block
    enc = encode(w, "unified", bh=1, bw=b)
    assert_bits_equal(enc.decode(), w)


@SETTINGS
@given(q=st.integers(1, 127), scale=st.floats(1e-3, 10), shape=shapes,
       dtype=st.sampled_from(FLOATS), seed=st.integers(0, 10_000))
def test_quantized_round_trips_integer_times_scale(q, scale, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-q, q + 1, shape, generator=g)
    codes.view(-1)[0] = q  # the range is reached
    s = torch.tensor(scale, dtype=dtype)
    w = codes.to(dtype) * s
    enc = encode(w, "quantized")
    assert_bits_equal(enc.decode(), w)
    bits = (2 * enc.meta["qmax"]).bit_length()
    assert bits <= 8 and enc.nbytes == math.ceil(w.numel() * bits / 8) + w.element_size()
    with pytest.raises(StorageError):
        encode(torch.randn(300, generator=g).to(dtype), "quantized")


def test_quantized_with_negative_zeros_goes_through_zero_signs():
    codes = torch.randint(-1, 2, (16, 16), generator=torch.Generator().manual_seed(0))
    w = codes.float() * 0.25
    w[codes == 0] = -0.0  # ternary weights from w * mask
    enc = choose(w)
    assert (enc.encoding, enc.meta) == ("quantized", {"qmax": 1, "zero_signs": True})
    assert_bits_equal(enc.decode(), w)


# -- real pruned tensors: the chooser's picks ------------------------------------------------
def pruned(structure, sparsity=None):
    torch.manual_seed(0)
    model = TinyNet()
    return hp.Magnitude(model, structure, sparsity).finalize().state_dict()


def test_chooser_picks_kofn_for_2_4():
    sd = pruned("2:4")
    for name in ("conv2.weight", "conv3.weight", "fc1.weight"):
        enc = choose(sd[name], code_values=False)
        assert (enc.encoding, enc.meta) == ("kofn", {"k": 2, "n": 4, "positions": "coded"})
        assert_bits_equal(enc.decode(), sd[name])
        info = stored_bytes(sd[name], hints="2:4")
        runs = sd[name].numel() // 4
        assert info["index_bytes"] == coded_rank_bytes(runs, 6)  # ranks of C(4, 2) = 6 subsets
        assert info["index_bytes"] * 8 <= 1.02 * runs * math.log2(6) + 16
        assert math.isclose(info["min_index_bits"], runs * math.log2(6))
        assert info["total_bytes"] == info["payload_bytes"] + info["index_bytes"]


def test_chooser_picks_block_for_block_pruning():
    sd = pruned("block:4x4", 0.5)
    for name in ("conv2.weight", "conv3.weight", "fc1.weight"):
        enc = choose(sd[name], code_values=False)
        assert (enc.encoding, enc.meta) == ("block", {"bh": 4, "bw": 4})
        assert_bits_equal(enc.decode(), sd[name])


def test_chooser_picks_gaps_for_irregular_and_dense_for_dense():
    sd = pruned("element", 0.9)
    for name in ("conv2.weight", "conv3.weight", "fc1.weight"):
        w = sd[name]
        smaller = min((encode(w, "csr"), encode(w, "bitmask")), key=lambda e: e.total_bytes)
        enc = choose(w)
        assert enc.encoding == "gaps" and enc.index_bytes < smaller.index_bytes
        info = stored_bytes(w)
        # Golomb-coded gaps: within 2 % (and a byte of padding) of log2 C(N, kept)
        assert 8 * info["index_bytes"] <= 1.02 * info["min_index_bits"] + 8
        kept = int((w != 0).sum())
        assert info["kept"] == kept
        assert math.isclose(info["min_index_bits"],
                            (math.lgamma(w.numel() + 1) - math.lgamma(kept + 1)
                             - math.lgamma(w.numel() - kept + 1)) / math.log(2))
        assert info["bits_per_kept_weight"] == 8 * info["total_bytes"] / kept
    assert choose(sd["fc2.weight"]).encoding == "dense"  # not a target: still dense
    assert choose(sd["conv1.weight"]).encoding == "dense"


def test_chooser_picks_unified_for_a_unified_tensor():
    w = unified_tensor(16, 64, 4, seed=3)
    enc = choose(w, hints={"unified": (1, 4)}, code_values=False)
    assert (enc.encoding, enc.meta) == ("unified", {"bh": 1, "bw": 4})
    assert_bits_equal(enc.decode(), w)
    assert choose(w).encoding == "unified"


def test_negative_zeros_from_w_times_mask_keep_the_pattern():
    """``w * mask`` leaves -0.0 wherever w < 0; the zero-signs variant keeps the 2:4 pattern
    and costs one bit per zero, not a stored value per -0.0."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g)
    s = KofN(2, 4)
    mask = s.from_groups(s.keep_top(s.to_groups(w.abs()).reshape(-1))[:, None], w.shape)
    masked = w * mask
    assert (raw(masked) == raw(torch.tensor(-0.0))).any()
    enc = choose(masked, code_values=False)
    assert enc.encoding == "kofn" and enc.meta["zero_signs"] is True
    assert_bits_equal(enc.decode(), masked)
    runs, zeros = w.numel() // 4, w.numel() // 2
    assert enc.index_bytes == coded_rank_bytes(runs, 6) + math.ceil(zeros / 8)
    plain = choose(torch.where(mask, w, 0.0), code_values=False)
    assert plain.total_bytes == enc.total_bytes - math.ceil(zeros / 8)
    info = stored_bytes(masked)
    assert info["kept"] == w.numel() // 2
    assert math.isclose(info["min_index_bits"], runs * math.log2(6) + zeros)
    one = torch.where(mask, w, 0.0).contiguous()
    one.view(-1)[int(one.view(-1).nonzero()[0])] = -0.0  # a kept weight that is -0.0
    assert choose(one, code_values=False).meta == {"k": 2, "n": 4, "positions": "coded"}
    assert_bits_equal(choose(one).decode(), one)


def _ceil8(bits: int) -> int:
    return -(-bits // 8)


def coded_rank_bytes(runs: int, subsets: int) -> int:
    """Bytes of ``runs`` k-of-n ranks (``subsets`` = C(n, k)) packed g at a time as base-C
    numbers (kofn ``positions="coded"``): g up to 64 with C^g < 2^64 and the fewest bits per
    rank, ceil(log2 C^g) bits per group, the last group padded."""
    g, width = 1, (subsets - 1).bit_length()
    for h in range(2, 65):
        if subsets ** h >= 1 << 64:
            break
        w = (subsets ** h - 1).bit_length()
        if w * g < width * h:
            g, width = h, w
    return _ceil8(-(-runs // g) * width)


def golomb_bits_sequential(gaps: list[int], m: int) -> int:
    """Bits of the sequential Golomb code of ``gaps``: unary quotient + truncated binary
    remainder, one gap at a time."""
    b = (m - 1).bit_length()
    u = (1 << b) - m
    return sum(g // m + 1 + (0 if b == 0 else b - 1 if g % m < u else b) for g in gaps)


def _width(x: int) -> int:
    """Bytes of the smallest unsigned int holding ``x``."""
    return next(b for b in (1, 2, 4, 8) if x < 256 ** b)


def expected_bytes(enc, t: torch.Tensor) -> tuple[int, int]:
    """(payload, index) bytes of ``enc`` by the formulas of hwprune.storage.encodings' table,
    counted independently from ``t`` (with -0.0 read as +0.0 under zero signs)."""
    e, n_el = t.element_size(), t.numel()
    rows, cols = (t.shape[0], n_el // t.shape[0]) if t.dim() >= 2 else (1, n_el)
    flat = raw(t).reshape(-1)
    negzero = flat == raw(torch.tensor(-0.0, dtype=t.dtype))
    zero_signs = bool(enc.meta.get("zero_signs"))
    nz = (flat != 0) & ~negzero if zero_signs else flat != 0
    z = int(nz.sum())
    m = enc.meta
    if enc.encoding == "dense":
        payload, index = n_el * e, 0
    elif enc.encoding == "bitmask":
        payload, index = z * e, _ceil8(n_el)
    elif enc.encoding == "csr":
        payload, index = z * e, (rows + 1) * _width(z) + z * _width(max(cols - 1, 0))
    elif enc.encoding == "kofn":
        k, n = m["k"], m["n"]
        runs = n_el // n
        payload = runs * k * e
        if m["positions"] == "coded":
            index = coded_rank_bytes(runs, math.comb(n, k))
        else:
            bits = math.ceil(math.log2(math.comb(n, k))) if m["positions"] == "rank" else \
                k * math.ceil(math.log2(n))
            index = _ceil8(runs * bits)
    elif enc.encoding == "gaps":  # positions of the smaller set of nonzeros / zeros
        coded = (~nz if 2 * z > n_el else nz).nonzero().reshape(-1).tolist()
        gaps = [p - q - 1 for p, q in zip(coded, ([-1] + coded)[: len(coded)], strict=True)]
        payload, index = z * e, _ceil8(golomb_bits_sequential(gaps, m["m"]))
    elif enc.encoding in ("block", "unified"):
        blk = Block(m["bh"], m["bw"])
        groups = blk.to_groups(nz.reshape(rows, cols).float())
        valid = blk.to_groups(torch.ones(rows, cols)) > 0
        alive = groups.sum(1) > 0
        if enc.encoding == "block":
            payload, index = e * int(valid[alive].sum()), _ceil8(valid.shape[0])
        else:
            mags = blk.to_groups(t.reshape(rows, cols).abs().float())
            top = mags.amax(1, keepdim=True)
            same = ((mags == top) | ~valid).all(1) & alive
            free = alive & ~same
            payload = e * (int(same.sum()) + int(valid[free].sum()))
            index = _ceil8(2 * valid.shape[0]) + _ceil8(int(valid[same].sum()))
    elif enc.encoding == "rowblock":
        sizes = row_block_sizes(nz.reshape(rows, cols))
        blocks = {b: int((sizes == b).sum()) * -(-cols // b) for b in set(sizes.tolist())}
        payload = e * sum(blocks.values())
        index = _ceil8(3 * rows) + sum(_ceil8(c * math.ceil(math.log2(b)))
                                       for b, c in blocks.items())
    else:  # quantized
        payload, index = _ceil8(n_el * (2 * m["qmax"]).bit_length()) + e, 0
    if zero_signs:
        index += _ceil8(int(((flat == 0) | negzero).sum()))
    if "qvalues" in m:  # the same values as integer codes + one scale
        q = m["qvalues"]
        assert sum(q["counts"].values()) * e == payload
        payload = sum(_ceil8(c * (2 * q["qmax"]).bit_length()) for c in q["counts"].values()) + e
    return payload, index


def row_block_sizes(nz: torch.Tensor) -> torch.Tensor:
    """Per row, the largest of 1, 2, 4, ..., 64 (<= cols) with at most one nonzero in every
    block of that many consecutive weights."""
    rows, cols = nz.shape
    out = torch.ones(rows, dtype=torch.long)
    for r in range(rows):
        for b in (2, 4, 8, 16, 32, 64):
            if b <= cols and all(int(nz[r, i:i + b].sum()) <= 1 for i in range(0, cols, b)):
                out[r] = b
    return out


def _real_pruned(structure: str, out: int, cin: int, kernel: int, sparsity: float,
                 seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, cin, 1), torch.nn.Conv2d(cin, out, kernel))
    if structure == "unify":  # ADMM weight unification: zero, unified and free 1x4 blocks
        pruner = hp.ADMM(model, block=(1, 4), unify=0.5, zero=sparsity / 2, targets=["1"])
        pruner.hard_project()
    elif structure == "quantized":  # DPP's joint 8-bit quantization baked in
        pruner = hp.DPP(model, "2:4", quantize_bits=8, logit_init="magnitude", targets=["1"])
    elif structure == "darb":  # per-row block-max masks
        pruner = hp.DARB(model, ratio=1 / (1 - sparsity) if sparsity < 0.75 else 4.0,
                         targets=["1"])
    else:
        pruner = hp.Magnitude(model, structure, None if ":" in structure[:3] else sparsity,
                              targets=["1"])
    return pruner.finalize()[1].weight.detach()


@settings(max_examples=20, deadline=None)
@given(structure=st.sampled_from(["element", "channel", "filter", "kernel", "2:4", "1:4",
                                  "block:2x2", "block:1x4", "unify", "quantized", "darb"]),
       out=st.integers(2, 9), cin=st.sampled_from([4, 8, 12]), kernel=st.sampled_from([1, 3]),
       sparsity=st.floats(0.1, 0.9), seed=st.integers(0, 1000))
def test_every_encoding_on_real_pruned_weights_round_trips_with_exact_byte_counts(
        structure, out, cin, kernel, sparsity, seed):
    w = _real_pruned(structure, out, cin, kernel, sparsity, seed)
    hint = None if structure in ("unify", "quantized", "darb") else structure
    encs = encodings_for(w, hints=hint)
    for enc in encs:
        assert_bits_equal(enc.decode(), w)
        assert (enc.nbytes, enc.index_bytes) == expected_bytes(enc, w), enc.encoding
        info = summarize(enc, w)  # the report's record: a defined minimum for every encoding
        assert info["total_bytes"] == enc.total_bytes and info["min_index_bits"] >= 0
        if enc.encoding != "gaps":  # a variable-length code can undercut it on one pattern
            assert info["min_index_bits"] <= 8 * enc.index_bytes + 1e-6
    best = choose(w, hints=hint, code_values=False)
    assert best.total_bytes == min(e.total_bytes for e in encs)
    found = {e.encoding for e in encs}
    assert {"dense", "bitmask", "csr", "block", "rowblock", "unified"} <= found
    if structure in ("2:4", "1:4", "quantized"):
        assert "kofn" in found
    if structure == "quantized":  # a 2:4 pattern + 8-bit codes beats codes for every weight
        dense_codes = next(e for e in encs if e.encoding == "quantized")
        assert "qvalues" in best.meta and best.total_bytes < dense_codes.total_bytes


def test_quantized_sparse_weights_store_pattern_plus_codes(tmp_path):
    w = _real_pruned("quantized", 16, 8, 3, 0.5, seed=1)
    enc = choose(w)
    runs = w.numel() // 4
    assert (enc.encoding, enc.meta["k"], enc.meta["n"]) == ("kofn", 2, 4)
    assert enc.meta["qvalues"]["counts"] == {"values": 2 * runs}
    q = enc.meta["qvalues"]["qmax"]
    assert enc.nbytes == _ceil8(2 * runs * (2 * q).bit_length()) + 4  # codes + the scale
    info = stored_bytes(w)
    assert info["payload_bytes"] == enc.nbytes and info["index_bytes"] == enc.index_bytes
    assert math.isclose(info["min_index_bits"], runs * math.log2(6))
    save({"w": w}, tmp_path / "q.hwp")
    assert_bits_equal(load(tmp_path / "q.hwp")["w"], w)
    bad = type(enc)(enc.encoding, enc.dtype, enc.shape, enc.payload, enc.index,
                    {**enc.meta, "qvalues": {"qmax": 300, "counts": {"values": 2 * runs}}})
    with pytest.raises(StorageError, match="quantized values"):
        decode(bad)


def test_darb_weights_are_stored_as_rowblocks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 1), torch.nn.Conv2d(16, 32, 3))
    pruner = hp.DARB(model, ratio=8.0, targets=["1"])
    assigned = pruner.block_sizes["1.weight"].clone()
    w = pruner.finalize()[1].weight.detach()
    enc = choose(w)
    assert enc.encoding == "rowblock"
    assert_bits_equal(enc.decode(), w)
    sizes = torch.from_numpy(ENCODINGS["rowblock"].row_sizes(enc))
    # each row takes the largest size whose blocks hold one weight: never below DARB's b_r
    assert torch.equal(sizes, row_block_sizes((w != 0).reshape(32, -1)))
    assert (sizes >= assigned).all()
    kept = int((w != 0).sum())
    assert 8 * enc.index_bytes / kept < 8 * encode(w, "bitmask").index_bytes / kept / 2


def test_hints():
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(8, 32)
    pos = torch.randint(0, 8, (8, 4, 1), generator=g)
    w.view(8, 4, 8).scatter_(2, pos, torch.randn(8, 4, 1, generator=g))  # 1 of 8, scattered
    assert choose(w, hints="1:8").meta["n"] in (8, 16)
    assert stored_bytes(w, hints=hp.structures.KofN(1, 8))["encoding"] == "kofn"
    with pytest.raises(StorageError, match="hint"):
        choose(w, hints={"kofn": (1,)})
    with pytest.raises(StorageError, match="bad storage hint"):
        choose(w, hints="nonsense")


# -- the container ---------------------------------------------------------------------------
def state_dicts():
    """Mixed state dicts: every float dtype, sparse and dense, odd dtypes, 0-d and empty."""
    def build(seed, sparsity, dtypes):
        out = {}
        for i, dtype in enumerate(dtypes):
            out[f"layer{i}.weight"] = sparse_tensor((3, 4, 2), dtype, sparsity, seed + i, True)
        out["bn.num_batches_tracked"] = torch.tensor(seed, dtype=torch.int64)
        out["mask"] = torch.rand(5, generator=torch.Generator().manual_seed(seed)) < 0.5
        out["empty"] = torch.zeros(0, 4)
        return out

    return st.builds(build, st.integers(0, 10_000), st.floats(0, 1),
                     st.lists(st.sampled_from(FLOATS), min_size=1, max_size=4))


def _overhead(data: bytes) -> int:
    """What a version 2 file spends besides the tensors' bytes: the length prefix, the
    safetensors header and the compressed document (its array's size, read from the header)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + header_len])
    assert set(header) == {"__metadata__", container_mod.DOC_KEY, container_mod.DATA_KEY}
    start, end = header[container_mod.DOC_KEY]["data_offsets"]
    return 8 + header_len + end - start


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=state_dicts(), compress=st.sampled_from([None, "zlib", "lzma"]))
def test_save_load_round_trips_and_file_size_is_accounted(tmp_path, sd, compress):
    path = tmp_path / "m.hwp"
    written = save(sd, path, compress=compress)
    data = path.read_bytes()
    assert written == len(data)
    out = load(path)
    assert list(out) == list(sd)
    for name, t in sd.items():
        assert_bits_equal(out[name], t)
    stored = sum(stored_bytes(t)["total_bytes"] for t in sd.values())
    layout = file_layout(path)
    if compress is None:
        overhead = _overhead(data)
        assert len(data) == overhead + stored
        assert layout == {"compressed": False, "header_bytes": overhead,
                          "data_bytes": stored, "size": len(data)}
    else:
        head = container_mod.COMPRESSED_HEADER_SIZE
        assert head == 56 and data[:8] == b"HWPRUNEZ"
        assert layout["header_bytes"] == head and layout["data_bytes"] == len(data) - head
        assert hashlib.sha256(data[head:]).digest() == data[24:56]
        plain = tmp_path / "plain.hwp"
        save(sd, plain)
        inner = zlib.decompress(data[head:]) if compress == "zlib" else __import__(
            "lzma").decompress(data[head:])
        assert inner == plain.read_bytes()  # saving is deterministic, too


def test_plan_is_the_file_save_writes(tmp_path, tiny):
    hp.Magnitude(tiny, "2:4", None).finalize()
    hints = {"conv2.weight": "2:4"}
    fp = plan(tiny, hints)
    path = tmp_path / "m.hwp"
    assert save(tiny, path, hints=hints) == fp.size == len(fp.data)
    data = path.read_bytes()
    assert data == fp.data
    assert fp.header_bytes == _overhead(data)  # the whole container overhead
    assert fp.data_bytes == sum(stored_bytes(t, hints.get(k))["total_bytes"]
                                for k, t in tiny.state_dict().items())
    assert fp.encoded["conv2.weight"].encoding == "kofn"


def test_module_save_load(tmp_path, tiny):
    save(tiny, tmp_path / "t.hwp")
    out = load(tmp_path / "t.hwp")
    ref = tiny.state_dict()
    assert list(out) == list(ref)
    fresh = TinyNet()
    fresh.load_state_dict(out)
    for name, t in fresh.state_dict().items():
        assert_bits_equal(t, ref[name])


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    sd = {"a.weight": sparse_tensor((4, 8), torch.float32, 0.5, 1, True),
          "b.weight": pruned("2:4")["conv2.weight"][:2].contiguous(),
          "c.bias": torch.arange(3, dtype=torch.float16)}
    files = {}
    for compress in (None, "zlib"):
        save(sd, d / f"{compress}.hwp", compress=compress)
        files[compress] = (d / f"{compress}.hwp").read_bytes()
    return d, files


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(compress=st.sampled_from([None, "zlib"]), where=st.floats(0, 1, exclude_max=True),
       flip=st.integers(1, 255))
def test_a_flipped_byte_is_refused_or_changes_nothing(small_files, compress, where, flip):
    # refused, except the padding bits of the document's last deflate byte, which zlib ignores
    # (found by this test): never a different tensor
    d, files = small_files
    data = bytearray(files[compress])
    data[int(where * len(data))] ^= flip
    path = d / "bad.hwp"
    path.write_bytes(bytes(data))
    try:
        out = load(path)
    except StorageError:
        return
    (d / "good.hwp").write_bytes(files[compress])
    for name, t in load(d / "good.hwp").items():
        assert_bits_equal(out[name], t)


def _flips_that_load(data: bytes, path, flips: tuple[int, ...]) -> list[tuple[int, bytes]]:
    """(position, flipped file) of every flip of every byte of ``data`` that loads."""
    loaded = []
    for i in range(len(data)):
        for flip in flips:
            bad = bytearray(data)
            bad[i] ^= flip
            path.write_bytes(bytes(bad))
            try:
                load(path)
            except StorageError:
                continue
            loaded.append((i, bytes(bad)))
    return loaded


def test_a_flip_that_loads_leaves_the_document_as_it_was_and_the_data_untouched(small_files):
    # every byte of the uncompressed file, every single-bit flip and the whitespace flips: a
    # flip loads only where the document's frame ignores the bit (its header's unused bit,
    # spare bits of a block's tables; zstd's checksum covers what the frame decodes to), so
    # the file still means the same: found by this scan
    d, files = small_files
    data = files[None]
    doc = safetensors.numpy.load(data)[container_mod.DOC_KEY].tobytes()
    start, end = data.index(doc), data.index(doc) + len(doc)
    text = zstandard.ZstdDecompressor().decompress(doc)
    flips = (1, 2, 4, 8, 16, 32, 64, 128, 0x29, 0x2A, 0x2D)
    for i, bad in _flips_that_load(data, d / "scan.hwp", flips):
        assert start <= i < end, i
        assert zstandard.ZstdDecompressor().decompress(bad[start:end]) == text, i


def test_a_version_7_documents_one_flip_that_loads_is_in_its_last_deflate_byte(tmp_path):
    # the zlib document of a version 7 file: the padding bits of its last deflate byte, which
    # zlib ignores, and nothing else
    records, arrays = [], {}
    w = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    records.append(packing.tensor_record("w", choose(w), arrays))
    data = container_mod.pack(records, arrays, version=7)
    loaded = {i for i, _ in _flips_that_load(data, tmp_path / "v7.hwp", (1, 2, 4, 8, 16, 32,
                                                                          64, 128))}
    assert loaded <= {len(data) - 5}  # before the 4-byte Adler-32 that ends a zlib stream


def test_every_byte_flip_of_the_header_is_refused(small_files):
    # found by hypothesis: a padding space of the safetensors header flipped to a tab, a
    # newline or a carriage return parsed the same and was not refused (the checksum does not
    # cover the header); the flips that keep ASCII whitespace, and a low and a high bit
    d, files = small_files
    data = files[None]
    path = d / "bad_header.hwp"
    end = 8 + int.from_bytes(data[:8], "little")
    for i in range(end):
        for flip in (0x29, 0x2A, 0x2D, 1, 128):
            bad = bytearray(data)
            bad[i] ^= flip
            path.write_bytes(bytes(bad))
            with pytest.raises(StorageError):
                load(path)


def test_every_byte_flip_of_the_compressed_header_is_refused(small_files):
    # the uncompressed length field lies outside the body's checksum (found by hypothesis:
    # a flipped top bit made zlib raise OverflowError instead of the container's error)
    d, files = small_files
    path = d / "bad_zheader.hwp"
    for i in range(container_mod.COMPRESSED_HEADER_SIZE):
        for flip in (1, 128):
            data = bytearray(files["zlib"])
            data[i] ^= flip
            path.write_bytes(bytes(data))
            with pytest.raises(StorageError):
                load(path)


def test_every_header_byte_flip_is_refused(small_files):
    d, files = small_files
    data = files[None]
    (header_len,) = struct.unpack("<Q", data[:8])
    path = d / "bad_header.hwp"
    for i in range(0, 8 + header_len, 3):
        bad = bytearray(data)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(StorageError):
            load(path)


@pytest.mark.parametrize("compress", [None, "zlib"])
def test_truncated_or_extended_files_are_refused(small_files, compress):
    d, files = small_files
    data = files[compress]
    path = d / "cut.hwp"
    for n in sorted({0, 1, 7, 8, 9, 55, 56, 57, len(data) // 2, len(data) - 1}):
        path.write_bytes(data[:n])
        with pytest.raises(StorageError):
            load(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(StorageError):
        load(path)


class _Boom:
    """A pickle that would run code when unpickled."""

    def __reduce__(self):
        return (_detonate, ())


EXPLODED = []


def _detonate():
    EXPLODED.append(True)
    return {}


def test_load_never_unpickles(tmp_path, small_files, monkeypatch):
    for i, payload in enumerate([pickle.dumps({"w": _Boom()}), None]):
        path = tmp_path / f"evil{i}.hwp"
        if payload is None:
            torch.save({"w": _Boom()}, path)  # the zip format, pickle inside
        else:
            path.write_bytes(payload)
        with pytest.raises(StorageError):
            load(path)
    assert not EXPLODED

    # load of a good file goes through safetensors only: no pickle or torch.load anywhere
    def forbidden(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    for target, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
                         (torch, "load"), (np, "load")]:
        monkeypatch.setattr(target, attr, forbidden)
    d, files = small_files
    assert set(load(d / "None.hwp")) == {"a.weight", "b.weight", "c.bias"}


def test_writes_are_atomic_and_bad_input_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.hwp"
    save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(container_mod.os, "replace", fail)
    with pytest.raises(OSError):
        save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.hwp"]  # no temporary file left
    with pytest.raises(StorageError, match="compress"):
        save({"w": torch.ones(3)}, path, compress="gzip")
    with pytest.raises(StorageError, match="str -> torch.Tensor"):
        save({"w": [1, 2]}, path)
    with pytest.raises(StorageError):
        load(tmp_path / "missing.hwp")
    # a path no file can be written to is refused by name before anything is encoded
    monkeypatch.setattr(container_mod, "_encode", fail)
    with pytest.raises(IsADirectoryError, match="is a folder.*" + str(tmp_path)):
        save({"w": torch.ones(3)}, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder.*missing"):
        save({"w": torch.ones(3)}, tmp_path / "missing" / "m.hwp")
    monkeypatch.undo()

    def refuse(*args, **kwargs):  # a folder that takes no new file (read-only, /proc)
        raise PermissionError(13, "Permission denied", str(tmp_path / ".m.hwp.x.tmp"))

    monkeypatch.setattr("hwprune.files.tempfile.mkstemp", refuse)
    with pytest.raises(PermissionError, match=f"cannot create a file in {tmp_path}") as err:
        save({"w": torch.ones(3)}, path)
    assert err.value.filename == str(path)  # the user's path, not the temporary file's
    monkeypatch.undo()
    # tensors whose bits are not their values are refused by name, before anything is encoded
    with warnings.catch_warnings():  # torch deprecates making quantized tensors, not holding them
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8)
    for bad, why in ((torch.empty(4, device="meta"), "meta device"),
                     (quantized, "quantized tensors"), (torch.eye(3).to_sparse(), "strided")):
        with pytest.raises(StorageError, match=f"'b': .*{why}"):
            save({"a": torch.ones(3), "b": bad}, path)
        with pytest.raises(StorageError, match=why):
            choose(bad)
    assert path.read_bytes() == before


def test_registry_and_errors():
    assert set(ENCODINGS) == {"dense", "bitmask", "csr", "kofn", "block", "rowblock",
                              "unified", "quantized", "gaps"}
    assert issubclass(StorageError, hp.HwpruneError)
    with pytest.raises(StorageError, match="unknown encoding"):
        encode(torch.ones(2), "zip")
    with pytest.raises(StorageError, match="takes parameters"):
        encode(torch.ones(2, 4), "block", k=2)
    with pytest.raises(StorageError, match="strided"):
        choose(torch.eye(3).to_sparse())
    enc = encode(torch.ones(2, 2), "dense")
    with pytest.raises(StorageError):
        decode(type(enc)("bitmask", enc.dtype, enc.shape, {}, {}, {}))


def _write_version_1(sd, path):
    """A file as hwprune wrote it before version 2: one safetensors entry per array and the
    whole document in the metadata."""
    records, arrays = [], {}
    for name, t in sd.items():
        # the encodings save chooses (small vectors: dense or bitmask)
        only = saved_encodings(TensorView.of(t), None)
        records.append(packing.tensor_record(name, choose(t, only=only), arrays))
    doc = {"format": container_mod.FORMAT, "version": 1,
           "sha256": packing.checksum(records, arrays, 1), "tensors": records}
    path.write_bytes(safetensors.numpy.save(
        arrays, metadata={container_mod.META_KEY: packing.canonical_json(doc)}))


def test_version_1_files_still_load_bitwise(tmp_path):
    sd = pruned("2:4")
    old = tmp_path / "v1.hwp"
    _write_version_1(sd, old)
    out = load(old)
    assert list(out) == list(sd)
    for name, t in sd.items():
        assert_bits_equal(out[name], t)
    layout = file_layout(old)
    assert layout["data_bytes"] == sum(stored_bytes(t)["total_bytes"] for t in sd.values())
    new = tmp_path / "v2.hwp"
    save(sd, new)
    # the packed document costs far less than one header entry (plus a JSON copy) per array
    assert file_layout(new)["header_bytes"] * 3 < layout["header_bytes"]
    bad = bytearray(old.read_bytes())
    bad[-1] ^= 1
    old.write_bytes(bytes(bad))
    with pytest.raises(StorageError, match="checksum"):
        load(old)


def test_a_version_2_file_with_a_lying_array_list_is_refused(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}  # 2-D: every encoding tried
    path = tmp_path / "m.hwp"
    save(sd, path)
    data = path.read_bytes()
    stored = safetensors.numpy.load(data)
    (header_len,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8: 8 + header_len])["__metadata__"]
    doc = json.loads(zstandard.ZstdDecompressor().decompress(
        stored[container_mod.DOC_KEY].tobytes()))
    for change in ({"count": 5}, {"count": 7}, {"dtype": "<c8"}, {"dtype": "|O"}):
        lie = json.loads(json.dumps(doc))
        key, dtype, count = lie["arrays"][0]
        lie["arrays"][0] = [key, change.get("dtype", dtype), change.get("count", count)]
        packed = {container_mod.DOC_KEY: np.frombuffer(
            packing.compress_document(json.dumps(lie).encode()), np.uint8),
            container_mod.DATA_KEY: stored[container_mod.DATA_KEY]}
        path.write_bytes(safetensors.numpy.save(packed, metadata=metadata))
        with pytest.raises(StorageError):
            load(path)


def test_save_flushes_to_disk_unless_asked_not_to_and_writes_the_same_bytes(tmp_path,
                                                                           monkeypatch):
    import hwprune.files

    real_fsync, calls = os.fsync, []
    monkeypatch.setattr(hwprune.files.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    sd = pruned("2:4")
    save(sd, tmp_path / "synced.hwp")
    assert len(calls) == 1
    save(sd, tmp_path / "unsynced.hwp", sync=False)
    assert len(calls) == 1
    assert (tmp_path / "synced.hwp").read_bytes() == (tmp_path / "unsynced.hwp").read_bytes()
