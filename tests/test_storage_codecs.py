"""The entropy coders under the index and the values: Golomb-coded gaps, radix-packed k-of-n
ranks and Huffman-coded value planes. Each round-trips bitwise, costs what its size formula
says, stays within 2 % of the information bound where it claims to, and refuses a malformed
stream with ``StorageError`` (docs/storage.md)."""

import json
import math
import struct

import numpy as np
import pytest
import safetensors.numpy
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hwprune.storage import StorageError, choose, container, decode, encode, load, packing, save
from hwprune.storage.bits import pack_radix, radix_group, raw_bits, unpack_radix
from hwprune.storage.encodings import valuecoding
from hwprune.storage.encodings.valuecoding import VCODED, code_values, decode_values
from hwprune.storage.golomb import golomb_bits, golomb_decode, golomb_encode

SETTINGS = settings(max_examples=60, deadline=None)


def log2_comb(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(raw_bits(a), raw_bits(b))


# -- Golomb-coded gaps -----------------------------------------------------------------------
@SETTINGS
@given(gaps=st.lists(st.integers(0, 5000), max_size=300), m=st.integers(1, 300))
def test_golomb_round_trips_with_the_sequential_bit_count(gaps, m):
    g = np.array(gaps, np.int64)
    stream = golomb_encode(g, m)
    b = (m - 1).bit_length()
    u = (1 << b) - m
    sequential = sum(x // m + 1 + (0 if b == 0 else b - 1 if x % m < u else b) for x in gaps)
    assert golomb_bits(g, m) == sequential and stream.size == -(-sequential // 8)
    assert np.array_equal(golomb_decode(stream, len(gaps), m), g)


@SETTINGS
@given(gaps=st.lists(st.integers(0, 200), min_size=1, max_size=100), m=st.integers(1, 40),
       cut=st.integers(1, 4), extra=st.integers(0, 255))
def test_golomb_refuses_streams_that_are_short_long_or_padded_wrong(gaps, m, cut, extra):
    g = np.array(gaps, np.int64)
    stream = golomb_encode(g, m)
    with pytest.raises(StorageError):
        golomb_decode(np.concatenate([stream, np.array([extra], np.uint8)]), len(gaps), m)
    with pytest.raises(StorageError):
        golomb_decode(stream, len(gaps) + cut * 1000, m)  # more gaps than the stream holds
    pad = -golomb_bits(g, m) % 8
    if pad:
        bad = stream.copy()
        bad[-1] |= 1  # a padding bit set
        with pytest.raises(StorageError):
            golomb_decode(bad, len(gaps), m)
    with pytest.raises(StorageError):
        golomb_decode(stream, len(gaps), 0)


@pytest.mark.parametrize("density", [0.005, 0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_gaps_index_is_within_2_percent_of_log2_comb(density):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 64, 3, 3, generator=g)
    w = torch.where(torch.rand(w.shape, generator=g) < density, w, 0.0)
    enc = encode(w, "gaps")
    assert same_bits(enc.decode(), w)
    kept = int((w != 0).sum())
    assert 8 * enc.index_bytes <= 1.02 * log2_comb(w.numel(), kept) + 8
    assert enc.meta["zeros"] is (kept > w.numel() / 2)  # the smaller set is coded


@SETTINGS
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
       density=st.floats(0, 1), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64,
                              torch.int32]))
def test_gaps_round_trips_on_any_density_including_empty_and_full(shape, density, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 100).to(dtype)
    w = torch.where(torch.rand(shape, generator=g) < density, w, torch.zeros((), dtype=dtype))
    if w.numel() == 0:
        with pytest.raises(StorageError):
            encode(w, "gaps")
        return
    enc = encode(w, "gaps")
    assert same_bits(enc.decode(), w)
    best = choose(w)
    assert same_bits(decode(best), w)


# -- k-of-n ranks packed in base C(n, k) -----------------------------------------------------
@SETTINGS
@given(radix=st.integers(2, 70000), digits=st.lists(st.integers(0, 1 << 20), max_size=200))
def test_radix_packing_round_trips_near_log2_radix(radix, digits):
    d = np.array([x % radix for x in digits], np.uint64)
    packed = pack_radix(d, radix)
    assert np.array_equal(unpack_radix(packed, radix, d.size), d)
    g, width = radix_group(radix)
    assert radix ** g < 1 << 64 and width == (radix ** g - 1).bit_length()
    assert width / g <= math.log2(radix) * 1.02 + 1 / g  # never worse than one spare bit a group


def test_radix_packing_refuses_out_of_range_groups_and_padding():
    g, width = radix_group(6)
    d = np.arange(g + 1, dtype=np.uint64) % 6
    packed = pack_radix(d, 6)
    bad = packed.copy()
    bad[:] = 0xFF  # every group >= 6^g
    with pytest.raises(StorageError):
        unpack_radix(bad, 6, d.size)
    with pytest.raises(StorageError):  # a nonzero padding digit in the last group
        unpack_radix(pack_radix(np.ones(2 * g, np.uint64), 6), 6, g + 1)


@pytest.mark.parametrize("k,n", [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2), (4, 16)])
def test_coded_kofn_ranks_are_within_2_percent_of_the_bound(k, n):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, 3, 3, generator=g)
    runs = w.numel() // n
    keep = torch.rand(64, 64 // n, n, 3, 3, generator=g).argsort(dim=2) < k
    w = torch.where(keep.reshape(64, 64, 3, 3), w, 0.0)
    enc = encode(w, "kofn", k=k, n=n, positions="coded")
    assert same_bits(enc.decode(), w)
    assert 8 * enc.index_bytes <= 1.02 * runs * math.log2(math.comb(n, k)) + 8
    rank = encode(w, "kofn", k=k, n=n, positions="rank")
    assert enc.index_bytes <= rank.index_bytes


# -- value planes ----------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(0, 3000), seed=st.integers(0, 1000), scale=st.floats(1e-3, 1e3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       specials=st.booleans())
def test_coded_value_planes_round_trip_bitwise(n, seed, scale, dtype, specials):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * scale).to(dtype)
    if specials and n >= 4:
        w[0], w[1], w[2] = -0.0, float("nan"), float("inf")
        w.view(torch.int16 if w.element_size() == 2 else torch.int32
               if w.element_size() == 4 else torch.int64)[3] |= 1  # a tiny odd payload
    enc = encode(w, "dense")
    coded = code_values(enc)
    assert coded.total_bytes <= enc.total_bytes
    assert same_bits(decode(coded), w)
    if VCODED in coded.meta:
        assert same_bits(decode(decode_values(coded, n)), w)


