"""Local data loaders: scikit-learn digits, CIFAR-10 and MNIST.

Nothing here downloads: CIFAR-10 and MNIST are read from a folder the user already has (npz arrays,
the official CIFAR pickles, or MNIST idx files). Every loader returns ``TensorDataset``s of
normalised float32 NCHW images and int64 labels, and every bad input raises ``HwpruneError``
naming the path and what was expected.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hwprune.errors import HwpruneError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "augment_cifar",
    "data_dir",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_tinyshakespeare",
]

# The normalisation the akamaster pretrained ResNets were trained with (ImageNet statistics,
# not CIFAR's own): using CIFAR's statistics instead costs those checkpoints accuracy.
CIFAR10_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR10_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MNIST_MEAN: float = 0.1307
MNIST_STD: float = 0.3081

_ENV_VAR = "HWPRUNE_DATA_DIR"
_CIFAR_BATCHES = "cifar-10-batches-py"


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data folder: ``path``, else ``$HWPRUNE_DATA_DIR``, else ``../shared/data``."""
    if path is None:
        path = os.environ.get(_ENV_VAR) or None
        if path is None:
            fallback = Path.cwd().parent / "shared" / "data"
            if fallback.is_dir():
                return fallback
            raise HwpruneError(
                f"no data folder: pass a path (e.g. --data-dir) or set {_ENV_VAR}; "
                f"the default {fallback} does not exist"
            )
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise HwpruneError(f"data folder {resolved} does not exist or is not a folder")
    return resolved


# --------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The bundled 8x8 digits as (train, test): x float32 (N,1,8,8) in [0,1], y int64.

    The split is stratified and depends only on ``seed``, so it is the same on every run.
    """
    if not 0.0 < test_fraction < 1.0:
        raise HwpruneError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (
        TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)),
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a crafted file cannot run code on load."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: only numpy array reconstruction is allowed"
            )
        if module.startswith("numpy.core"):
            # numpy 2 renamed numpy.core to numpy._core; import the new name to avoid the
            # deprecation shim (and keep working once the shim is gone).
            try:
                import numpy._core  # noqa: F401

                module = "numpy._core" + module[len("numpy.core") :]
            except ImportError:
                pass
        return super().find_class(module, name)


def _load_restricted_pickle(path: Path) -> object:
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise HwpruneError(f"{path} is not a CIFAR python pickle we can read safely: {e}") from e


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file -> (x uint8 N,32,32,3 HWC, y int64 N)."""
    if not path.is_file():
        raise HwpruneError(f"missing CIFAR batch file {path}")
    obj = _load_restricted_pickle(path)
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise HwpruneError(f"{path}: expected a dict with b'data' and b'labels'")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise HwpruneError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise HwpruneError(
            f"{path}: b'labels' must have {data.shape[0]} entries, got shape {labels.shape}"
        )
    # Rows are CHW (1024 red, 1024 green, 1024 blue); convert to the npz's HWC layout.
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, labels


def _read_npz(path: Path, x_shape: Sequence[int | None], what: str) -> tuple[np.ndarray, ...]:
    """Read ``x``/``y`` from an npz and check dtypes and shapes (None = any size)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x", "y") if k in z.files}
            found = list(z.files)
    except (OSError, ValueError, EOFError) as e:
        raise HwpruneError(f"{path} is not a readable npz file: {e}") from e
    if len(arrays) != 2:
        raise HwpruneError(f"{path}: expected arrays 'x' and 'y', found {found}")
    x, y = arrays["x"], arrays["y"]
    shape_ok = x.ndim == len(x_shape) and all(
        want is None or got == want for got, want in zip(x.shape, x_shape, strict=True)
    )
    want_txt = "x".join("N" if s is None else str(s) for s in x_shape)
    if x.dtype != np.uint8 or not shape_ok:
        raise HwpruneError(
            f"{path}: 'x' must be uint8 {want_txt} ({what}), got {x.dtype} {tuple(x.shape)}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise HwpruneError(
            f"{path}: 'y' must be integer of shape ({x.shape[0]},), got {y.dtype} {y.shape}"
        )
    return x, y.astype(np.int64)


def _find_cifar(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    split = "train" if train else "test"
    batches = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    looked: list[Path] = []
    for folder in (root, root / "cifar10"):
        npz = folder / f"{split}.npz"
        looked.append(npz)
        if npz.is_file():
            return _read_npz(npz, (None, 32, 32, 3), "N images, HWC")
    for folder in (root, root / _CIFAR_BATCHES, root / "cifar10" / _CIFAR_BATCHES):
        looked.append(folder / batches[0])
        if (folder / batches[0]).is_file():
            parts = [_read_cifar_batch(folder / b) for b in batches]
            return (
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
            )
    raise HwpruneError(
        f"no CIFAR-10 {split} split under {root}: looked for "
        + ", ".join(str(p) for p in looked)
        + f" (a folder with {split}.npz, or the official {_CIFAR_BATCHES} pickles)"
    )


def _normalise_hwc(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, scaled to [0,1] then normalised, without extra copies."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous().float()
    t.div_(255.0)
    t.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    t.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return t


def load_cifar10(root: str | os.PathLike[str], train: bool) -> TensorDataset:
    """CIFAR-10 from ``root`` as a TensorDataset of normalised float32 NCHW x and int64 y.

    ``root`` may hold ``train.npz``/``test.npz`` (x uint8 N,32,32,3; y int64), be the official
    ``cifar-10-batches-py`` folder, or contain it (or a ``cifar10/`` folder with either).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HwpruneError(f"CIFAR-10 folder {root} does not exist or is not a folder")
    x, y = _find_cifar(root, train)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise HwpruneError(
            f"CIFAR-10 labels under {root} must lie in 0..9, got {y.min()}..{y.max()}"
        )
    return TensorDataset(_normalise_hwc(x, CIFAR10_MEAN, CIFAR10_STD), torch.from_numpy(y))


