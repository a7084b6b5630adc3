"""Data loaders, on small fake data built in tmp_path (the real data set is not needed)."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hwprune.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    augment_cifar,
    data_dir,
    load_cifar10,
    load_digits,
    load_mnist,
)
from hwprune.errors import HwpruneError

# ---------------------------------------------------------------------------------- helpers


def _fake_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return x, y


def _write_cifar_pickle(path: Path, x: np.ndarray, y: np.ndarray, protocol: int) -> None:
    """Write one batch in the official layout: rows of 3072 bytes in CHW order, bytes keys."""
    rows = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072)
    obj = {
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in y],
        b"data": rows,
        b"filenames": [f"img{i}.png".encode() for i in range(len(x))],
    }
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same fake CIFAR in three layouts: npz, cifar-10-batches-py, and protocol-4 pickles."""
    base = tmp_path_factory.mktemp("cifar")
    train, test = _fake_cifar(5 * 4, 1), _fake_cifar(6, 2)
    npz = base / "npz"
    npz.mkdir()
    np.savez(npz / "train.npz", x=train[0], y=train[1])
    np.savez(npz / "test.npz", x=test[0], y=test[1])
    folders = {}
    for name, protocol in (("p2", 2), ("p4", 4)):
        batches = base / name / "cifar-10-batches-py"
        batches.mkdir(parents=True)
        for i in range(5):
            part = slice(4 * i, 4 * i + 4)
            _write_cifar_pickle(
                batches / f"data_batch_{i + 1}", train[0][part], train[1][part], protocol
            )
        _write_cifar_pickle(batches / "test_batch", test[0], test[1], protocol)
        folders[name] = batches
    return {"npz": npz, "train": train, "test": test, **folders}


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = (0x0800 | arr.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range() -> None:
    train, test = load_digits()
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert len(xtr) + len(xte) == 1797 and len(xte) == 450
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0
    # Stratified: every class keeps its share (within one sample) in the test part.
    counts = torch.bincount(yte, minlength=10).float()
    total = torch.bincount(torch.cat([ytr, yte]), minlength=10).float()
    assert torch.all((counts - total * 0.25).abs() <= 1.0)


def test_digits_split_is_deterministic() -> None:
    a_train, a_test = load_digits(seed=3)
    b_train, b_test = load_digits(seed=3)
    c_train, _ = load_digits(seed=4)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    assert torch.equal(a_test.tensors[1], b_test.tensors[1])
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])


def test_digits_bad_fraction() -> None:
    with pytest.raises(HwpruneError, match="test_fraction"):
        load_digits(test_fraction=1.5)


# ---------------------------------------------------------------------------------- data_dir


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("HWPRUNE_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("HWPRUNE_DATA_DIR")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(HwpruneError, match="HWPRUNE_DATA_DIR"):
        data_dir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data_dir().resolve() == (tmp_path / "shared" / "data").resolve()
    with pytest.raises(HwpruneError, match="nope"):
        data_dir(tmp_path / "nope")


# ---------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("train", [True, False])
def test_cifar_npz_matches_expected_normalisation(fake_cifar: dict, train: bool) -> None:
    x, y = fake_cifar["train" if train else "test"]
    ds = load_cifar10(fake_cifar["npz"], train=train)
    xt, yt = ds.tensors
    assert xt.shape == (len(x), 3, 32, 32) and xt.dtype == torch.float32
    assert yt.dtype == torch.int64 and torch.equal(yt, torch.from_numpy(y))
    mean = np.array(CIFAR10_MEAN, dtype=np.float32)
    std = np.array(CIFAR10_STD, dtype=np.float32)
    want = ((x.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(xt.numpy(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["p2", "p4", "p2-parent"])
@pytest.mark.parametrize("train", [True, False])
def test_cifar_pickles_equal_npz(fake_cifar: dict, layout: str, train: bool) -> None:
    root = fake_cifar[layout.split("-")[0]]
    if layout.endswith("parent"):
        root = root.parent  # a folder that contains cifar-10-batches-py
    from_pickle = load_cifar10(root, train=train).tensors
    from_npz = load_cifar10(fake_cifar["npz"], train=train).tensors
    assert torch.equal(from_pickle[0], from_npz[0])
    assert torch.equal(from_pickle[1], from_npz[1])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_refuses_code_execution(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker), b"labels": [0]}
    (batches / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(HwpruneError, match="system"):
        load_cifar10(tmp_path, train=False)
    assert not marker.exists()


def test_cifar_missing_and_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(HwpruneError, match="does not exist"):
        load_cifar10(tmp_path / "absent", train=False)
    with pytest.raises(HwpruneError, match="test.npz"):
        load_cifar10(tmp_path, train=False)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(HwpruneError, match=r"uint8 Nx32x32x3"):
        load_cifar10(tmp_path, train=False)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(HwpruneError, match="'y'"):
        load_cifar10(tmp_path, train=False)
    (tmp_path / "train.npz").write_bytes(b"not an npz")
    with pytest.raises(HwpruneError, match="train.npz"):
        load_cifar10(tmp_path, train=True)


def test_cifar_pickle_missing_batch(fake_cifar: dict, tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    src = fake_cifar["p2"]
    (batches / "data_batch_1").write_bytes((src / "data_batch_1").read_bytes())
    with pytest.raises(HwpruneError, match="data_batch_2"):
        load_cifar10(tmp_path, train=True)


def test_augment_cifar_crops_and_flips() -> None:
    x = torch.randn(16, 3, 32, 32)
    a = augment_cifar(x, torch.Generator().manual_seed(0))
    b = augment_cifar(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    # Every output is some crop of the zero-padded image, possibly mirrored.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        crops = [padded[i, :, oy : oy + 32, ox : ox + 32] for oy in range(9) for ox in range(9)]
        assert any(torch.equal(a[i], c) or torch.equal(a[i], c.flip(2)) for c in crops)
    # Without padding only flips remain, and both kinds occur in 16 images.
    c = augment_cifar(x, torch.Generator().manual_seed(1), padding=0)
    kept = [torch.equal(c[i], x[i]) for i in range(16)]
    flipped = [torch.equal(c[i], x[i].flip(2)) for i in range(16)]
    assert all(k or f for k, f in zip(kept, flipped, strict=True))
    assert any(kept) and any(flipped)


# ---------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_equals_npz(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=7).astype(np.int64)
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "test.npz", x=x, y=y)
    idx = tmp_path / "idx"
    idx.mkdir()
    for name, arr in (("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)):
        if gz:
            with gzip.open(idx / f"{name}.gz", "wb") as f:
                f.write(_idx_bytes(arr))
        else:
            (idx / name).write_bytes(_idx_bytes(arr))
    a = load_mnist(tmp_path).tensors
    b = load_mnist(idx, train=False).tensors
    assert a[0].shape == (7, 1, 28, 28) and a[0].dtype == torch.float32
    assert a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    want = (x.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(a[0][:, 0].numpy(), want, atol=1e-5)


def test_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(HwpruneError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, train=True)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((2, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12)
    with pytest.raises(HwpruneError, match="magic"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3)))
    with pytest.raises(HwpruneError, match="28 x 28"):
        load_mnist(tmp_path)
