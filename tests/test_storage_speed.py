"""The fast paths of saving and reporting give exactly what the plain paths give.

* value planes (de)compressed in threads: the same coded bytes as one after the other;
* the chooser's shortcuts (k-of-n run counts from halvings, the gaps lower bound) give the
  direct counts and never skip a candidate that could win (the encodings' family bounds among
  them); small vectors are saved dense or as a bitmask (without analysis where they have no
  zero), and ``stored_bytes`` counts what the file holds; analysed tensors are read
  in place and never written; value planes are coded only where their entropy gains;
* ``plan`` choosing large tensors in a thread pool: the same file bytes as in one thread;
* MACs counted on ``meta`` tensors: the same counts as the real forward pass, and models that
  cannot run on meta are counted by the real pass.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hwprune as hp
from hwprune.models import resnet20
from hwprune.report import macs
from hwprune.storage import StorageError, choose, container, load, packing, save, stored_bytes
from hwprune.storage.encodings import (
    Gaps,
    KofNEncoding,
    saved_encodings,
    small_vector_choice,
    valuecoding,
)
from hwprune.storage.encodings.base import EncodedTensor, TensorView
from hwprune.storage.encodings.kofn import run_counts
from hwprune.storage.encodings.valuecoding import MIN_CODED
from hwprune.storage.golomb import best_parameter, golomb_bits, tried_parameters

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def value_arrays(draw) -> np.ndarray:
    width = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(0, 3000))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # a few distinct top bytes (like float exponents) over uniform low bytes: some planes
    # gain from coding and some do not
    raw = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
    raw[:, -1] = rng.integers(0, draw(st.integers(1, 256)), size=n, dtype=np.uint8)
    return raw.reshape(-1).view(f"<u{width}")


@SETTINGS
@given(arr=value_arrays())
def test_split_and_join_planes_are_inverse_and_take_byte_j_of_every_value(arr):
    planes = valuecoding.split_planes(arr)
    width = arr.dtype.itemsize
    assert planes.shape == (width, arr.size)
    for j in range(width):
        assert np.array_equal(planes[j], (arr >> np.uint64(8 * j)).astype(np.uint8))
    assert np.array_equal(valuecoding.join_planes(planes), arr)


@SETTINGS
@given(arr=value_arrays())
def test_threaded_value_coding_is_bitwise_the_serial_one(arr, monkeypatch_module):
    enc = EncodedTensor("dense", torch.float32, (arr.size,), {"values": arr}, {}, {})
    monkeypatch_module.setattr(valuecoding, "THREADED_BYTES", 1 << 62)
    serial = valuecoding.code_values(enc)
    monkeypatch_module.setattr(valuecoding, "THREADED_BYTES", 1)
    threaded = valuecoding.code_values(enc)
    assert serial.meta == threaded.meta and serial.payload.keys() == threaded.payload.keys()
    for key, a in serial.payload.items():
        assert np.array_equal(a, threaded.payload[key])
    back = valuecoding.decode_values(threaded, arr.size) if valuecoding.VCODED in \
        threaded.meta else threaded
    assert np.array_equal(back.payload["values"], arr)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@SETTINGS
@given(seed=st.integers(0, 1000), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       sizes=st.lists(st.integers(1, 600), min_size=1, max_size=4))
def test_plan_in_threads_and_choosing_twins_once_writes_the_plain_bytes(seed, sparsity, sizes,
                                                        monkeypatch_module):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, n in enumerate(sizes):
        t = torch.randn(n, 7, generator=gen)
        t[torch.rand(n, 7, generator=gen) < sparsity] = 0
        state[f"w{i}"] = t
    state["count"] = torch.tensor(seed)
    # identical small tensors (chosen once per file) and a -0.0 twin that must not share
    state["ones_a"], state["ones_b"] = torch.ones(16), torch.ones(16)
    state["zeros"], state["negzeros"] = torch.zeros(16), -torch.zeros(16)
    state["w0_copy"] = state["w0"].clone()
    monkeypatch_module.setattr(container, "PARALLEL_NUMEL", 1 << 62)
    monkeypatch_module.setattr(container, "SAME_CHOICE_NUMEL", -1)
    serial = container.plan(state)
    monkeypatch_module.setattr(container, "PARALLEL_NUMEL", 1)
    monkeypatch_module.setattr(container, "SAME_CHOICE_NUMEL", 1 << 12)
    fast = container.plan(state)
    assert fast.data == serial.data
    assert list(fast.encoded) == list(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.hwp"
        path.write_bytes(fast.data)
        back = container.load(path)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(
            back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        z, _ = self.lstm(y)
        return self.head(z @ torch.ones(8, 8))


class _ReadsValues(nn.Module):
    """Branches on a value: cannot run on meta tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if float(y.sum()) > -1e9 else y[:, :4]