def test_trained_weights_planes_are_smaller_and_uniform_planes_stay_raw():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, 3, 3, generator=g) * 0.05  # a trained weight's spread
    coded = code_values(encode(w, "dense"))
    lengths = coded.meta[VCODED]["values"][1]
    assert lengths[1] == -1  # a middle mantissa byte: incompressible, kept raw
    assert 0 < lengths[3] < w.numel() * 0.6  # sign + exponent: a few bits a value
    assert coded.total_bytes < 0.9 * w.numel() * 4


@pytest.mark.parametrize("coder", ["zstd", "deflate"])
def test_coded_planes_that_lie_about_their_sizes_are_refused(coder, monkeypatch):
    if coder == "deflate":  # what files of versions 3 and 4 hold
        monkeypatch.setattr(valuecoding, "ZSTD_BYTES", 1 << 62)
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    coded = code_values(encode(w, "dense"))
    count, lengths, *tag = coded.meta[VCODED]["values"]
    assert tag == ([valuecoding.ZSTD] if coder == "zstd" else [])
    for info in ({"values": [count + 1, lengths, *tag]}, {"values": [count, lengths[:3], *tag]},
                 {"values": [count, [*lengths[:3], lengths[3] - 1], *tag]},
                 {"values": [-1, lengths, *tag]}, {"values": "x"}, [1]):
        bad = type(coded)(coded.encoding, coded.dtype, coded.shape, coded.payload, coded.index,
                          {VCODED: info})
        with pytest.raises(StorageError):
            decode(bad)
    planes = coded.payload["values_planes"].copy()
    planes[-5:] ^= 0xA5  # a damaged stream
    bad = type(coded)(coded.encoding, coded.dtype, coded.shape, {"values_planes": planes},
                      coded.index, coded.meta)
    with pytest.raises(StorageError):
        decode(bad)


# -- the file version ------------------------------------------------------------------------
def test_version_2_files_still_load_and_unknown_versions_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.where(torch.rand(32, 32, generator=g) < 0.3,
                           torch.randn(32, 32, generator=g), 0.0),
          "b": torch.randn(32, generator=g)}
    records, arrays = [], {}
    for name, t in sd.items():  # the encodings version 2 knew, values uncoded
        enc = min((encode(t, "bitmask"), encode(t, "dense")), key=lambda e: e.total_bytes)
        records.append(packing.tensor_record(name, enc, arrays))
    old = tmp_path / "v2.hwp"
    old.write_bytes(container.pack(records, arrays, version=2))
    out = load(old)
    assert list(out) == ["w", "b"] and all(same_bits(out[k], sd[k]) for k in sd)
    new = tmp_path / "v8.hwp"
    save(sd, new)
    assert new.stat().st_size < old.stat().st_size
    data = new.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + length])
    meta = json.loads(header["__metadata__"]["hwprune"])
    assert meta["version"] == container.VERSION == 8
    stored = safetensors.numpy.load(data)
    future = tmp_path / "v9.hwp"
    future.write_bytes(safetensors.numpy.save(
        dict(stored), metadata={"hwprune": json.dumps({**meta, "version": 9})}))
    with pytest.raises(StorageError, match="version 9 is not supported.*upgrade"):
        load(future)
    with pytest.raises(StorageError, match="versions 2 to 8"):
        container.pack(records, arrays, version=1)
    # the document is intact
    assert zstandard.ZstdDecompressor().decompress(stored["hwprune.doc"].tobytes())
