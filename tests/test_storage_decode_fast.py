"""The fast paths of loading give exactly what the plain paths give, and stay safe.

* the gaps decoder's few-zeros path (values copied run by run around the zeros) and its mask
  path give the same bits, zeros at the first and last position included;
* value planes are written straight into their byte columns;
* a decoded tensor takes a decoder's fresh output without a copy, and never shares memory
  with a stored array, the file's bytes or another tensor;
* version 2 and 3 files are cut into their two arrays without safetensors' copy, and refused
  wherever safetensors refuses them.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hwprune.storage import StorageError, choose, container, golomb, load, save
from hwprune.storage.bits import aligned_copy, from_raw_bits
from hwprune.storage.encodings import Gaps, decode, gaps, unified, valuecoding
from hwprune.storage.encodings.base import EncodedTensor
from hwprune.storage.fileformat import DATA_KEY, DOC_KEY, PREFIX_SIZE
from hwprune.storage.golomb import golomb_encode
from hwprune.storage.reading import cut_arrays, parse_header

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def few_zeros(draw) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero raw bits with zeros at drawn positions (the first and last ones often)."""
    numel = draw(st.integers(1, 2000))
    width = draw(st.sampled_from([1, 2, 4, 8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    bits = rng.integers(1, 1 << (8 * width - 1), numel, dtype=np.uint64).astype(f"<u{width}")
    zeros = set(draw(st.lists(st.integers(0, numel - 1), max_size=min(numel, 150))))
    zeros |= {p for p, keep in ((0, draw(st.booleans())), (numel - 1, draw(st.booleans())))
              if keep}
    zeros = np.array(sorted(zeros), np.int64)
    bits[zeros] = 0
    return bits, zeros


@SETTINGS
@given(case=few_zeros(), few=st.sampled_from([0, 3, gaps.FEW_ZEROS, 1 << 30]))
def test_values_around_the_zeros_are_the_bits_both_ways(case, few, monkeypatch_module):
    bits, zeros = case
    monkeypatch_module.setattr(gaps, "FEW_ZEROS", few)
    values = bits[bits != 0]
    out = gaps.values_around(values, zeros, bits.size)
    assert out.dtype == bits.dtype and np.array_equal(out, bits)
    assert out.flags.writeable and not np.shares_memory(out, values)


@SETTINGS
@given(case=few_zeros())
def test_gaps_coding_the_zeros_round_trips_exactly(case):
    bits, zeros = case
    assume(2 * zeros.size < bits.size)  # the zeros are coded where they are the fewer
    dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.dtype.itemsize]
    t = torch.from_numpy(bits.view(f"i{bits.dtype.itemsize}").copy()).to(dtype)
    enc = Gaps().encode(t)
    assert enc.meta["zeros"] is True
    assert torch.equal(decode(enc), t)


def test_a_stored_gap_outside_the_tensor_is_refused():
    """Gaps past the tensor (or that would overflow the positions' sum) never reach a copy."""
    values = np.arange(1, 10, dtype=np.uint32)
    for bad in ([0, 10], [3, 1 << 40]):
        enc = EncodedTensor("gaps", torch.int32, (10,), {"values": values[:10 - len(bad)]},
                            {"positions": golomb_encode(np.array(bad), 1 << 20)},
                            {"m": 1 << 20, "zeros": True})
        with pytest.raises(StorageError, match="outside"):
            decode(enc)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[0, :5] = 0.0  # a few zeros (more than FEW_ZEROS_SHARE allows): gaps, zeros coded
    sparse = torch.randn(32, 32) * (torch.rand(32, 32) < 0.1)
    return {"coded": torch.randn(40, 40), "zero": w, "sparse": sparse,
            "small": torch.randn(7), "ints": torch.arange(300, dtype=torch.int64),
            "half": torch.randn(300).half(), "tied": torch.ones(5), "tied2": torch.ones(5)}


def _ranges(tensors) -> list[tuple[int, int]]:
    return sorted((t.untyped_storage().data_ptr(),
                   t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                  for t in tensors if t.numel())


def test_loaded_tensors_are_exact_writable_and_share_no_memory(tmp_path):
    state = _state()
    path = tmp_path / "m.hwp"
    save(state, path)
    encodings = {n: e.encoding for n, e in container.plan(state).encoded.items()}
    assert encodings["zero"] == "gaps" and valuecoding.VCODED in \
        container.plan(state).encoded["coded"].meta
    back = load(path)
    for name, t in state.items():
        assert torch.equal(back[name].view(torch.uint8), t.view(torch.uint8))
    ranges = _ranges(back.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for t in back.values():
        t.add_(1)  # writable, and writing one never changes another
    again = load(path)
    for name, t in state.items():
        assert torch.equal(again[name].view(torch.uint8), t.view(torch.uint8))


def test_decoding_one_encoded_tensor_twice_gives_two_tensors():
    """Only ``decode_values``' own output is taken without a copy: an encoded tensor decoded
    twice (its arrays held by the caller) gives two tensors, neither over its arrays."""
    t = torch.randn(50, 50)
    enc = choose(t)
    assert valuecoding.VCODED in enc.meta and enc.encoding == "dense"
    a, b = decode(enc), decode(enc)
    assert torch.equal(a, t) and torch.equal(b, t)
    assert a.data_ptr() != b.data_ptr()
    raw = choose(t, code_values=False)
    c = decode(raw)
    assert not np.shares_memory(c.numpy(), raw.payload["values"])
    assert not np.shares_memory(c.numpy(), t.numpy())


def test_from_raw_bits_copies_unless_it_owns_a_writable_aligned_array():
    bits = np.arange(1, 13, dtype=np.uint32)
    assert not np.shares_memory(from_raw_bits(bits, torch.int32, (3, 4)).numpy(), bits)
    assert np.shares_memory(from_raw_bits(bits, torch.int32, (12,), owned=True).numpy(), bits)
    frozen = bits.copy()
    frozen.flags.writeable = False
    assert not np.shares_memory(from_raw_bits(frozen, torch.int32, (12,), owned=True).numpy(),
                                frozen)
    raw = (b"\0" + bits.tobytes())
    unaligned = np.frombuffer(raw, np.uint32, 12, 1)
    t = from_raw_bits(unaligned, torch.int32, (12,), owned=True)
    assert torch.equal(t, torch.arange(1, 13, dtype=torch.int32))
    copy = aligned_copy(unaligned)
    assert copy.flags.aligned and copy.flags.writeable and np.array_equal(copy, bits)


# -- cutting the two arrays out of the file ---------------------------------------------------
def _rewritten(data: bytes, change) -> bytes:
    """``data`` with its safetensors header changed by ``change(entries)`` (re-padded)."""
    (length,) = struct.unpack_from("<Q", data)
    entries = json.loads(data[PREFIX_SIZE: PREFIX_SIZE + length])
    change(entries)
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[PREFIX_SIZE + length:]


def _set(key: str, field: str, value):
    def change(entries):
        entries[key][field] = value
    return change


def _swap_order(entries):
    # the document first, then the data: offsets that no longer match the bytes
    (d0, d1), (c0, c1) = entries[DATA_KEY]["data_offsets"], entries[DOC_KEY]["data_offsets"]
    entries[DOC_KEY]["data_offsets"] = [0, c1 - c0]
    entries[DATA_KEY]["data_offsets"] = [c1 - c0 - 1, c1 - c0 - 1 + d1 - d0]


@pytest.mark.parametrize("change, theirs", [
    (_set(DOC_KEY, "dtype", "I8"), False), (_set(DATA_KEY, "dtype", "F32"), True),
    (_set(DATA_KEY, "shape", [3]), True), (_set(DOC_KEY, "shape", [1, 1]), True),
    (_set(DATA_KEY, "shape", True), True), (_swap_order, True),
], ids=["doc int8", "data dtype", "data shape", "doc 2-D", "shape bool", "overlap"])
def test_arrays_safetensors_would_refuse_are_refused(tmp_path, change, theirs):
    """Everything safetensors' reader refuses (``theirs``), and arrays of another dtype than
    the uint8 hwprune writes."""
    data = container.plan({"w": torch.randn(20), "b": torch.ones(3)}).data
    bad = _rewritten(data, change)
    if theirs:
        with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error types
            safetensors.numpy.load(bad)
    path = tmp_path / "bad.hwp"
    path.write_bytes(bad)
    with pytest.raises(StorageError, match="not an intact|does not match"):
        load(path)


def test_the_arrays_are_cut_from_the_file_bytes_without_a_copy(tmp_path):
    state = _state()
    data = container.plan(state).data
    arrays = cut_arrays(data, parse_header(data))
    reference = safetensors.numpy.load(data)
    assert set(arrays) == set(reference)
    for key, a in arrays.items():
        assert np.array_equal(a, reference[key]) and not a.flags.writeable
        assert np.shares_memory(a, np.frombuffer(data, np.uint8))


@SETTINGS
@given(n=st.integers(0, 700), step=st.sampled_from([1, 2, 5, 64, 1 << 18]),
       seed=st.integers(0, 10_000), width=st.sampled_from([2, 4, 8]))
def test_equal_neighbours_step_by_step_is_the_whole_count(n, step, seed, width,
                                                         monkeypatch_module):
    rng = np.random.default_rng(seed)
    sign = 1 << (8 * width - 1)
    # few distinct magnitudes, random signs, some zeros: many equal neighbours
    bits = (rng.integers(0, 3, n).astype(np.uint64) | (rng.integers(0, 2, n).astype(
        np.uint64) * np.uint64(sign))).astype(f"<u{width}")
    mag = bits & ~bits.dtype.type(sign)
    whole = int(np.count_nonzero((mag[1:] == mag[:-1]) & (mag[1:] != 0)))
    monkeypatch_module.setattr(unified, "_STEP", step)
    assert unified.equal_neighbours(bits, width) == whole


@SETTINGS
@given(gaps=st.lists(st.integers(0, 3000), min_size=1, max_size=400),
       ms=st.lists(st.integers(1, 5000), min_size=1, max_size=12), cells=st.sampled_from(
           [1, 1 << 20]))
def test_histogram_bits_of_every_parameter_are_the_exact_counts(gaps, ms, cells,
                                                               monkeypatch_module):
    monkeypatch_module.setattr(golomb, "_HISTOGRAM_CELLS", cells)  # all at once, or one by one
    gaps = np.array(gaps, np.int64)
    bits = golomb.histogram_bits(np.bincount(gaps), np.array(ms, np.int64))
    assert bits.tolist() == [golomb.golomb_bits(gaps, m) for m in ms]
    assert bits.tolist() == [8 * golomb.golomb_encode(gaps, m).size - (-golomb.golomb_bits(
        gaps, m) % 8) for m in ms]


@SETTINGS
@given(positions=st.sets(st.integers(0, 10_000), max_size=300),
       dtype=st.sampled_from([np.int64, np.uint32, np.uint64]))
def test_gaps_of_sorted_positions_count_from_minus_one(positions, dtype):
    p = np.array(sorted(positions), dtype)
    g = golomb.gaps_of(p)
    previous = [-1, *p.tolist()][: p.size]
    assert g.dtype == np.int64 and g.tolist() == [
        int(x) - prev - 1 for x, prev in zip(p.tolist(), previous, strict=True)]
    m, bits = golomb.best_parameter_bits(g, 10_001)
    assert m == golomb.best_parameter(g, 10_001) and bits == golomb.golomb_bits(g, m)