def _counts(model, x, meta: bool, monkeypatch) -> tuple[list, int]:
    """(each row's dense MACs, the model's MACs) of ``hp.report``, counted on meta tensors or
    (``meta=False``) by the real forward pass."""
    if not meta:
        monkeypatch.setattr(macs, "forward_on_meta", lambda *a: None)
    rep = hp.report(model, x)
    monkeypatch.undo()
    return [r.macs_dense for r in rep.rows], rep.total["model_macs"]


@pytest.mark.parametrize("make, x", [
    (resnet20, torch.randn(2, 3, 32, 32)),
    (_Attention, torch.randn(3, 5, 16)),
    (_ReadsValues, torch.randn(4, 6)),
])
def test_macs_on_meta_tensors_equal_the_real_forward_pass(make, x, monkeypatch):
    torch.manual_seed(0)
    model = make()
    on_meta = _counts(model, x, True, monkeypatch)
    real = _counts(model, x, False, monkeypatch)
    assert on_meta == real
    assert on_meta[1] > 0 and all(m > 0 for m in on_meta[0])


def test_macs_on_meta_count_a_live_pruner_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = resnet20()
    pruner = hp.Magnitude(model, "element", 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = macs.forward_on_meta(model, (torch.randn(1, 3, 32, 32),), macs._Shapes([]))
    assert meta is not None and meta.get_total_flops() > 0
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v)
               for k, v in before.items())
    rep = hp.report(model, torch.randn(1, 3, 32, 32), pruner=pruner)
    assert rep.total["model_macs"] == 40_551_424 or rep.total["model_macs"] > 0


def test_a_model_with_forward_hooks_is_counted_by_the_real_pass():
    """A hook (a pruner's statistics) must never be handed meta tensors."""
    torch.manual_seed(0)
    model = resnet20()
    seen = []
    model.linear.register_forward_hook(lambda m, a, out: seen.append(out.device.type))
    rep = hp.report(model, torch.randn(1, 3, 32, 32))
    assert seen and set(seen) == {"cpu"}
    assert rep.total["model_macs"] > 0


