"""hp.save of a large state dict writes each tensor's arrays as it is chosen: the same bytes as
the file put together in memory (``plan``), whichever way the header's length turns out, and
far less memory held."""

from __future__ import annotations

import tempfile
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwprune.storage import container, packing, streaming
from hwprune.storage.container import load, plan, save
from hwprune.storage.encodings import choose
from hwprune.storage.errors import StorageError


def mixed_state() -> dict[str, torch.Tensor]:
    """Dense, sparse, k-of-n, tied, constant and small tensors, some above the checksum's
    in-full size and some below."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    sparse = torch.randn(96, 80, generator=g) * (torch.rand(96, 80, generator=g) < 0.1)
    two_four = torch.randn(32, 64, generator=g)
    two_four.view(-1, 4)[:, :2] = 0
    return {"dense": w, "sparse": sparse, "bias": torch.randn(64, generator=g),
            "tied": w, "ones": torch.ones(48), "kofn": two_four,
            "ints": torch.arange(300, dtype=torch.int64), "empty": torch.zeros(0, 3)}


@pytest.mark.parametrize("threshold", [0, 1, 10_000, 1 << 40])
def test_streamed_save_writes_the_planned_bytes(tmp_path, monkeypatch, threshold):
    # 0 and 1: every array streamed; 10,000: held until the threshold, then streamed;
    # 1 << 40: the whole file in one go
    monkeypatch.setattr(streaming, "STREAM_BYTES", threshold)
    state = mixed_state()
    size = save(state, tmp_path / "m.hwp")
    data = (tmp_path / "m.hwp").read_bytes()
    assert data == plan(state).data and size == len(data)
    out = load(tmp_path / "m.hwp")
    assert list(out) == list(state)
    for name, t in state.items():
        assert torch.equal(out[name], t) and out[name].dtype == t.dtype, name


@pytest.mark.parametrize("guess", [(1, 1), (10**15, 10**9)])
@pytest.mark.parametrize("step", [7, 1 << 20])
def test_data_move_where_the_first_header_guess_was_wrong(monkeypatch, guess, step):
    # a first header laid out for 1 byte of data and of document is too short (the data move
    # up), one for 10**15 and 10**9 too long (they move down); in steps of `step` bytes
    monkeypatch.setattr(streaming, "STREAM_BYTES", 0)
    monkeypatch.setattr(streaming, "_MOVE_STEP", step)
    monkeypatch.setattr(streaming, "_first_header", lambda *a: packing.file_header(*guess))
    state = mixed_state()
    moved = []
    real = streaming._move
    monkeypatch.setattr(streaming, "_move", lambda *a: (moved.append(a[1:]), real(*a)))
    with tempfile.TemporaryFile("w+b") as f:  # read and written, as atomic_file opens it
        size = streaming.write_container(f, container._encoded(state, {}, True),
                                         Path("m.hwp"), 1, len(state))
        f.seek(0)
        data = f.read()
    assert len(moved) == 1 and (moved[0][0] < moved[0][1]) == (guess == (1, 1))
    assert data == plan(state).data and size == len(data)


def test_a_streamed_save_holds_a_few_tensors_not_the_file(tmp_path, monkeypatch):
    # sixteen 1 MiB weights: held, their encodings (about the file's size) are all in memory
    # at the write; streamed, about one at a time (numpy reports its buffers to tracemalloc)
    monkeypatch.setattr(streaming, "_MOVE_STEP", 1 << 16)  # where the data move: small steps
    g = torch.Generator().manual_seed(1)
    state = {f"w{i}": torch.randn(512, 512, generator=g) for i in range(16)}
    peaks = {}
    for label, threshold in (("held", 1 << 40), ("streamed", 0)):
        monkeypatch.setattr(streaming, "STREAM_BYTES", threshold)
        tracemalloc.start()
        save(state, tmp_path / f"{label}.hwp")
        peaks[label] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    size = (tmp_path / "held.hwp").stat().st_size
    assert (tmp_path / "held.hwp").read_bytes() == (tmp_path / "streamed.hwp").read_bytes()
    assert peaks["held"] > 0.9 * size  # every encoding at once
    assert peaks["streamed"] < 0.35 * size  # a tensor or two of them at a time


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000),
       tensors=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 80),
                                  st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                                   torch.int32, torch.uint8, torch.float64]),
                                  st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.booleans()),
                        min_size=0, max_size=6),
       threshold=st.integers(0, 4_000))
def test_any_state_streamed_from_any_point_is_the_planned_file(tmp_path, monkeypatch, seed,
                                                               tensors, threshold):
    # shapes (some empty), dtypes, sparsities and ties drawn at random; streaming starts
    # wherever the threshold falls (or not at all)
    monkeypatch.setattr(streaming, "STREAM_BYTES", threshold)
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i, (rows, cols, dtype, sparsity, tie) in enumerate(tensors):
        if tie and state:
            state[f"t{i}"] = next(iter(state.values()))  # tied to the first
            continue
        t = torch.randn(rows, cols, generator=g) * 50
        t[torch.rand(rows, cols, generator=g) < sparsity] = 0
        state[f"t{i}"] = t.to(dtype)
    path = tmp_path / "m.hwp"
    size = save(state, path)
    data = path.read_bytes()
    assert data == plan(state).data and size == len(data)
    out = load(path)
    assert list(out) == list(state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


def test_an_error_mid_stream_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BYTES", 0)
    path = tmp_path / "m.hwp"
    path.write_bytes(b"old")
    state = mixed_state()
    real = container._choose

    def fail_late(t, hint, code_values):  # after some tensors went to the file
        if t.shape == (32, 64):
            raise RuntimeError("interrupted")
        return real(t, hint, code_values)

    monkeypatch.setattr(container, "_choose", fail_late)
    with pytest.raises(RuntimeError, match="interrupted"):
        save(state, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.hwp"]


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_two_tensors_whose_arrays_share_a_key_are_refused_streamed_or_held(monkeypatch,
                                                                           threshold):
    # "a" + "b/values" and "a/b" + "values" join to the same key: refused, not overwritten
    monkeypatch.setattr(streaming, "STREAM_BYTES", threshold)
    one = choose(torch.randn(300))
    clash = [("a", replace(one, payload={f"b/{k}": v for k, v in one.payload.items()})),
             ("a/b", one)]
    with tempfile.TemporaryFile("w+b") as f, pytest.raises(StorageError, match="share the key"):
        streaming.write_container(f, iter(clash), Path("m.hwp"), 2400, 2)