def augment_cifar(
    x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4
) -> torch.Tensor:
    """Random crop (zero padding of ``padding`` pixels) and horizontal flip of an NCHW batch.

    Each image gets its own crop offset and flip. The padding is zero in the (normalised) input,
    i.e. the mean colour. Pass a seeded ``generator`` for reproducible batches.
    """
    if x.ndim != 4:
        raise HwpruneError(f"augment_cifar expects an NCHW batch, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = ox[:, None] + torch.arange(w, device=dev)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reading columns backwards
    idx_n = torch.arange(n, device=dev)[:, None, None]
    # Advanced indices around a slice put their dims first: result is (N, H, W, C).
    out = padded[idx_n, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# MNIST


def _open_maybe_gz(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes with ``ndim`` dimensions (big-endian header)."""
    try:
        raw = _open_maybe_gz(path)
    except (OSError, EOFError) as e:
        raise HwpruneError(f"cannot read idx file {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HwpruneError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 | ndim:  # 0x08 = unsigned byte
        raise HwpruneError(
            f"{path}: idx magic {magic:#010x}, expected {0x0800 | ndim:#010x} "
            f"(unsigned bytes, {ndim} dims)"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise HwpruneError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims).copy()  # frombuffer views are read-only


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(root: str | os.PathLike[str], train: bool = False) -> TensorDataset:
    """MNIST from ``root`` as float32 (N,1,28,28) normalised (0.1307, 0.3081), y int64.

    ``root`` may hold ``{train,test}.npz`` (directly or in ``mnist/``) or the official idx files
    (``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``, ``train-*``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HwpruneError(f"MNIST folder {root} does not exist or is not a folder")
    split, prefix = ("train", "train") if train else ("test", "t10k")
    looked: list[str] = []
    x = y = None
    for folder in (root, root / "mnist"):
        npz = folder / f"{split}.npz"
        looked.append(str(npz))
        if npz.is_file():
            x, y = _read_npz(npz, (None, 28, 28), "N images of 28x28")
            break
    if x is None:
        for folder in (root, root / "mnist"):
            img = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
            lab = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
            looked += [
                f"{folder / prefix}-images-idx3-ubyte[.gz]",
                f"{folder / prefix}-labels-idx1-ubyte[.gz]",
            ]
            if img is not None and lab is not None:
                x, y = _read_idx(img, 3), _read_idx(lab, 1).astype(np.int64)
                if x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
                    raise HwpruneError(
                        f"{img}, {lab}: expected N x 28 x 28 images and N labels, "
                        f"got {x.shape} and {y.shape}"
                    )
                break
    if x is None or y is None:
        raise HwpruneError(f"no MNIST {split} split under {root}: looked for " + ", ".join(looked))
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    t = t.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    return TensorDataset(t, torch.from_numpy(y))


# --------------------------------------------------------------------------------------------
# Tiny Shakespeare (character-level language modelling)


def load_tinyshakespeare(
    root: str | os.PathLike[str] | None = None, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Tiny Shakespeare as ``(train, val, vocab)``: int64 character ids and the vocabulary.

    Reads ``text/tinyshakespeare.txt`` under ``data_dir(root)``. The vocabulary is the sorted
    set of characters of the whole file (so every validation character has an id); the first
    ``1 - val_fraction`` of the characters (default 90 %) are the training split, the rest the
    validation split, in file order (no shuffling: the split is a contiguous held-out tail).
    """
    if not 0.0 < val_fraction < 1.0:
        raise HwpruneError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    path = data_dir(root) / "text" / "tinyshakespeare.txt"
    if not path.is_file():
        raise HwpruneError(f"Tiny Shakespeare not found: expected the text file {path}")
    text = path.read_text(encoding="utf-8")
    if len(text) < 2:
        raise HwpruneError(f"{path} holds {len(text)} characters; need at least 2 to split")
    vocab = "".join(sorted(set(text)))
    lookup = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    ids = torch.from_numpy(lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)])
    cut = min(max(int(len(ids) * (1.0 - val_fraction)), 1), len(ids) - 1)
    return ids[:cut].clone(), ids[cut:].clone(), vocab