# -- the chooser's shortcuts: the same choice as trying every candidate -----------------------
@SETTINGS
@given(shape=st.sampled_from([(4, 48), (2, 24, 3), (6, 96, 1, 2), (3, 30)]),
       density=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_kofn_run_counts_from_halvings_are_the_direct_counts(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[torch.rand(shape, generator=g) > density] = 0
    view = TensorView.of(t)
    for n in (1, 2, 3, 4, 6, 8, 12, 16, 24):
        if shape[1] % n:
            continue
        direct = KofNEncoding._runs(view.nz, view.shape, n).sum(axis=1)
        assert np.array_equal(run_counts(view, n), direct), n


@SETTINGS
@given(shape=st.sampled_from([(1, 7), (7, 1), (5, 9), (4, 6, 3, 3), (3, 5, 1, 3), (1, 1)]),
       density=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_kept_elements_of_pairs_are_the_padded_tiles_counts(shape, density, seed):
    """1 x 2 and 2 x 1 tiles' kept elements, counted from two strided views, are what the
    padded tile grid counts (odd rows and columns included)."""
    from hwprune.storage.encodings.block import kept_grid, pairs_kept
    from hwprune.storage.encodings.tiling import real_elements

    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[torch.rand(shape, generator=g) > density] = 0
    view = TensorView.of(t)
    rows, cols = view.matrix
    for bh, bw, axis in ((1, 2, 1), (2, 1, 0)):
        if bh <= rows and bw <= cols:
            grid = real_elements(kept_grid(view, bh, bw), rows, cols, bh, bw)
            assert pairs_kept(view, axis) == grid, (bh, bw)


@SETTINGS
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       magnitude=st.floats(1e-30, 1e4), signs=st.lists(st.sampled_from([-1, 0, 1]), min_size=1,
                                                       max_size=40))
def test_values_of_one_magnitude_are_codes_of_one_with_that_magnitude_as_scale(dtype, magnitude,
                                                                             signs):
    """Values of one magnitude (a constant vector, BatchNorm's ones), found without the
    general search: q = 1 (the smallest) and that magnitude, which rebuild them bitwise."""
    from hwprune.storage.encodings import quantized

    t = torch.tensor(signs, dtype=torch.float64).to(dtype) * torch.tensor(magnitude).to(dtype)
    view = TensorView.of(t)
    found = quantized.find_scale(view)
    nonzero = t[t != 0].abs()
    if nonzero.numel() == 0 or bool(torch.isinf(nonzero).any()):
        return  # no magnitude (the general search decides) or an overflow
    assert found is not None and found[0] == 1
    assert bool(found[1] == nonzero[0]) and found[1].dtype == dtype
    rebuilt = (t.double() / found[1].double()).round().to(dtype) * found[1]
    assert rebuilt.view(torch.uint8).equal(t.view(torch.uint8))


@SETTINGS
@given(numel=st.integers(1, 3000), density=st.floats(0, 1), seed=st.integers(0, 10_000),
       clustered=st.booleans())
def test_gaps_lower_bound_never_exceeds_the_size_of_any_parameter(numel, density, seed,
                                                                  clustered):
    rng = np.random.default_rng(seed)
    keep = rng.random(numel) < density
    if clustered:  # one run of nonzeros (or of zeros): where m = 1 is best
        keep = np.arange(numel) < int(density * numel)
    t = torch.from_numpy(np.where(keep, rng.standard_normal(numel), 0).astype(np.float32))
    view = TensorView.of(t)
    gaps, _ = Gaps._coded(view)
    bound = Gaps().lower_bound(view, {})
    values = int(np.count_nonzero(view.nz)) * 4
    for m in range(1, 70):
        assert bound <= values + -(-golomb_bits(gaps, m) // 8), m
    assert bound <= Gaps().sizes(view, {}).total(4)


def test_small_vectors_are_saved_dense_or_bitmask_and_counted_as_saved(tmp_path):
    biases = {"b_dense": torch.randn(64), "b_sparse": torch.zeros(200),
              "w": torch.zeros(16, 16), "ones": torch.ones(64), "zeros": torch.zeros(32),
              "count": torch.tensor(7)}
    biases["b_sparse"][::50] = 1.5
    biases["w"][0, :3] = 2.0
    path = tmp_path / "m.hwp"
    save(biases, path)
    encoded = container.plan(biases).encoded
    assert encoded["b_dense"].encoding == "dense"
    assert encoded["b_sparse"].encoding == "bitmask"
    assert encoded["w"].encoding not in ("dense", "bitmask")  # 2-D: every encoding tried
    # constant vectors (BatchNorm at initialisation) try every encoding: a few bytes each
    assert encoded["ones"].total_bytes < 32 and encoded["zeros"].total_bytes == 0  # dense: 256, 128
    assert encoded["count"].total_bytes <= 8
    sparse = TensorView.of(biases["b_sparse"])
    assert saved_encodings(sparse, None) == ("dense", "bitmask")
    assert saved_encodings(sparse, "2:4") is None
    assert saved_encodings(TensorView.of(biases["w"]), None) is None
    assert saved_encodings(TensorView.of(biases["ones"]), None) is None
    # value coding applies from MIN_CODED elements: the full chooser there
    assert saved_encodings(TensorView.of(torch.randn(MIN_CODED)), None) is None
    for name, t in biases.items():
        assert stored_bytes(t)["total_bytes"] == encoded[name].total_bytes
    back = load(path)
    for name, t in biases.items():
        assert torch.equal(back[name].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))
    # the full chooser on the same vector may pick another encoding; only= restricts it
    only = choose(biases["b_sparse"], only=("dense", "bitmask"))
    assert only.encoding == "bitmask"
    with pytest.raises(StorageError, match="dense"):
        choose(biases["b_sparse"], only=("bitmask",))


@st.composite
def small_vectors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                  torch.int64, torch.int8, torch.bool]))
    n = draw(st.integers(0, MIN_CODED + 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    t = torch.from_numpy(rng.standard_normal(n) * 4).to(dtype)
    kind = draw(st.sampled_from(["plain", "zeros", "constant", "negzero", "strided", "2-D"]))
    if kind == "zeros" and n:
        t[:: draw(st.integers(1, 7))] = 0
    elif kind == "constant":
        t = torch.full((n,), 3, dtype=dtype)
    elif kind == "negzero" and n and dtype.is_floating_point:
        t[::3] = -0.0
    elif kind == "strided":
        t = torch.cat([t, t])[::2]
    elif kind == "2-D" and n % 2 == 0:
        t = t.reshape(2, -1)
    return t


@SETTINGS
@given(t=small_vectors())
def test_the_small_vector_shortcut_is_what_the_chooser_saves(t):
    """Where the shortcut answers (a small vector with no zero, not constant), it is the dense
    encoding ``save``'s chooser picks, with the same bits; otherwise it leaves the choice."""
    view = TensorView.of(t)
    quick = small_vector_choice(t, None)
    chosen = choose(t, only=saved_encodings(view, None))
    if quick is None:
        has_zero = not view.bits.all() if view.bits.ndim == 1 else True
        constant = t.numel() <= 1 or bool((view.bits == view.bits[:1]).all())
        assert t.dim() > 1 or t.numel() >= MIN_CODED or has_zero or constant
        return
    assert chosen.encoding == quick.encoding == "dense" and quick.meta == chosen.meta
    assert quick.shape == chosen.shape and quick.dtype == chosen.dtype
    assert quick.payload["values"].dtype == chosen.payload["values"].dtype
    assert np.array_equal(quick.payload["values"], chosen.payload["values"])
    assert small_vector_choice(t, "2:4") is None  # a hint: the chooser decides


@SETTINGS
@given(density=st.floats(0.0, 1.0), rows=st.integers(1, 9), cols=st.sampled_from([4, 8, 16, 48]),
       seed=st.integers(0, 2**31 - 1), pattern=st.sampled_from(["irregular", "2:4", "blocks"]),
       hint=st.sampled_from([None, "2:4", "block:3x3", "block:2x2"]))
def test_every_family_bound_is_below_every_candidate_of_its_encoding(density, rows, cols, seed,
                                                                     pattern, hint):
    """The chooser skips an encoding where its family bound loses: the bound must not exceed
    any of its candidates' sizes, on irregular, k-of-n and block patterns, with any hint."""
    from hwprune.storage.encodings import ENCODINGS
    from hwprune.storage.encodings.chooser import normalize_hints

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols, 3)).astype(np.float32)
    if pattern == "2:4":  # 2 of every 4 along dim 1
        keep = np.argsort(rng.random((rows, cols // 4, 4, 3)), axis=2) < 2
        w = np.where(keep.reshape(rows, cols, 3), w, 0)
    elif pattern == "blocks":  # whole 1 x 6 runs of the im2col rows
        w = np.where(np.repeat(rng.random((rows, cols // 2)) < density, 6).reshape(w.shape),
                     w, 0)
    else:
        w = np.where(rng.random(w.shape) < density, w, 0)
    view = TensorView.of(torch.from_numpy(w))
    hints = normalize_hints(hint)
    for enc in ENCODINGS.values():
        bound = enc.family_bound(view, hints)
        for params in enc.candidates(view, hints):
            try:
                size = enc.sizes(view, params).total(4)
            except StorageError:
                continue
            assert bound <= size, (enc.name, params)


@pytest.mark.parametrize("zeros", [1, 4, 5, 40])
def test_a_tensor_with_a_few_stray_zeros_is_saved_dense_losing_at_most_their_bytes(zeros):
    """At most one zero in ``FEW_ZEROS_SHARE`` elements: the sparse encodings are not searched,
    and the full search could have saved no more than the zeros' bytes."""
    from hwprune.storage.encodings.chooser import FEW_ZEROS_SHARE, Candidate, _candidates

    torch.manual_seed(zeros)
    t = torch.randn(64, 64)
    t.view(-1)[torch.randperm(t.numel())[:zeros]] = 0.0
    chosen = choose(t, code_values=False)
    every = min(_candidates(TensorView.of(t), None, shortcut=False), key=Candidate.key)
    if zeros * FEW_ZEROS_SHARE <= t.numel():
        assert chosen.encoding == "dense"
        assert chosen.total_bytes - every.total <= zeros * 4
    else:
        assert chosen.total_bytes == every.total and chosen.encoding == "gaps"


def test_analysed_tensors_are_read_in_place_and_never_written(tmp_path):
    t = torch.randn(32, 16)
    t[t.abs() < 0.5] = -0.0  # the zero-signs variant rewrites the zeros: in a copy
    before = t.clone()
    view = TensorView.of(t)
    assert np.shares_memory(view.bits, t.numpy()) and not view.bits.flags.writeable
    save({"w": t}, tmp_path / "m.hwp")
    assert torch.equal(t.view(torch.int32), before.view(torch.int32))


def test_planes_are_coded_only_where_the_sampled_entropy_gains():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 256, 100_000, dtype=np.uint8)
    skewed = rng.choice(np.arange(8, dtype=np.uint8), 100_000, p=[.5, .2, .1, .1, .05, .03,
                                                                  .01, .01])
    assert not valuecoding.worth_coding(uniform)
    assert valuecoding.worth_coding(skewed)
    assert valuecoding.worth_coding(np.zeros(10, np.uint8))
    arr = (skewed.astype(np.uint32) << np.uint32(24)) | rng.integers(0, 1 << 24, 100_000,
                                                                      dtype=np.uint32)
    enc = EncodedTensor("dense", torch.float32, (arr.size,), {"values": arr}, {}, {})
    coded = valuecoding.code_values(enc)
    lengths = coded.meta[valuecoding.VCODED]["values"][1]
    assert lengths[:3] == [-1, -1, -1] and 0 < lengths[3] < arr.size // 2
    assert np.array_equal(valuecoding.decode_values(coded, arr.size).payload["values"], arr)


@pytest.mark.parametrize("trial_bytes", [1000, 1 << 20])
def test_long_planes_meet_the_entropy_check_short_ones_a_trial(monkeypatch, trial_bytes):
    """A plane longer than ``_TRIAL_BYTES`` reaches the coder only where its sampled entropy
    gains; a shorter one is coded as a trial and kept only where it gains 3 %: the same
    planes end up coded either way."""
    rng = np.random.default_rng(1)
    top = rng.choice(np.arange(8, dtype=np.uint32), 100_000, p=[.5, .2, .1, .1, .05, .03,
                                                                  .01, .01])
    arr = (top << np.uint32(24)) | rng.integers(0, 1 << 24, 100_000, dtype=np.uint32)
    coded_sizes = []
    real = valuecoding._zstd
    monkeypatch.setattr(valuecoding, "_zstd", lambda d: coded_sizes.append(d.size) or real(d))
    monkeypatch.setattr(valuecoding, "_TRIAL_BYTES", trial_bytes)
    enc = EncodedTensor("dense", torch.float32, (arr.size,), {"values": arr}, {}, {})
    coded = valuecoding.code_values(enc)
    lengths = coded.meta[valuecoding.VCODED]["values"][1]
    assert lengths[:3] == [-1, -1, -1] and 0 < lengths[3] < arr.size // 2
    assert len(coded_sizes) == (1 if trial_bytes < arr.size else 4)  # tried: only the top
    assert np.array_equal(valuecoding.decode_values(coded, arr.size).payload["values"], arr)

def test_report_rows_run_on_one_torch_thread_and_the_count_is_restored():
    from hwprune.report.measure import one_torch_thread

    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), one_torch_thread():
        raise RuntimeError("a row failed")
    assert torch.get_num_threads() == before
    torch.manual_seed(0)
    model = resnet20()
    rep = hp.report(model, torch.randn(1, 3, 32, 32))
    assert torch.get_num_threads() == before and rep.rows and rep.total["file_bytes"] > 0


def _reference_digest(records, arrays, version) -> str:
    """The checksum as the format defines it, one length-prefixed part at a time (the
    container hashes short parts together: the same digest): BLAKE3 from version 7, SHA-256
    before."""
    import hashlib

    import blake3

    new = blake3.blake3 if version >= 7 else hashlib.sha256
    h = new()
    parts = [FORMAT_NAME.encode(), str(version).encode(),
             packing.canonical_json(records).encode()]
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        data = a.tobytes()
        # from version 4 an array of more than 4 KiB: its length, then its SHA-256
        parts += [key.encode(), f"{a.dtype.str}{a.shape}".encode(),
                  (len(data), new(data).digest()) if version >= 4 and len(
                      data) > 4096 else data]
    for b in parts:
        length, b = b if isinstance(b, tuple) else (len(b), b)
        h.update(length.to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


FORMAT_NAME = "hwprune.storage"


def _safetensors_pack(records, arrays, version):
    """``container.pack`` as it was written with safetensors' own serializer (the reference:
    the joined file must be byte for byte what safetensors writes)."""
    import json

    import safetensors.numpy

    doc = {"blake3" if version >= 7 else "sha256": _reference_digest(records, arrays, version),
           "tensors": records,
           "arrays": [[key, a.dtype.str, int(a.size)] for key, a in arrays.items()]}
    blob = np.concatenate([a.view(np.uint8) for a in arrays.values()] or [np.zeros(0, np.uint8)])
    body = packing.compress_document(packing.canonical_json(doc).encode(), version)
    packed = {container.DOC_KEY: np.frombuffer(body, np.uint8), container.DATA_KEY: blob}
    meta = json.dumps({"format": container.FORMAT, "version": version}, separators=(",", ":"),
                      sort_keys=True)
    return safetensors.numpy.save(packed, metadata={container.META_KEY: meta})


@SETTINGS
@given(seed=st.integers(0, 1000), sparsity=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
       sizes=st.lists(st.integers(0, 300), min_size=0, max_size=4),
       version=st.sampled_from([2, 3, 6, 7, container.VERSION]))
def test_the_joined_file_is_byte_for_byte_what_safetensors_writes(seed, sparsity, sizes, version):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, n in enumerate(sizes):
        t = torch.randn(n, 5, generator=gen)
        t[torch.rand(n, 5, generator=gen) < sparsity] = 0
        state[f"w{i}"] = t
    records, arrays = [], {}
    for name, t in state.items():
        records.append(packing.tensor_record(name, choose(t), arrays))
    assert container.pack(records, arrays, version) == _safetensors_pack(records, arrays, version)
    assert b"".join(container.pack_parts(records, arrays, version)) == container.pack(
        records, arrays, version)


def test_save_writes_the_planned_bytes_from_its_parts(tmp_path):
    """``save`` writes the file's parts one after the other: exactly ``plan``'s bytes (arrays
    above and below the size whose checksum parts are hashed together)."""
    torch.manual_seed(0)
    state = {"big": torch.randn(300, 40), "small": torch.randn(30), "sparse": torch.randn(
        64, 64) * (torch.rand(64, 64) < 0.2), "empty": torch.zeros(0, 3)}
    path = tmp_path / "m.hwp"
    size = save(state, path)
    assert path.read_bytes() == container.plan(state).data and size == path.stat().st_size
    assert container.FORMAT == FORMAT_NAME


@pytest.mark.parametrize("make", [
    lambda m: hp.DPP(m, "2:4", quantize_bits=8),
    lambda m: hp.Magnitude(m, "element", 0.9),
    lambda m: hp.Magnitude(m, "2:4", None),
    lambda m: hp.Magnitude(m, "block:4x4", 0.75),
    lambda m: hp.DARB(m, ratio=8.0),
])
def test_the_chooser_with_its_lower_bounds_picks_the_smallest_of_every_candidate(make):
    """The bounds skip sizes, never a winner: quantized values (DPP's 8-bit codes) included,
    which the raw-value bounds do not count."""
    from hwprune.storage.encodings.chooser import Candidate, _candidates

    torch.manual_seed(0)
    model = resnet20()
    pruner = make(model)
    pruner.finalize()
    rep = hp.report(model, torch.zeros(1, 3, 32, 32), pruner=pruner)
    for name, hint in rep.hints().items():
        t = model.state_dict()[name]
        every = min(_candidates(TensorView.of(t), hint, shortcut=False), key=Candidate.key)
        assert choose(t, hint, code_values=False).total_bytes == every.total, name


@SETTINGS
@given(gaps=st.lists(st.integers(0, 400), min_size=1, max_size=500),
       spread=st.integers(1, 10_000))
def test_golomb_parameter_from_the_gap_histogram_is_the_one_from_every_count(gaps, spread):
    g = np.asarray(gaps, np.int64)
    numel = int(g.sum()) + g.size + spread  # any tensor size the gaps fit in
    tried = tried_parameters(g.size, numel)
    expected = min(tried, key=lambda m: golomb_bits(g, m))
    assert best_parameter(g, numel) == expected
    # the histogram path (short gaps) and the direct path (a long gap) on the same counts
    assert best_parameter(np.append(g, 10 * g.size + 1000), numel + 10**6) == min(
        tried_parameters(g.size + 1, numel + 10**6),
        key=lambda m: golomb_bits(np.append(g, 10 * g.size + 1000), m))


def test_the_threaded_checksum_is_the_formats_digest_and_older_versions_still_load(
        tmp_path, monkeypatch):
    """Version 4 hashes large arrays in threads: the digest is the format's (the reference
    above) whichever arrays are hashed in threads; a version 3 file, whose checksum reads every
    array's bytes, and a version 6 file, whose checksum is SHA-256, still load, and a flipped
    byte of a large array is caught in each."""
    torch.manual_seed(0)
    state = {"a": torch.randn(70, 70), "b": torch.randn(3000), "c": torch.randn(10)}
    records, arrays = [], {}
    for name, t in state.items():
        records.append(packing.tensor_record(name, choose(t), arrays))
    monkeypatch.setattr(packing, "_THREADED_HASH", 0)  # every large array in the pool
    for version in (3, 6, container.VERSION):
        assert packing.checksum(records, arrays, version) == _reference_digest(
            records, arrays, version)
        path = tmp_path / f"v{version}.hwp"
        path.write_bytes(container.pack(records, arrays, version))
        back = load(path)
        assert all(torch.equal(back[k], state[k]) for k in state)
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 1  # inside array "a"'s or "b"'s bytes
        path.write_bytes(bytes(data))
        with pytest.raises(StorageError, match="checksum"):
            load(path)
    assert packing.checksum(records, arrays, 3) != packing.checksum(records, arrays, 4)


@SETTINGS
@given(seed=st.integers(0, 1000), count=st.integers(2 * MIN_CODED, 20000), std=st.sampled_from(
    [0.02, 1.0]), version=st.sampled_from([4, container.VERSION]))
def test_planes_from_the_zstd_length_on_are_zstd_frames_and_round_trip(seed, count, std,
                                                                        version):
    """With ``ZSTD_BYTES`` lowered, a coded plane of at least that many bytes is one Zstandard
    frame declaring its length (the array tagged ``"zstd"``), a shorter one a raw deflate
    stream; both save and load bit for bit, and a version 4 file (every coded plane deflated)
    still loads."""
    import zlib

    import zstandard

    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(count, generator=gen) * std
    state = {"w": t, "short": t[: count // 2].clone()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(valuecoding, "ZSTD_BYTES", count if version == container.VERSION
                      else 1 << 62)
        records, arrays = [], {}
        encoded = {k: choose(v) for k, v in state.items()}
        for name, enc in encoded.items():
            records.append(packing.tensor_record(name, enc, arrays))
    for name, enc in encoded.items():
        entry = enc.meta[valuecoding.VCODED]["values"]
        count_, lengths = entry[:2]
        planes = enc.payload["values_planes"]
        top = np.ascontiguousarray(valuecoding.byte_columns(
            state[name].numpy().view(np.uint32))[:, 3]).tobytes()
        coded = planes[planes.size - lengths[3]:].tobytes()  # the top plane is the last
        assert lengths[3] > 0
        if count_ >= count and version == container.VERSION:
            assert entry[2:] == [valuecoding.ZSTD]
            assert zstandard.frame_content_size(coded) == count_
            assert zstandard.ZstdDecompressor().decompress(coded) == top
        else:
            assert entry[2:] == []
            assert zlib.decompress(coded, -15) == top
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.hwp"
        path.write_bytes(container.pack(records, arrays, version))
        back = load(path)
    assert all(torch.equal(back[k].view(torch.int32), v.view(torch.int32))
               for k, v in state.items())


@pytest.mark.parametrize("damage", ["declared", "truncated", "trailing", "garbage", "tag"])
def test_a_damaged_zstd_plane_is_a_storage_error_before_it_is_decoded_in_full(damage):
    """A frame that declares another length, ends early, has bytes after its end, is not a
    frame, or an unknown coder tag: a StorageError naming the plane, never more memory than
    the plane's declared count."""
    import zstandard

    t = torch.randn(4096) * 0.02
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(valuecoding, "ZSTD_BYTES", 1)
        enc = choose(t)
    entry = enc.meta[valuecoding.VCODED]["values"]
    count, lengths, _ = entry
    planes = enc.payload["values_planes"].tobytes()
    head, frame = planes[:len(planes) - lengths[3]], planes[len(planes) - lengths[3]:]
    if damage == "declared":
        frame = zstandard.ZstdCompressor().compress(frame[:10] * 3)
    elif damage == "truncated":
        frame = frame[:-3]
    elif damage == "trailing":
        frame = frame + b"\0\0"
    elif damage == "garbage":
        frame = bytes(len(frame))
    bad = [count, lengths[:3] + [len(frame)], "lz4" if damage == "tag" else valuecoding.ZSTD]
    broken = replace(enc, payload={"values_planes": np.frombuffer(head + frame, np.uint8)},
                     meta={**enc.meta, valuecoding.VCODED: {"values": bad}})
    with pytest.raises(StorageError, match="plane|value coding"):
        valuecoding.decode_values(broken, count)


@pytest.mark.parametrize("declared", [True, False])
def test_a_zstd_plane_that_decodes_past_its_length_is_refused_within_that_length(declared):
    """A frame that declares its plane's length (or no length), then goes on with a thousand
    RLE blocks of 128 KiB (128 MiB more if decoded): refused, and never more than the plane's
    length allocated for it (a decoder that trusted the frame would reach 128 MiB)."""
    import tracemalloc

    import zstandard

    t = torch.randn(1 << 14) * 0.02
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(valuecoding, "ZSTD_BYTES", 1)
        enc = choose(t)
    count, lengths, tag = enc.meta[valuecoding.VCODED]["values"]
    planes = enc.payload["values_planes"].tobytes()
    head, frame = planes[:len(planes) - lengths[3]], planes[len(planes) - lengths[3]:]
    if not declared:
        top = zstandard.ZstdDecompressor().decompress(frame)
        frame = zstandard.ZstdCompressor(write_content_size=False).compress(top)
    frame = bytearray(frame)
    at = zstandard.frame_header_size(bytes(frame))
    while True:  # to the last block's header
        block = int.from_bytes(frame[at: at + 3], "little")
        if block & 1:
            break
        at += 3 + (1 if (block >> 1) & 3 == 1 else block >> 3)
    frame[at: at + 3] = (block & ~1).to_bytes(3, "little")  # no longer the last
    rle = [(1 << 1 | (1 << 17) << 3 | (i == 999)).to_bytes(3, "little") + b"\x07"
           for i in range(1000)]
    frame += b"".join(rle)
    bomb = replace(enc, payload={"values_planes": np.frombuffer(head + bytes(frame), np.uint8)},
                   meta={**enc.meta, valuecoding.VCODED: {
                       "values": [count, lengths[:3] + [len(frame)], tag]}})
    tracemalloc.start()
    try:
        with pytest.raises(StorageError, match="plane"):
            valuecoding.decode_values(bomb, count)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * count + (1 << 20)
