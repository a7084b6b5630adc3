"""The data sets a recipe can name (``data.name``): a registry from name to how it loads.

Each entry turns the recipe's ``data`` section into a (train, test) pair of ``TensorDataset``
of (x, y) and the facts the model factory may need (``vocab_size`` of a text set). Subsets,
seeding and the checks on what a loader returned are the builder's (``app/build.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import TensorDataset

from .. import data as hdata
from .recipe import RecipeError

__all__ = ["DATASETS", "DatasetSpec", "augmentable", "dataset_spec", "register_dataset"]

#: (train, test, facts for the model factory)
Loaded = tuple[Any, Any, dict[str, Any]]


#: a training batch's augmentation: ``augment(x, generator=g)`` -> x (seeded per step)
Augment = Callable[..., Tensor]


@dataclass(frozen=True)
class DatasetSpec:
    """How one data set loads: ``load(root, data_section, seed)``; ``root`` is the resolved
    data folder when ``needs_folder``, else None (bundled data). ``augment``: what
    ``data.augment: true`` applies to its training batches (None: the set has none, and the
    recipe field is refused: CIFAR's crop and flip would ruin 8 x 8 digits)."""

    load: Callable[[Path | None, Mapping[str, Any], int], Loaded]
    needs_folder: bool
    augment: Augment | None = None


def _digits(root: Path | None, d: Mapping[str, Any], seed: int) -> Loaded:
    train, test = hdata.load_digits(seed=seed)
    return train, test, {}


def _image_folder(loader: Callable[..., TensorDataset],
                  augment: Augment | None = None) -> DatasetSpec:
    """A data set read from the data folder with ``loader(root, train=...)``."""

    def load(root: Path | None, d: Mapping[str, Any], seed: int) -> Loaded:
        return loader(root, train=True), loader(root, train=False), {}

    return DatasetSpec(load, needs_folder=True, augment=augment)


def _text(root: Path | None, d: Mapping[str, Any], seed: int) -> Loaded:
    """A character stream -> non-overlapping (seq_len) windows of next-character targets."""
    train_ids, val_ids, vocab = hdata.load_tinyshakespeare(root)
    t = d["seq_len"]

    def windows(ids: Tensor) -> TensorDataset:
        n = (len(ids) - 1) // t
        if n < 1:
            raise RecipeError(f"recipe field data.seq_len: got {t}; allowed: < {len(ids)}")
        return TensorDataset(ids[:n * t].view(n, t), ids[1:n * t + 1].view(n, t))

    return windows(train_ids), windows(val_ids), {"vocab_size": len(vocab)}


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_digits, needs_folder=False),
    "cifar10": _image_folder(hdata.load_cifar10, augment=hdata.augment_cifar),
    "mnist": _image_folder(hdata.load_mnist),  # a flipped digit is another digit, or none
    "tinyshakespeare": DatasetSpec(_text, needs_folder=True),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``; a one-line ``RecipeError`` listing the names if unknown."""
    if name not in DATASETS:
        raise RecipeError(f"recipe field data.name: got {name!r}; allowed: "
                          f"{', '.join(DATASETS)}, or a data set your --plugin FILE registers "
                          "with hwprune.app.datasets.register_dataset")
    return DATASETS[name]


def register_dataset(name: str, load: Callable[[Path | None, Mapping[str, Any], int], Loaded],
                     needs_folder: bool = False, augment: Augment | None = None) -> DatasetSpec:
    """Add a data set recipes can name (``data: {name: NAME}``): ``load(root, data, seed)``
    returns (train, test, facts) as the entries above do; ``augment(x, generator=g)``, if
    given, is what ``data.augment: true`` applies to its training batches. Call it in a
    Python file passed as ``hwprune run --plugin FILE``. Registering a name again with the
    same spec does nothing; another spec is refused."""
    if not isinstance(name, str) or not name.isidentifier():
        raise RecipeError(f"register_dataset: name {name!r}; allowed: a Python identifier")
    if not callable(load):
        raise RecipeError(f"register_dataset({name!r}): load is {type(load).__name__}; "
                          "allowed: a callable load(root, data, seed)")
    if augment is not None and not callable(augment):
        raise RecipeError(f"register_dataset({name!r}): augment is {type(augment).__name__}; "
                          "allowed: a callable augment(x, generator=g), or None")
    spec = DatasetSpec(load, needs_folder, augment)
    if DATASETS.get(name, spec) != spec:
        raise RecipeError(f"register_dataset: a data set named {name!r} is already "
                          "registered; choose another name")
    DATASETS[name] = spec
    return spec


def augmentable() -> list[str]:
    """The registered data sets that have an augmentation."""
    return [name for name, spec in DATASETS.items() if spec.augment is not None]
